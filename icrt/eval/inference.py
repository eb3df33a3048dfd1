"""Prompted acting with a KV cache: what runs on a robot or in a simulator.

    policy = InContextPolicy.from_checkpoint("runs/mw5/checkpoint-99")
    policy.prompt(demos)          # episodes {obs keys..., "action": (T, A)}; prefilled once
    obs = env.reset(seed)
    while not done:
        action = policy.act(obs)  # one state token through the cache -> chunk -> one action
        obs, reward, done, info = env.step(action)
    policy.reset()                # next episode, same prompt (the prompt's cache is kept)

Every timestep contributes a state token and, once the action is executed, an action token;
``act`` appends the previous action's token and the new state token in one cached forward pass.

Chunk execution: ``ensemble`` (default) predicts a chunk every step and executes the
exponentially weighted average of all predictions for the current step, oldest weighted most
(ACT's temporal ensembling, weight exp(-decay * i)); ``open_loop`` executes k actions of a chunk
before predicting again (tokens are still appended every step).

Context overflow: the backbone holds ``2 * seq_length`` tokens (the training context). When the
next tokens would not fit, ``overflow="slide"`` (default) keeps the most recent three quarters
of the context -- dropping the oldest prompt steps first, as training windows also start inside
a trajectory -- and re-encodes them once; ``overflow="error"`` raises instead. Both the cached
path and ``use_cache=False`` (full recompute every step) apply the same rule, so they give the
same actions.

Sliding window (a policy trained with ``--shared-cfg.sliding-window N``): each query token
sees the whole prompt but only the query tokens of its last N steps, as in training. The cache
keeps the prompt and those steps, dropping older ones as the episode goes on (rotary positions
keep counting), so nothing slides or is re-encoded; ``use_cache=False`` recomputes the whole
episode with the same mask every step and gives the same actions.

Decoding: ``act`` runs the backbone through a :class:`~icrt.models.backbones.decode.Decoder`
(fused projections, a static KV cache written in place) whose weights are ``dtype`` float32
(default), bfloat16 or int8 (weight-only); ``use_cache=False`` recomputes with the same weights,
so cached and recomputed actions agree for every dtype.

``BatchedInContextPolicy`` runs several such episodes (one per row, each with its own prompt)
with one backbone forward per step, for evaluation on a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from icrt.data.codec import Codec
from icrt.errors import UserError
from icrt.models.backbones.decode import Decoder, activation_dtype, weight_dtype_name
from icrt.models.backbones.llama import context_mask
from icrt.models.policy import ICRTPolicy
from icrt.train.checkpoint import Checkpoint, load_policy

log = logging.getLogger(__name__)

Execution = Literal["ensemble", "open_loop"]


class InContextPolicy:
    def __init__(
        self,
        model: ICRTPolicy,
        checkpoint: Checkpoint,
        device: str | torch.device = "cpu",
        *,
        execution: Execution = "ensemble",
        open_loop_steps: int | None = None,
        ensemble_decay: float = 0.01,
        deterministic: bool = False,
        overflow: Literal["slide", "error"] = "slide",
        use_cache: bool = True,
        seed: int = 0,
        dtype: str | torch.dtype = "float32",
        compile: bool = False,
    ) -> None:
        self.model = model.eval()
        # The backbone decodes through a Decoder holding its weights in float32, bfloat16 or
        # int8 (see icrt.models.backbones.decode); token encoders and the head stay float32.
        self.weight_dtype = weight_dtype_name(dtype)
        self.dtype = activation_dtype(self.weight_dtype)
        self.compile = compile  # torch.compile the decoding steps (Decoder's compile)
        self.spec = model.spec
        self.normalizer = checkpoint.normalizer
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        if execution not in ("ensemble", "open_loop"):
            raise UserError(f"Unknown chunk execution '{execution}'; use ensemble or open_loop.")
        K = self.spec.num_pred_steps
        self.execution = execution
        self.open_loop_steps = K if open_loop_steps is None else int(open_loop_steps)
        if not 1 <= self.open_loop_steps <= K:
            raise UserError(f"open_loop_steps must be in 1..{K} (the chunk length).")
        self.ensemble_decay = float(ensemble_decay)
        self.deterministic = deterministic
        self.overflow = overflow
        self.use_cache = use_cache
        self.max_tokens = 2 * self.spec.max_timesteps
        self.window = self.spec.window  # query steps each token sees (None: all)
        self._decoder: Decoder | None = None  # built on first use, rebuilt if weights change
        self._slots = torch.zeros(0, dtype=torch.long)  # token indices in the decoder's cache
        self._generator = torch.Generator(device=self.device)
        self.codec = Codec.from_spec(
            self.spec, self.normalizer,
            checkpoint.config.model_cfg.vision_encoder_cfg.use_cached_features)
        self._prompt_tokens: list[torch.Tensor] = []
        self.reset(seed)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", **options: Any
    ) -> InContextPolicy:
        """Load a checkpoint directory (or a run directory's latest checkpoint)."""
        model, ckpt = load_policy(path, device)
        return cls(model, ckpt, device, **options)

    # ------------------------------------------------------------------ episode control

    def reset(self, seed: int | None = None) -> None:
        """Start a new query episode with the same prompt; optionally re-seed sampling."""
        if seed is not None:
            self._generator.manual_seed(int(seed))
        self._tokens: list[torch.Tensor] = list(self._prompt_tokens)  # (D,) each: s0 a0 s1 ...
        self._offset = 0  # context = self._tokens[self._offset:]
        if len(self._tokens) > self.max_tokens:
            self._offset = self._slide_offset(len(self._tokens))
        if self.use_cache:
            self._fresh_decoder().reset()
            self._forward_pending()
        self._t = 0
        self._pending_action: np.ndarray | None = None  # raw action returned, token not yet in
        self._predictions: list[tuple[int, np.ndarray]] = []  # (step, absolute chunk (K, A'))
        self._queue: list[np.ndarray] = []

    def prompt(self, demos: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Set the demonstrations shown before every query episode and prefill the cache.

        Each demo holds the checkpoint's observation keys and its action key(s) as (T, ...)
        arrays (e.g. ``EpisodeStore.episode(i)``). An empty list means no prompt.
        """
        if demos and not self.spec.in_context:
            raise UserError("This policy was trained without prompts (behaviour cloning); "
                            "evaluate it with --no-prompt.")
        with torch.no_grad():
            tokens = list(self.demo_tokens(demos))
        if len(tokens) > self.max_tokens:
            log.warning("the prompt has %d tokens but the context holds %d; keeping the most "
                        "recent ones", len(tokens), self.max_tokens)
        self._prompt_tokens = tokens
        self.reset()

    def demo_tokens(self, demos: Sequence[Mapping[str, np.ndarray]]) -> torch.Tensor:
        """The (N, D) tokens of demonstrations, s0 a0 s1 a1 ... of each in turn (N = 0 for
        none); with gradients when called outside ``no_grad`` (RL fine-tuning recomputes the
        prompt this way)."""
        tokens = [torch.zeros(0, self.model.d_model, device=self.device)]
        for i, demo in enumerate(demos):
            self._check_keys(demo, f"prompt demonstration {i}", need_action=True)
            tokens.append(self._episode_tokens(demo, len(demo[self.spec.action_keys[0]]),
                                               prompt=True)[0])
        return torch.cat(tokens)

    def _episode_tokens(self, episode: Mapping[str, np.ndarray], T: int, prompt: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (2T, D) tokens s0 a0 s1 ... of an episode's first T steps (marked as prompt or
        not) and its (T, A) normalised actions."""
        actions = self._action_inputs(self.codec.actions(episode, T))  # (1, T, A)
        mark = torch.full((1, T), prompt, dtype=torch.bool, device=self.device)
        s = self.model.mark_prompt(self.model.state_tokens(self._obs_tensors(episode, T)), mark)
        a = self.model.mark_prompt(self.model.action_tokens(actions), mark)
        return self.model.interleave(s, a)[0], actions[0]

    @torch.no_grad()
    def teacher_forced(self, demos: Sequence[Mapping[str, np.ndarray]],
                       episode: Mapping[str, np.ndarray], steps: int
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Replay the first ``steps`` steps of a recorded ``episode`` after ``demos`` as the
        prompt, with the episode's own actions in context (teacher forcing), and return the
        first action of each predicted chunk and the recorded action, both (N, A) normalised.

        One forward pass with the training mask; a prompt too long for the context keeps its
        most recent steps. Used by :mod:`icrt.eval.probe` to ask whether a policy reads its
        prompt without running a simulator."""
        key = self.spec.action_keys[0]
        n = min(int(steps), len(episode[key]), self.spec.max_timesteps)
        if n < 1:
            raise UserError("teacher_forced needs at least one query step.")
        query = {k: np.asarray(v)[:n] for k, v in episode.items()}
        self._check_keys(query, "the query episode", need_action=True)
        prompt = self.demo_tokens(demos)  # (2 Tp, D)
        prompt = prompt[len(prompt) - min(len(prompt), self.max_tokens - 2 * n):]
        query_tokens, target = self._episode_tokens(query, n, prompt=False)
        tokens = torch.cat([prompt, query_tokens])[None]
        prompt_steps = torch.arange(tokens.shape[1] // 2, device=self.device) < len(prompt) // 2
        mask = self.model.attention_mask({"prompt_mask": prompt_steps[None]})  # training's
        hidden = self.model.backbone(tokens, mask=mask)[0, len(prompt)::2]  # (n, D)
        hidden = self.model.head_input(hidden[None], self._obs_tensors(query, n))[0]
        chunk = self.model.predict_chunk(hidden, generator=self._generator, deterministic=True)
        return chunk[:, 0].float().cpu().numpy(), target.float().cpu().numpy()

    # ------------------------------------------------------------------ acting

    @torch.no_grad()
    def act(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The action for observation ``obs`` (raw units, as the environment expects)."""
        self._append_observation(obs)
        return self._action_from(self._context_hidden())

    def executed(self, action: np.ndarray) -> None:
        """Say that ``action`` (raw units, as given to the environment) was executed instead
        of the one :meth:`act` just returned (an expert's, as in DAgger's beta mixture); its
        token, not the policy's, goes into the context."""
        if self._pending_action is None:
            raise UserError("executed() follows act(): there is no action to replace yet.")
        if len(self.spec.action_keys) != 1:
            raise UserError("executed() needs a policy with one action key.")
        native = np.asarray(action, np.float32)[None]  # (1, A)
        self._pending_action = self.codec.actions({self.spec.action_keys[0]: native}, 1)[0]

    def _append_observation(self, obs: Mapping[str, np.ndarray]) -> None:
        """Append the executed action's token (if any) and the state token of ``obs``."""
        self._check_keys(obs, "the observation", need_action=False)
        if self._pending_action is not None:
            token = self.model.action_tokens(self._action_inputs(self._pending_action[None]))
            self._tokens.append(token[0, 0])
        inputs = self._obs_tensors(obs, None)
        self._current_inputs = inputs  # what the object pointer reads at this step
        state = self.model.state_tokens(inputs)  # (1, 1, D)
        self._tokens.append(state[0, 0])

    def _action_from(self, hidden: torch.Tensor, chunk: torch.Tensor | None = None
                     ) -> np.ndarray:
        """The action to execute now, given the feature (D,) at the newest state token;
        ``chunk`` (K, A), normalised, is executed instead of the head's prediction (RL
        exploration draws it from the policy's action distribution)."""
        need_chunk = self.execution == "ensemble" or not self._queue
        if need_chunk:
            if chunk is None:
                chunk = self.model.predict_chunk(hidden[None], generator=self._generator,
                                                 deterministic=self.deterministic)[0]  # (K, A)
            absolute = self.codec.decode_chunk(chunk.float().cpu().numpy(),
                                               self._current_proprio)  # (K, A') 6D layout
            if self.execution == "ensemble":
                self._predictions.append((self._t, absolute))
            else:
                self._queue = list(absolute[: self.open_loop_steps])
        if self.execution == "ensemble":
            action = self._ensembled(self._t)
        else:
            action = self._queue.pop(0)
        self._pending_action = action
        self._t += 1
        return self.codec.native_action(action)

    # ------------------------------------------------------------------ context

    def _slide_offset(self, n_tokens: int) -> int:
        """Where the context starts after a slide: the last 3/4 of it, at a state token."""
        if self.overflow == "error":
            raise UserError(
                f"The context of {n_tokens} tokens exceeds this policy's {self.max_tokens} "
                f"(2 x --shared-cfg.seq-length); use a shorter prompt or overflow='slide'."
            )
        keep = (3 * self.max_tokens // 4) // 2 * 2
        return (n_tokens - keep) // 2 * 2

    def _slide_if_full(self) -> bool:
        """Apply the overflow rule; True when the context now starts later."""
        if self.window is not None or len(self._tokens) - self._offset <= self.max_tokens:
            return False
        self._offset = self._slide_offset(len(self._tokens))
        return True

    @property
    def context(self) -> list[torch.Tensor]:
        """The tokens the backbone sees now, (D,) each: s0 a0 s1 ..."""
        return self._tokens[self._offset:]

    def _fresh_decoder(self) -> Decoder:
        """The decoder, (re)built when missing or when the model's weights changed since."""
        if self._decoder is None or self._decoder.stale():
            # a window keeps the prompt and 2N query tokens (+ the 2 new ones of a step)
            slots = self.max_tokens + (0 if self.window is None else 2 * self.window + 2)
            self._decoder = Decoder(self.model.backbone, slots,
                                    dtype=self.weight_dtype, compile=self.compile)
        return self._decoder

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The feature (D,) at the newest state token -> what the head reads (the object
        pointer, if the policy has one, adds that step's attended object)."""
        if self.model.pointer is None:
            return hidden
        proprio = self._current_inputs["proprio"][0, 0].to(hidden.dtype)
        return self.model.head_input(hidden[None], {"proprio": proprio[None]})[0]

    def _context_hidden(self) -> torch.Tensor:
        return self.head_input(self._backbone_hidden())

    def _backbone_hidden(self) -> torch.Tensor:
        if self._slide_if_full() and self.use_cache:
            self._decoder.reset()
        x = None
        if not self.use_cache:  # reference path: full recompute of the context
            x = torch.stack(self._tokens[self._offset:])[None]
            mask = None
            if self.window is not None:
                idx = torch.arange(self._offset, len(self._tokens))
                mask = self._window_mask(idx, len(idx))
            if self.weight_dtype == "float32":  # the training backbone itself
                return self.model.backbone(x, mask=None if mask is None else mask[None])[0, -1]
            decoder = self._fresh_decoder()
            if x.shape[1] > decoder.max_len:  # a windowed episode longer than the cache
                decoder = Decoder(self.model.backbone, x.shape[1], dtype=self.weight_dtype)
            decoder.reset()
            return decoder(x, mask=mask)[0, -1]
        return self._forward_pending()

    def _window_mask(self, tokens: torch.Tensor, n_queries: int) -> torch.Tensor:
        """(n_queries, K) bool: what the last ``n_queries`` of ``tokens`` (ascending indices
        into the episode's tokens, K of them) see under the training mask (``context_mask``;
        a step is a state token and its action token)."""
        prompt = tokens < len(self._prompt_tokens)
        mask = context_mask((tokens // 2)[None], prompt[None], window=self.window)[0]
        return mask[len(tokens) - n_queries:]

    def _forward_pending(self) -> torch.Tensor | None:
        if self.window is not None:
            return self._forward_window()
        start = self._offset + self._decoder.length
        if start >= len(self._tokens):
            return None
        x = torch.stack(self._tokens[start:])[None]  # (1, n_new, D)
        return self._decoder(x)[0, -1]

    def _forward_window(self) -> torch.Tensor | None:
        """Cached step under the sliding window: new tokens attend to the kept slots through
        the window mask; then slots no later token can see are dropped."""
        decoder = self._decoder
        if decoder.length == 0:
            self._slots = torch.zeros(0, dtype=torch.long)
        start = int(self._slots[-1]) + 1 if len(self._slots) else self._offset
        if start >= len(self._tokens):
            return None
        new = torch.arange(start, len(self._tokens))
        keys = torch.cat([self._slots, new])
        mask = self._window_mask(keys, len(new)).to(decoder.device)
        h = decoder(torch.stack(self._tokens[start:])[None], mask=mask)[0, -1]
        # the next token (this step's action) has this step; it sees steps > step - window
        step = (len(self._tokens) - 1) // 2
        keep = (keys < len(self._prompt_tokens)) | (keys // 2 > step - self.window)
        if not bool(keep.all()):
            decoder.compact(keep)
        self._slots = keys[keep]
        return h

    # ------------------------------------------------------------------ conversions

    def _camera_key(self, data: Mapping[str, Any], key: str) -> str:
        """Camera frames, or their precomputed features for a policy trained on those."""
        feature = self.codec.frame_key(key)
        return feature if feature in data else key

    def _check_keys(self, data: Mapping[str, Any], what: str, need_action: bool) -> None:
        keys = list(self.spec.proprio_keys)
        keys += [self._camera_key(data, k) for k in self.spec.camera_keys]
        if need_action:
            keys += list(self.spec.action_keys)
        missing = [k for k in keys if k not in data]
        if missing:
            raise UserError(
                f"{what[0].upper() + what[1:]} lacks key(s) {', '.join(missing)} that the policy "
                f"was trained on (it has {', '.join(sorted(data))})."
            )

    def _obs_tensors(
        self, data: Mapping[str, np.ndarray], T: int | None
    ) -> dict[str, torch.Tensor]:
        """(T, ...) arrays (or one step when T is None) -> (1, T, ...) model inputs."""
        single = T is None
        n = 1 if single else T
        raw = self.codec.proprio(data, n)  # (n, P')
        if single:
            self._current_proprio = raw[0]
        out = {"proprio": torch.from_numpy(self.codec.encode_proprio(raw))[None]}
        for k in self.spec.camera_keys:
            key = self._camera_key(data, k)
            x = torch.as_tensor(np.asarray(data[key]))
            out[key] = (x[None] if single else x)[None]
        return {k: v.to(self.device) for k, v in out.items()}

    def _action_inputs(self, actions: np.ndarray) -> torch.Tensor:
        """(T, A') raw actions in the 6D layout -> (1, T, A') normalised token inputs."""
        return torch.from_numpy(self.codec.encode_actions(actions))[None].to(self.device)

    def _ensembled(self, t: int) -> np.ndarray:
        K = self.spec.num_pred_steps
        self._predictions = [(s, c) for s, c in self._predictions if t - s < K]
        preds = np.stack([c[t - s] for s, c in self._predictions])  # oldest first
        w = np.exp(-self.ensemble_decay * np.arange(len(preds)))
        return (w[:, None] * preds).sum(0) / w.sum()



class BatchedInContextPolicy:
    """Several episodes (one per row) acting together: one backbone forward per step for all.

        batch = BatchedInContextPolicy.from_checkpoint("runs/mw5/best", rows=8, device="cuda")
        batch.prompt(i, demos); batch.reset(i, seed)      # per row, any time
        actions = batch.act([obs_0, None, obs_2, ...])     # None: that row is idle this step

    Each row is an :class:`InContextPolicy` of its own (prompt, chunk execution, overflow rule,
    random generator), so a row acts exactly as that policy would alone, up to numerics: only
    the backbone runs batched, on a shared KV cache whose rows are padded to line up (see
    ``LlamaBackbone.forward``'s ``valid``). Appending a step is one cached forward; when a
    row's context changes otherwise (a new prompt, a reset, a slide) or the padded cache is
    full, the cache is rebuilt from every row's context in one forward. Observation encoders
    and heads run per row.
    """

    def __init__(self, model: ICRTPolicy, checkpoint: Checkpoint, rows: int,
                 device: str | torch.device = "cpu", **options: Any) -> None:
        if rows < 1:
            raise UserError(f"A batched policy needs at least one row (got {rows}).")
        if options.get("use_cache") is False:
            raise UserError("A batched policy always decodes with the KV cache.")
        options["use_cache"] = False  # the rows keep tokens only; the batch owns the cache
        self.rows = [InContextPolicy(model, checkpoint, device, **options) for _ in range(rows)]
        self.model = self.rows[0].model
        self.spec = self.rows[0].spec
        self.max_tokens = self.rows[0].max_tokens
        if self.spec.window is not None:
            raise UserError("A sliding-window policy decodes one episode per process; use "
                            "--num-envs 1.")
        if self.rows[0].weight_dtype == "int8":
            raise UserError("int8 backbones decode one episode per process; use --num-envs 1 "
                            "or --dtype bfloat16.")
        # ragged rows need the training backbone's masked forward: cast it (bf16 halves the
        # weights read per step)
        self.model.backbone.to(self.rows[0].dtype)
        self._cache = self.model.backbone.new_cache(rows, self.max_tokens, device=device,
                                                    dtype=self.rows[0].dtype)
        self._cached = [0] * rows  # tokens of each row's context already in the cache
        self._stale = True

    @classmethod
    def from_checkpoint(cls, path: str | Path, rows: int, device: str | torch.device = "cpu",
                        **options: Any) -> BatchedInContextPolicy:
        model, ckpt = load_policy(path, device)
        return cls(model, ckpt, rows, device, **options)

    def prompt(self, row: int, demos: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Set row ``row``'s demonstrations (see :meth:`InContextPolicy.prompt`)."""
        self.rows[row].prompt(demos)
        self._stale = True

    def reset(self, row: int, seed: int | None = None) -> None:
        """Start a new episode in row ``row`` (same prompt), optionally re-seeding it."""
        self.rows[row].reset(seed)
        self._stale = True

    @torch.no_grad()
    def act(self, observations: Sequence[Mapping[str, np.ndarray] | None]) -> list:
        """One action per row with an observation (None for the rows given None)."""
        if len(observations) != len(self.rows):
            raise UserError(f"act() got {len(observations)} observations for "
                            f"{len(self.rows)} rows; pass None for an idle row.")
        active = [i for i, obs in enumerate(observations) if obs is not None]
        for i in active:
            self.rows[i]._append_observation(observations[i])
            if self.rows[i]._slide_if_full():
                self._stale = True
        hidden = self._forward()  # (rows, D) feature at each row's newest token
        actions: list = [None] * len(self.rows)
        for i in active:
            actions[i] = self.rows[i]._action_from(self.rows[i].head_input(hidden[i]))
        return actions

    def _forward(self) -> torch.Tensor:
        """Bring every row's context into the cache; the last position's features (rows, D)."""
        new = [row.context[n:] for row, n in zip(self.rows, self._cached, strict=True)]
        width = max(len(t) for t in new)
        if self._stale or self._cache.length + width > self._cache.max_len:
            self._cache.reset()
            self._cached = [0] * len(self.rows)
            new = [row.context for row in self.rows]
            width = max(len(t) for t in new)
            self._stale = False
        D = self.model.d_model
        x = torch.zeros(len(self.rows), max(width, 1), D, dtype=self.rows[0].dtype,
                        device=self._cache.valid.device)  # (rows, width, D), left-padded
        valid = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        for i, tokens in enumerate(new):
            if tokens:
                x[i, x.shape[1] - len(tokens):] = torch.stack(tokens).to(x.dtype)
                valid[i, x.shape[1] - len(tokens):] = True
            self._cached[i] += len(tokens)
        return self.model.backbone(x, cache=self._cache, valid=valid)[:, -1].float()
