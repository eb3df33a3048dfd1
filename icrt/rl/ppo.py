"""PPO fine-tuning of an in-context policy from its own prompted rollouts (FLaRe's recipe).

    python scripts/finetune_rl.py --il-ckpt-path runs/mw5 --tasks reach-v3 \\
        --prompt-dataset data/mw5_prompts.json --num-train-processes 2 --output-dir runs/ppo

The policy acts as in evaluation: a held-out demonstration of the task prefilled in the KV cache,
one state token per step, a chunk predicted at every state token, temporal ensembling (or
open-loop chunks, as ``--execution`` says). PPO's action at step t is that chunk, (K, A) in
normalised units, drawn from the policy's distribution:

* ``mlp`` head: a Gaussian around the head's chunk with a learned log-std per chunk entry
  (saved with the run; evaluation keeps using the head's chunk, the mean);
* ``gmm`` head: the head's own mixture (its likelihood; no extra parameter);
* ``diffusion`` / ``flow`` heads: refused (their likelihood is intractable).

How chunks are combined into the executed action (ensembling) belongs to the environment from
PPO's side. The rollout stores, per episode, the observations, the executed actions, the drawn
chunks, their log-probabilities and where the context started at each step (the overflow rule
slides it); the update rebuilds the same tokens and recomputes every step's feature with full
forwards over the same context windows, so at the first minibatch of an update the probability
ratio is 1 (a test checks it). Rollouts run in ``--num-train-processes`` worker processes with
the KV cache; the learner updates between rollout phases (synchronous PPO, GAE).

FLaRe's stabilisers are the defaults, each a flag: a separate critic (an MLP over the backbone's
features with gradients stopped, or over the observation alone), critic warm-up updates with the
actor frozen, a small actor learning rate, clip 0.1, no entropy bonus, gradient clipping. The
reward is sparse (1 at the simulator's first success, which ends the episode); ``--reward
shaped`` adds potential-based shaping with the simulator's own reward as the potential. The
critic also sees the fraction of the episode's step limit used, so ending at the limit is a true
terminal.

Every update writes RUN/checkpoint-<update>/ in the usual layout (``scripts/eval.py
--checkpoint RUN`` evaluates it unchanged) with the optimiser, critic and log-std in its
train_state.pt, so rerunning the same command after a kill continues exactly. Rollout
randomness (layouts, prompts, exploration noise, minibatch order) derives from (seed, update,
episode), never from how many processes ran it. TensorBoard, log.txt and success_curve.png
(rollout success vs environment steps) are in the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import zlib
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import tyro
from torch import Tensor, nn

from icrt.config import EvalConfig
from icrt.envs.base import episode_seed, make_env
from icrt.envs.episode import EpisodeRunner, worker_pool
from icrt.errors import UserError
from icrt.fsutil import atomic_path, atomic_write_text, check_output_dir
from icrt.models.heads.base import mlp
from icrt.models.heads.gmm import GMMHead
from icrt.models.heads.mlp import MLPHead
from icrt.train.checkpoint import (
    load_policy,
    prune_checkpoints,
    read_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

log = logging.getLogger(__name__)

LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0


@dataclass(frozen=True)
class PPOConfig:
    """PPO fine-tuning of an imitation-learned checkpoint (scripts/finetune_rl.py)."""

    # The imitation-learned checkpoint to improve: a checkpoint directory, or a run directory
    # (its latest checkpoint).
    il_ckpt_path: str = ""
    # Run directory: checkpoint-<update>/, log.txt, TensorBoard, success_curve.png. Running the
    # same command on it again resumes after the last checkpoint.
    output_dir: str = ""
    # Dataset JSON of held-out demonstrations that prompt the RL episodes (e.g.
    # data/mw5_prompts.json); with --layouts dataset also their starting layouts.
    prompt_dataset: Annotated[str, tyro.conf.arg(aliases=("--dataset-dir",))] = ""
    # Rollout worker processes (each runs simulators and a copy of the policy with its KV cache).
    num_train_processes: int = 2
    # Simulator (default: the checkpoint's).
    env: str | None = None
    # Tasks to fine-tune on (default: the checkpoint's training tasks).
    tasks: tuple[str, ...] | None = None
    # Demonstrations shown before each RL episode.
    num_prompts: int = 1
    # Episode length limit (default: the environment's).
    max_steps: int | None = None
    # Starting layouts: fresh ones from the RL seed stream (never an evaluation layout), or the
    # layouts recorded with the prompt dataset's episodes, in turn.
    layouts: Literal["fresh", "dataset"] = "fresh"
    # Episodes rolled out per PPO update (spread over the tasks in turn).
    episodes_per_update: int = 16
    # Number of PPO updates (critic warm-up updates included).
    max_updates: int = 50
    # Stop once this many environment steps were taken (0: no limit).
    max_env_steps: int = 0
    # sparse: 1 at the first success (which ends the episode), else 0. shaped: plus
    # potential-based shaping with the simulator's own reward (times --shaped-reward-scale)
    # as the potential of the state it leads to, gamma*phi(s') - phi(s): a dense signal that
    # leaves the best policy unchanged and pays nothing for lingering before success.
    reward: Literal["sparse", "shaped"] = "sparse"
    shaped_reward_scale: float = 0.01
    # Discount and GAE lambda.
    gamma: float = 0.99
    gae_lambda: float = 0.95
    # PPO's probability-ratio clip.
    clip: float = 0.1
    # Passes over each update's episodes, and minibatches (of episodes) per pass.
    ppo_epochs: int = 4
    num_minibatches: int = 4
    # Learning rates of the actor (the whole policy and its log-std) and the critic.
    actor_lr: float = 3e-5
    critic_lr: float = 3e-4
    # Weight of a behaviour-cloning loss on the checkpoint's own training demonstrations (all
    # its tasks), added at every actor step so that PPO on some tasks does not erase what the
    # policy does on the others (0: off), and its batch size in sequences.
    bc_coef: float = 5.0
    bc_batch_size: int = 8
    # Stop an update's remaining actor minibatches once the approximate KL divergence from the
    # rollout policy exceeds this (0: never); the critic keeps training.
    target_kl: float = 0.03
    # Gradient-norm clip, for the actor and the critic each.
    max_grad_norm: float = 0.5
    # Entropy bonus (FLaRe: none).
    entropy_coef: float = 0.0
    # Critic input: the backbone's feature at the state token, gradients stopped (features), or
    # the normalised proprio observation alone (obs); either with the episode-time fraction.
    critic: Literal["features", "obs"] = "features"
    critic_hidden_dim: int = 256
    # Updates at the start that train only the critic (the actor stays bitwise unchanged).
    critic_warmup_updates: int = 2
    # mlp head: the initial log standard deviation of the exploration Gaussian (normalised
    # action units), and whether it is learned.
    init_log_std: float = -1.6
    learn_log_std: bool = True
    # Chunk execution during rollouts, as in scripts/eval.py.
    execution: Literal["ensemble", "open_loop"] = "ensemble"
    open_loop_steps: int | None = None
    ensemble_decay: float = 0.01
    # Validate the policy's mean (no exploration noise, as scripts/eval.py acts) every N
    # updates and before the first, on --val-episodes fixed layouts per task of the RL seed
    # stream that no training rollout uses; plotted beside the rollout success (0: never).
    val_every: int = 5
    val_episodes: int = 16
    # Checkpoint every N updates (and after the last); keep the newest N (0: all).
    save_every: int = 1
    keep_last: int = 3
    # Base seed of layouts, prompt choice, exploration noise and minibatch order.
    seed: int = 0
    # Torch threads of each rollout process and of the learner.
    threads_per_process: int = 1
    learner_threads: int = 2

    def __post_init__(self) -> None:
        if self.num_train_processes < 1:
            raise UserError(f"--num-train-processes must be at least 1 (got "
                            f"{self.num_train_processes}).")
        for name in ("num_prompts", "episodes_per_update", "max_updates", "ppo_epochs",
                     "num_minibatches", "save_every", "threads_per_process", "learner_threads",
                     "critic_hidden_dim", "bc_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 "
                                f"(got {getattr(self, name)}).")
        for name in ("max_env_steps", "critic_warmup_updates", "keep_last", "entropy_coef",
                     "shaped_reward_scale", "target_kl", "val_every", "bc_coef"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0.")
        for name in ("actor_lr", "critic_lr", "clip", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive.")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1].")
        if self.num_minibatches > self.episodes_per_update:
            raise UserError(f"--num-minibatches {self.num_minibatches} exceeds "
                            f"--episodes-per-update {self.episodes_per_update}.")


# ------------------------------------------------------------------------ distributions


class ChunkDistribution(nn.Module):
    """The policy's distribution over normalised chunks (N, K, A) given features (N, D)."""

    def __init__(self, head: nn.Module, init_log_std: float, learn_log_std: bool,
                 what: str = "the checkpoint") -> None:
        super().__init__()
        self.head = head
        if isinstance(head, MLPHead):
            self.log_std = nn.Parameter(torch.full((head.chunk_dim,), float(init_log_std)),
                                        requires_grad=learn_log_std)
        elif isinstance(head, GMMHead):
            self.log_std = None
        else:
            raise UserError(
                f"PPO needs the likelihood of the policy's actions, and {what} has a "
                f"{type(head).__name__.removesuffix('Head').lower()} head, whose likelihood is "
                f"intractable; fine-tune an mlp or gmm head checkpoint with PPO, or improve "
                f"this one with scripts/dagger.py (any head).")

    def _gaussian(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.head.net(hidden)  # (N, K*A)
        return mean, self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).expand_as(mean)

    def log_prob(self, hidden: Tensor, chunk: Tensor) -> Tensor:
        """(N, D), (N, K, A) -> (N,) log-density of the flattened chunk."""
        x = chunk.flatten(1)
        if self.log_std is None:
            log_w, means, log_stds = self.head.distribution(hidden)
            z = (x[:, None] - means) * torch.exp(-log_stds)
            lp = (-0.5 * z.square() - log_stds - 0.5 * math.log(2 * math.pi)).sum(-1)
            return torch.logsumexp(log_w + lp, dim=-1)
        mean, log_std = self._gaussian(hidden)
        z = (x - mean) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    @torch.no_grad()
    def sample(self, hidden: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A chunk (N, K, A) drawn with ``generator`` and its log-density (N,)."""
        head = self.head
        if self.log_std is None:
            chunk = head.sample(hidden, generator=generator)
        else:
            mean, log_std = self._gaussian(hidden)
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            chunk = (mean + log_std.exp() * noise.to(mean.device)).view(
                -1, head.num_pred_steps, head.action_dim)
        return chunk, self.log_prob(hidden, chunk)

    def entropy(self, hidden: Tensor, log_prob: Tensor) -> Tensor:
        """(N,) entropy: exact for the Gaussian, the sample estimate -log p for a mixture."""
        if self.log_std is None:
            return -log_prob
        _, log_std = self._gaussian(hidden)
        return (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)


class Critic(nn.Module):
    """V(s): an MLP over its input (N, F) and the fraction of the step limit used (N,)."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = mlp(in_dim + 1, hidden_dim, 1, 2)

    def forward(self, x: Tensor, time_frac: Tensor) -> Tensor:
        return self.net(torch.cat([x, time_frac[:, None].to(x.dtype)], dim=-1))[:, 0]


# ------------------------------------------------------------------------ rollouts


@dataclass(frozen=True)
class _RLEpisode:
    task: str
    index: int  # global episode number of the run
    seed: int  # simulator layout
    noise_seed: int  # exploration noise
    prompts: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class _RolloutJob:
    checkpoint: str
    weights: str  # safetensors of the current policy (and its log-std)
    version: int
    env: str
    env_kwargs: tuple[tuple[str, Any], ...]
    policy_kwargs: tuple[tuple[str, Any], ...]
    init_log_std: float
    episodes: tuple[_RLEpisode, ...]
    greedy: bool = False  # act with the mean chunk (validation), record nothing to learn from


_WORKER: dict[str, Any] = {}


def _worker_init(threads: int) -> None:
    import warnings

    os.environ.setdefault("MUJOCO_GL", "egl")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)


def _actor(job: _RolloutJob) -> tuple[Any, ChunkDistribution]:
    """This process's policy and distribution at ``job``'s weights (loaded when they change)."""
    from safetensors.torch import load_file

    from icrt.eval.inference import InContextPolicy

    if _WORKER.get("checkpoint") != (job.checkpoint, job.policy_kwargs):
        model, ckpt = load_policy(job.checkpoint)
        _WORKER["policy"] = InContextPolicy(model, ckpt, **dict(job.policy_kwargs))
        _WORKER["dist"] = ChunkDistribution(model.head, job.init_log_std, False)
        _WORKER["checkpoint"] = (job.checkpoint, job.policy_kwargs)
        _WORKER.pop("version", None)
    policy, dist = _WORKER["policy"], _WORKER["dist"]
    if _WORKER.get("version") != (job.weights, job.version):
        state = load_file(job.weights)
        log_std = state.pop("__log_std__", None)
        policy.model.load_state_dict(state)
        if log_std is not None and dist.log_std is not None:
            dist.log_std.data.copy_(log_std)
        _WORKER["version"] = (job.weights, job.version)
    return policy, dist


def _demos(paths: tuple[tuple[str, int], ...], stores: dict) -> list[dict[str, np.ndarray]]:
    from icrt.data.store import EpisodeStore

    out = []
    for path, index in paths:
        if path not in stores:
            stores[path] = EpisodeStore.open(path)
        out.append(stores[path].episode(index))
    return out


def run_rl_episode(policy: Any, dist: ChunkDistribution, env: Any, ep: _RLEpisode,
                   demos: list[dict[str, np.ndarray]], greedy: bool = False) -> dict[str, Any]:
    """One prompted episode acting with chunks drawn from ``dist``; what the update needs
    (``greedy``: acting with the head's own chunk, as evaluation does; success and length)."""
    policy.prompt(demos)
    policy.reset(seed=ep.noise_seed)
    generator = torch.Generator().manual_seed(ep.noise_seed)
    obs = env.reset(ep.seed)
    runner = EpisodeRunner(env, obs)
    keys = [*policy.spec.proprio_keys,
            *[policy._camera_key(obs, k) for k in policy.spec.camera_keys]]
    steps: dict[str, list] = {k: [] for k in keys}
    executed, chunks, log_probs, offsets, rewards = [], [], [], [], []
    prompt_len = len(policy._prompt_tokens)
    with torch.no_grad():
        while greedy and not runner.done:
            runner.step(policy.act(runner.obs))
        while not runner.done:
            for k in keys:
                steps[k].append(np.asarray(runner.obs[k]))
            policy._append_observation(runner.obs)
            hidden = policy._context_hidden()  # applies the overflow rule first
            offsets.append(policy._offset)
            chunk, lp = dist.sample(hidden[None], generator)
            action = policy._action_from(hidden, chunk[0])
            executed.append(policy._pending_action)
            chunks.append(chunk[0].numpy())
            log_probs.append(float(lp[0]))
            runner.step(action)
            rewards.append(1.0 if runner.ep.success_step == runner.ep.length else 0.0)
    result = runner.finish()
    if greedy:
        return {"task": ep.task, "index": ep.index, "success": bool(result.success),
                "length": int(result.length)}
    return {
        "task": ep.task, "index": ep.index, "seed": ep.seed, "prompts": ep.prompts,
        "obs": {k: np.stack(v) for k, v in steps.items()},
        "executed": np.stack(executed),  # (T, A') raw, 6D layout
        "chunks": np.stack(chunks).astype(np.float32),  # (T, K, A) normalised, drawn
        "log_probs": np.asarray(log_probs, np.float32),
        "offsets": np.asarray(offsets, np.int64),
        "prompt_tokens": prompt_len,
        "rewards": np.asarray(rewards, np.float32),  # sparse
        "env_rewards": np.asarray(runner._rewards[: len(rewards)], np.float32),
        "success": bool(result.success),
        "length": int(result.length),
        "max_steps": int(env.max_steps),
    }


def _rollout(job: _RolloutJob) -> list[dict[str, Any]]:
    policy, dist = _actor(job)
    envs = _WORKER.setdefault("envs", {})
    stores = _WORKER.setdefault("stores", {})
    out = []
    for ep in job.episodes:
        key = (job.env, ep.task, job.env_kwargs)
        if key not in envs:
            envs[key] = make_env(job.env, ep.task, **dict(job.env_kwargs))
        out.append(run_rl_episode(policy, dist, envs[key], ep, _demos(ep.prompts, stores),
                                  job.greedy))
    return out


# ------------------------------------------------------------------------ the update


def episode_features(policy: Any, ep: dict[str, Any], demos: list[dict]) -> Tensor:
    """The backbone's features (T, D) at the episode's state tokens, recomputed from its
    observations and executed actions over the same context windows the rollout used."""
    model = policy.model
    T = ep["length"]
    prompt = policy.demo_tokens(demos)  # (P, D)
    if len(prompt) != ep["prompt_tokens"]:
        raise RuntimeError("the prompt's tokens differ from the rollout's")
    inputs = policy._obs_tensors(ep["obs"], T)
    s = model.state_tokens(inputs)  # (1, T, D)
    a = model.action_tokens(policy._action_inputs(ep["executed"]))  # (1, T, D)
    tokens = torch.cat([prompt, model.interleave(s, a)[0, : 2 * T - 1]])  # ... s_{T-1}
    P = len(prompt)
    offsets = torch.as_tensor(ep["offsets"])
    hidden = torch.zeros(T, model.d_model, device=tokens.device)
    for off in torch.unique(offsets).tolist():  # one forward per context window
        idx = torch.nonzero(offsets == off)[:, 0]
        end = P + 2 * int(idx.max()) + 1
        h = model.backbone(tokens[off:end][None].to(policy.dtype))[0].float()
        hidden = hidden.index_copy(0, idx, h[P + 2 * idx - off])
    return model.head_input(hidden[None], inputs)[0]


def episode_rewards(ep: dict[str, Any], cfg: PPOConfig) -> np.ndarray:
    """The rewards PPO learns from: sparse success, plus (``--reward shaped``) the shaping
    gamma*phi(s_{t+1}) - phi(s_t) with phi(s_{t+1}) = scale * the simulator's reward of step
    t (and phi(s_0) = phi(s_1), the first state's own potential being unknown)."""
    if cfg.reward == "sparse":
        return ep["rewards"]
    phi = cfg.shaped_reward_scale * ep["env_rewards"].astype(np.float64)  # phi(s_1..s_T)
    before = np.concatenate([phi[:1], phi[:-1]])  # phi(s_0..s_{T-1})
    return (ep["rewards"] + cfg.gamma * phi - before).astype(np.float32)


def gae(rewards: np.ndarray, values: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """Advantages of one episode that ends in a terminal state (success or the step limit,
    which the time input of the critic makes terminal)."""
    adv = np.zeros_like(rewards)
    last = 0.0
    for t in reversed(range(len(rewards))):
        next_v = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def _bc_dataset(ckpt: Any) -> Any:
    """The checkpoint's training sequences, as its training run built them."""
    from icrt.data.sequence import SequenceDataset

    cfg = ckpt.config
    path = cfg.dataset_cfg.dataset_json
    if not Path(path).is_file():
        raise UserError(f"The behaviour-cloning loss needs checkpoint '{ckpt.path}''s training "
                        f"data '{path}', which is missing; run from where it was trained, or "
                        f"pass --bc-coef 0.")
    split = ckpt.path.parent / "split.json"
    return SequenceDataset(cfg.dataset_cfg, cfg.shared_cfg, "train",
                           split_file=split if split.is_file() else None,
                           use_cached_features=cfg.model_cfg.vision_encoder_cfg.use_cached_features)


class PPOLearner:
    """The actor (policy + distribution), the critic, their optimisers and the update."""

    def __init__(self, policy: Any, cfg: PPOConfig) -> None:
        self.policy, self.cfg = policy, cfg
        self.model = policy.model
        self.dist = ChunkDistribution(self.model.head, cfg.init_log_std, cfg.learn_log_std,
                                      f"checkpoint '{policy.checkpoint.path}'")
        in_dim = self.model.d_model if cfg.critic == "features" else self.model.spec.proprio_dim
        if cfg.critic == "obs" and self.model.spec.camera_keys:
            log.info("the obs critic sees the proprio keys only, not the cameras")
        self.critic = Critic(in_dim, cfg.critic_hidden_dim)
        actor_params = [p for p in self.model.parameters() if p.requires_grad]
        if self.dist.log_std is not None and self.dist.log_std.requires_grad:
            actor_params.append(self.dist.log_std)
        self.actor_params = actor_params
        self.actor_opt = torch.optim.Adam(actor_params, lr=cfg.actor_lr, eps=1e-5)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr, eps=1e-5)
        self._stores: dict[str, Any] = {}
        self.bc_data = _bc_dataset(policy.checkpoint) if cfg.bc_coef > 0 else None

    def bc_loss(self, update: int, step: int) -> Tensor:
        """The imitation loss on a batch of the checkpoint's training sequences (a fixed
        function of the update and the actor step, so a resumed run draws the same)."""
        ds = self.bc_data
        ds.set_epoch(update)
        rng = np.random.default_rng([self.cfg.seed, update, step, 13])
        idx = rng.choice(len(ds), self.cfg.bc_batch_size, replace=len(ds) < self.cfg.bc_batch_size)
        batch = torch.utils.data.default_collate([ds[int(i)] for i in idx])
        return self.model(batch)["loss"]

    def critic_input(self, ep: dict[str, Any], hidden: Tensor) -> Tensor:
        if self.cfg.critic == "features":
            return hidden.detach()
        return self.policy._obs_tensors(ep["obs"], ep["length"])["proprio"][0]

    def demos(self, ep: dict[str, Any]) -> list[dict]:
        return _demos(tuple(tuple(p) for p in ep["prompts"]), self._stores)

    def update(self, episodes: list[dict[str, Any]], update: int, actor_frozen: bool
               ) -> dict[str, float]:
        cfg = self.cfg
        self.model.eval()  # no dropout: the ratio must be exactly 1 before the first step
        # 1) values of the rollout's states -> advantages and returns
        cached, adv_all, ret_all = [], [], []
        with torch.no_grad():
            for ep in episodes:
                h = episode_features(self.policy, ep, self.demos(ep))
                tf = torch.arange(ep["length"], dtype=torch.float32) / ep["max_steps"]
                x = self.critic_input(ep, h)
                v = self.critic(x, tf).numpy()
                adv = gae(episode_rewards(ep, cfg), v, cfg.gamma, cfg.gae_lambda)
                adv_all.append(adv)
                ret_all.append(adv + v)
                cached.append((x, tf))
        flat = np.concatenate(adv_all)
        std = flat.std() if flat.size > 1 else 1.0
        adv_norm = [(a - flat.mean()) / (std + 1e-8) for a in adv_all]
        # 2) epochs of minibatches of episodes
        rng = np.random.default_rng([cfg.seed, update, 11])
        stats: dict[str, list[float]] = {"value_loss": [], "policy_loss": [], "clip_frac": [],
                                         "approx_kl": [], "entropy": []}
        first_ratio_dev = None
        kl_stop, actor_steps = False, 0
        for _ in range(cfg.ppo_epochs):
            order = rng.permutation(len(episodes))
            for mb in np.array_split(order, cfg.num_minibatches):
                n_steps = sum(episodes[i]["length"] for i in mb)
                self.actor_opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                mb_dev = 0.0
                for i in mb:
                    ep = episodes[i]
                    w = ep["length"] / n_steps
                    ret = torch.from_numpy(ret_all[i])
                    if actor_frozen or kl_stop:  # no actor step: the cached critic input serves
                        x, tf = cached[i]
                    else:
                        h = episode_features(self.policy, ep, self.demos(ep))
                        tf = cached[i][1]
                        x = self.critic_input(ep, h)
                        adv = torch.from_numpy(adv_norm[i])
                        lp = self.dist.log_prob(h, torch.from_numpy(ep["chunks"]))
                        log_ratio = lp - torch.from_numpy(ep["log_probs"])
                        ratio = log_ratio.exp()
                        surrogate = torch.minimum(
                            ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
                        entropy = self.dist.entropy(h, lp)
                        actor_loss = -surrogate.mean() - cfg.entropy_coef * entropy.mean()
                        (w * actor_loss).backward()
                        with torch.no_grad():
                            mb_dev = max(mb_dev, float((ratio - 1).abs().max()))
                            stats["policy_loss"].append(float(-surrogate.mean()))
                            stats["clip_frac"].append(
                                float(((ratio - 1).abs() > cfg.clip).float().mean()))
                            stats["approx_kl"].append(
                                float(((ratio - 1) - log_ratio).mean()))
                            stats["entropy"].append(float(entropy.mean()))
                    value_loss = 0.5 * (self.critic(x, tf) - ret).square().mean()
                    (w * value_loss).backward()
                    stats["value_loss"].append(float(value_loss.detach()))
                if first_ratio_dev is None and not actor_frozen:
                    first_ratio_dev = mb_dev
                if not (actor_frozen or kl_stop):
                    # the KL of this minibatch, before its step: past the target, stop here
                    kl_stop = bool(cfg.target_kl) and float(
                        np.mean(stats["approx_kl"][-len(mb):])) > cfg.target_kl
                    if not kl_stop:
                        if self.bc_data is not None:
                            bc = self.bc_loss(update, actor_steps)
                            (cfg.bc_coef * bc).backward()
                            stats.setdefault("bc_loss", []).append(float(bc.detach()))
                        nn.utils.clip_grad_norm_(self.actor_params, cfg.max_grad_norm)
                        self.actor_opt.step()
                        actor_steps += 1
                nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
                self.critic_opt.step()
        out = {k: float(np.mean(v)) for k, v in stats.items() if v}
        if first_ratio_dev is not None:
            out["first_minibatch_max_ratio_dev"] = first_ratio_dev
            out["actor_steps"] = actor_steps
        if self.dist.log_std is not None:
            out["std"] = float(self.dist.log_std.detach().exp().mean())
        return out

    # -------------------------------------------------------------- state for checkpoints

    def train_state(self, update: int, env_steps: int) -> dict[str, Any]:
        return {"epoch": update, "step": update, "env_steps": env_steps,
                "actor_optimizer": self.actor_opt.state_dict(),
                "critic_optimizer": self.critic_opt.state_dict(),
                "critic": self.critic.state_dict(),
                "log_std": (self.dist.log_std.detach().clone()
                            if self.dist.log_std is not None else torch.zeros(0))}

    def load_train_state(self, state: dict[str, Any]) -> None:
        self.actor_opt.load_state_dict(state["actor_optimizer"])
        self.critic_opt.load_state_dict(state["critic_optimizer"])
        self.critic.load_state_dict(state["critic"])
        if self.dist.log_std is not None:
            self.dist.log_std.data.copy_(state["log_std"])


# ------------------------------------------------------------------------ the run


@dataclass
class _Plan:
    env: str
    tasks: list[str]
    env_kwargs: dict[str, Any]
    pool: dict[str, list[tuple[str, int]]]
    layouts: dict[str, list[int]] = field(default_factory=dict)


def _plan(cfg: PPOConfig, ckpt: Any) -> _Plan:
    from icrt.eval.rollout import _prompt_pool, _training_episodes, checkpoint_env

    if not cfg.prompt_dataset:
        raise UserError("Give held-out demonstrations to prompt the RL episodes with "
                        "--prompt-dataset D.json (e.g. data/mw5_prompts.json).")
    spec = ckpt.spec
    trained_env = spec.env.get("name")
    if cfg.env and trained_env and cfg.env != trained_env:
        raise UserError(f"Checkpoint '{ckpt.path}' was trained on {trained_env} data, not "
                        f"{cfg.env}; fine-tune it in {trained_env}.")
    env_name, tasks, env_kwargs = checkpoint_env(ckpt, cfg.env, cfg.tasks, cfg.max_steps)
    keys = [*spec.proprio_keys, *spec.action_keys, *spec.camera_keys]
    ecfg = EvalConfig(prompt_dataset=cfg.prompt_dataset, num_prompts=cfg.num_prompts)
    pool = _prompt_pool(ecfg, tasks, keys, _training_episodes(ckpt.path))
    plan = _Plan(env_name, tasks, env_kwargs, pool)
    if cfg.layouts == "dataset":
        from icrt.data.store import EpisodeStore

        for task in tasks:
            seeds = []
            for path, index in pool[task]:
                seed = int(EpisodeStore.open(path).episode_seed[index])
                if seed >= 0:
                    seeds.append(seed)
            if not seeds:
                raise UserError(f"Prompt dataset '{cfg.prompt_dataset}' records no layout "
                                f"(episode seed) for '{task}'; use --layouts fresh.")
            plan.layouts[task] = seeds
    return plan


def _episodes_of(cfg: PPOConfig, plan: _Plan, update: int) -> list[_RLEpisode]:
    out = []
    for j in range(cfg.episodes_per_update):
        task = plan.tasks[j % len(plan.tasks)]
        index = update * cfg.episodes_per_update + j
        rng = np.random.default_rng([cfg.seed, zlib.crc32(task.encode()), index, 5])
        pool = plan.pool[task]
        prompts = tuple(pool[k] for k in rng.choice(len(pool), cfg.num_prompts, replace=False))
        if plan.layouts:
            seeds = plan.layouts[task]
            seed = seeds[(index // len(plan.tasks)) % len(seeds)]
        else:
            seed = episode_seed(cfg.seed, "rl", task, index)
        noise_seed = int(rng.integers(2**31 - 1))
        out.append(_RLEpisode(task, index, seed, noise_seed, prompts))
    return out


def _validation_episodes(cfg: PPOConfig, plan: _Plan) -> list[_RLEpisode]:
    """Fixed layouts and prompts for validating the mean policy: indices from 2**30 of the RL
    seed stream, which training rollouts (indices 0, 1, ...) never reach."""
    out = []
    for task in plan.tasks:
        pool = plan.pool[task]
        for i in range(cfg.val_episodes):
            index = -1 - i
            rng = np.random.default_rng([cfg.seed, zlib.crc32(task.encode()), 2**20 + i, 6])
            prompts = tuple(pool[k] for k in rng.choice(len(pool), cfg.num_prompts,
                                                          replace=False))
            out.append(_RLEpisode(task, index, episode_seed(cfg.seed, "rl", task, 2**30 + i),
                                  int(rng.integers(2**31 - 1)), prompts))
    return out


def _recorded(cfg: PPOConfig) -> dict[str, Any]:
    """What must match to resume a run (everything but where and how fast it runs)."""
    d = asdict(cfg)
    for k in ("output_dir", "num_train_processes", "threads_per_process", "learner_threads",
              "max_updates", "max_env_steps", "save_every", "keep_last", "val_every",
              "val_episodes"):
        d.pop(k)
    d["il_ckpt_path"] = str(Path(cfg.il_ckpt_path).resolve())
    return d


def _plot(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rollouts = [h for h in history if "success_rate" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([h["env_steps"] for h in rollouts], [100 * h["success_rate"] for h in rollouts],
            "o-", ms=3,
            label="rollout success (exploring)")
    val = [(h["env_steps"], 100 * h["val_success"]) for h in history if "val_success" in h]
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "s-", ms=4,
                label="validation success (mean action)")
    warm = [h["env_steps"] for h in history if h["critic_warmup"]]
    if warm:
        ax.axvspan(0, max(warm), color="0.9", label="critic warm-up")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("success (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _validate(results: list[dict[str, Any]], tasks: list[str]) -> dict[str, float]:
    out = {"val_success": float(np.mean([r["success"] for r in results]))}
    for task in tasks:
        out[f"val_success/{task}"] = float(np.mean([r["success"] for r in results
                                                    if r["task"] == task]))
    return out


def finetune(cfg: PPOConfig, progress: bool = True) -> dict[str, Any]:
    """Run PPO; returns the history (one record per update)."""
    from safetensors.torch import save_file
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from icrt.eval.inference import InContextPolicy

    if not cfg.il_ckpt_path:
        raise UserError("Give the imitation-learned checkpoint with --il-ckpt-path DIR.")
    if not cfg.output_dir:
        raise UserError("Give the run directory with --output-dir DIR.")
    ckpt = read_checkpoint(cfg.il_ckpt_path)
    problem = verify_checkpoint(ckpt.path, thorough=False)
    if problem:
        raise UserError(f"Checkpoint '{ckpt.path}' is damaged ({problem}).")
    model, ckpt = load_policy(ckpt.path)
    if model.spec.window is not None:
        raise UserError(f"Checkpoint '{ckpt.path}' uses a sliding window; PPO fine-tuning "
                        f"recomputes whole contexts and supports unwindowed policies only.")
    ChunkDistribution(model.head, cfg.init_log_std, False, f"checkpoint '{ckpt.path}'")
    plan = _plan(cfg, ckpt)
    run_dir = check_output_dir(cfg.output_dir, "--output-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    record = _recorded(cfg)
    rec_path = run_dir / "rl_config.json"
    if rec_path.is_file():
        old = json.loads(rec_path.read_text())
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        if diff:
            raise UserError(f"'{run_dir}' holds a PPO run with other settings "
                            f"({', '.join(diff)}); use another --output-dir.")
    else:
        atomic_write_text(rec_path, json.dumps(record, indent=1) + "\n")
    split = ckpt.path.parent / "split.json"  # which prompts were training episodes
    if split.is_file() and not (run_dir / "split.json").exists():
        shutil.copy(split, run_dir / "split.json")

    torch.set_num_threads(cfg.learner_threads)
    torch.manual_seed(cfg.seed)
    policy_kwargs = (("execution", cfg.execution), ("open_loop_steps", cfg.open_loop_steps),
                     ("ensemble_decay", cfg.ensemble_decay))
    policy = InContextPolicy(model, ckpt, use_cache=False, **dict(policy_kwargs))
    learner = PPOLearner(policy, cfg)
    start, env_steps, history = 0, 0, []
    last = resume_checkpoint(run_dir) if any(run_dir.glob("checkpoint-*")) else None
    if last is not None:
        resumed = read_checkpoint(last)
        from icrt.train.checkpoint import load_checkpoint_weights

        load_checkpoint_weights(model, resumed)
        state = resumed.train_state()
        learner.load_train_state(state)
        start, env_steps = int(state["epoch"]), int(state["env_steps"])
        history = json.loads((last / "rl_history.json").read_text())
        log.info("resuming %s after update %d (%d environment steps)", run_dir, start,
                 env_steps)
    tb = SummaryWriter(str(run_dir / "tensorboard"))
    text_log = open(run_dir / "log.txt", "a", buffering=1)
    weights = run_dir / ".rollout_policy.safetensors"
    title = f"PPO from {ckpt.path.parent.name}/{ckpt.path.name}: {', '.join(plan.tasks)}"
    bar = tqdm(total=cfg.max_updates, initial=start, desc="ppo", unit="update",
               disable=not progress)
    pool = worker_pool(cfg.num_train_processes, _worker_init, (cfg.threads_per_process,))
    val_eps = _validation_episodes(cfg, plan)

    def publish() -> None:  # the current weights, for the rollout processes
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if learner.dist.log_std is not None:
            state["__log_std__"] = learner.dist.log_std.detach().clone()
        with atomic_path(weights) as tmp:
            save_file(state, str(tmp))

    def run(eps: list[_RLEpisode], version: int, greedy: bool = False) -> list[dict[str, Any]]:
        """Episodes spread over the rollout processes at the published weights (``version``
        tells a process whether to reload them)."""
        n = cfg.num_train_processes
        jobs = [_RolloutJob(str(ckpt.path), str(weights), version, plan.env,
                            tuple(sorted(plan.env_kwargs.items())), policy_kwargs,
                            cfg.init_log_std, tuple(eps[i::n]), greedy)
                for i in range(n) if eps[i::n]]
        out = []
        for f in as_completed([pool.submit(_rollout, j) for j in jobs]):
            out += f.result()
        return sorted(out, key=lambda r: r["index"])
    try:
        for update in range(start, cfg.max_updates):
            if cfg.max_env_steps and env_steps >= cfg.max_env_steps:
                break
            t0 = time.perf_counter()
            publish()
            if cfg.val_every and update == 0 and not history:  # the starting checkpoint
                val = _validate(run(val_eps, update, greedy=True), plan.tasks)
                history.append({"update": 0, "env_steps": 0, "critic_warmup": True, **val})
                text_log.write(json.dumps(history[-1]) + "\n")
                for k, v in val.items():
                    tb.add_scalar(k if "/" in k else f"ppo/{k}", v, 0)
            episodes = run(_episodes_of(cfg, plan, update), update)
            t1 = time.perf_counter()
            warm = update < cfg.critic_warmup_updates
            losses = learner.update(episodes, update, actor_frozen=warm)
            env_steps += sum(e["length"] for e in episodes)
            rec = {"update": update + 1, "env_steps": env_steps,
                   "success_rate": float(np.mean([e["success"] for e in episodes])),
                   "mean_length": float(np.mean([e["length"] for e in episodes])),
                   "mean_return": float(np.mean([episode_rewards(e, cfg).sum()
                                                 for e in episodes])),
                   "critic_warmup": warm, "rollout_seconds": t1 - t0,
                   "update_seconds": time.perf_counter() - t1, **losses}
            for task in plan.tasks:
                rec[f"success/{task}"] = float(np.mean(
                    [e["success"] for e in episodes if e["task"] == task]))
            if cfg.val_every and (update + 1) % cfg.val_every == 0:
                publish()
                t2 = time.perf_counter()
                rec.update(_validate(run(val_eps, update + 1, greedy=True), plan.tasks))
                rec["val_seconds"] = time.perf_counter() - t2
            history.append(rec)
            text_log.write(json.dumps(rec) + "\n")
            for k, v in rec.items():
                if k != "update" and isinstance(v, (int, float)):
                    tb.add_scalar(k if "/" in k else f"ppo/{k}", v, env_steps)
            done = update + 1 == cfg.max_updates or (
                cfg.max_env_steps and env_steps >= cfg.max_env_steps)
            if (update + 1) % cfg.save_every == 0 or done:
                save_checkpoint(run_dir / f"checkpoint-{update + 1}", model, ckpt.config,
                                ckpt.normalizer, learner.train_state(update + 1, env_steps),
                                extra_files={"rl_history.json": json.dumps(history) + "\n"})
                if cfg.keep_last:
                    prune_checkpoints(run_dir, cfg.keep_last)
                _plot(history, run_dir / "success_curve.png", title)
            bar.update(1)
            bar.set_postfix(success=f"{rec['success_rate']:.2f}", steps=env_steps,
                            warmup=warm, **({"val": f"{rec['val_success']:.2f}"}
                                            if "val_success" in rec else {}))
    finally:
        bar.close()
        pool.shutdown(cancel_futures=True)
        tb.close()
        text_log.close()
        weights.unlink(missing_ok=True)
    return {"run_dir": str(run_dir), "history": history}
