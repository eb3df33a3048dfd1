"""The in-context policy: observations and actions -> interleaved tokens -> backbone -> head.

Per timestep t the policy builds a state token from the observation and an action token from
the action taken, and the causal backbone reads

    [prompt traj 1: s0 a0 s1 a1 ...] [prompt traj 2 ...] [query: s0 a0 ... st]

The head reads the backbone's feature at each state token and predicts the chunk
a_t .. a_{t+K-1}. The same module serves training (``forward`` on whole sequences) and acting
(``state_tokens`` / ``action_tokens`` fed one at a time through the backbone's KV cache).

    spec = PolicySpec(proprio_dim=39, action_dim=4, num_pred_steps=4, max_timesteps=256)
    policy = ICRTPolicy(cfg.model_cfg, spec)
    out = policy(batch)          # {"loss": ..., "action_loss": ..., "num_supervised": ...}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icrt.config import ModelConfig
from icrt.errors import UserError
from icrt.models.backbones import build_backbone
from icrt.models.backbones.llama import context_mask
from icrt.models.backbones.pretrained import apply_lora
from icrt.models.encoders.vision import ObservationEncoder
from icrt.models.heads import build_head
from icrt.models.pointer import ObjectPointer


@dataclass(frozen=True)
class PolicySpec:
    """What the data fixes about a policy: sizes, keys and context length.

    Saved in every checkpoint's ``stats.json`` (with the normaliser) so a checkpoint can be
    rebuilt, and checked against an environment, without the training data.
    """

    proprio_dim: int
    action_dim: int
    num_pred_steps: int
    max_timesteps: int  # context length in timesteps (2 tokens each)
    camera_keys: tuple[str, ...] = ()
    image_shape: tuple[int, ...] | None = None  # (H, W, 3) of the camera keys
    proprio_keys: tuple[str, ...] = ()
    action_keys: tuple[str, ...] = ()
    key_meta: dict[str, Any] = field(default_factory=dict)  # per-key rotation/delta metadata
    rot_6d: bool = False
    use_delta_action: bool = False
    tasks: tuple[str, ...] = ()
    env: dict[str, Any] = field(default_factory=dict)  # the stores' simulator description
    # sliding-window attention: each query step sees the prompt and the last N query steps
    window: int | None = None
    # False: trained without prompts (behaviour cloning, one trajectory per context)
    in_context: bool = True
    # low-dim values whose final value the goal loss predicts (--dataset-cfg.goal-dims)
    goal_dims: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicySpec:
        d = dict(d)
        for name in ("camera_keys", "proprio_keys", "action_keys", "tasks", "goal_dims"):
            d[name] = tuple(d.get(name, ()))
        if d.get("image_shape") is not None:
            d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)


class ICRTPolicy(nn.Module):
    def __init__(self, model_cfg: ModelConfig, spec: PolicySpec, vision_aug: bool = False):
        super().__init__()
        cfg = model_cfg.policy_cfg
        self.cfg = cfg
        self.spec = spec
        self.backbone = build_backbone(cfg, max_seq_len=2 * spec.max_timesteps)
        if cfg.phase == "finetune" and cfg.scratch_config is not None:
            # ICRT's finetune phase: only LoRA adapters, biases and norms of the backbone train
            apply_lora(self.backbone, cfg.lora_rank, cfg.lora_layer_idxs, cfg.lora_alpha,
                       cfg.lora_dropout, cfg.lora_targets, cfg.lora_bias)
        d = self.backbone.d_model
        self.d_model = d
        # low-dim MLP, or cameras pooled with the proprio token (timm loads only with cameras)
        self.state_encoder = ObservationEncoder(
            model_cfg.vision_encoder_cfg, cfg, spec.camera_keys, spec.proprio_dim, d, vision_aug
        )
        self.action_encoder = nn.Sequential(
            nn.Linear(spec.action_dim, d), nn.GELU(), nn.Linear(d, d)
        )
        if cfg.modality_pos_emb:
            self.state_emb = nn.Parameter(torch.randn(d) * 0.02)
            self.action_emb = nn.Parameter(torch.randn(d) * 0.02)
        if cfg.prompt_pos_emb:
            self.prompt_emb = nn.Parameter(torch.randn(d) * 0.02)
        self.head = build_head(cfg, d, spec.action_dim, spec.num_pred_steps)
        self.pointer = (_object_pointer(cfg.object_slots, spec, d, cfg.factored_head)
                        if cfg.object_slots else None)
        if cfg.goal_loss_weight:
            if not spec.goal_dims:
                raise UserError("--model-cfg.policy-cfg.goal-loss-weight needs "
                                "--dataset-cfg.goal-dims.")
            self.goal_head = nn.Linear(d, len(spec.goal_dims))
        if cfg.goal_conditioned:  # starts at zero: a checkpoint without it loads unchanged
            self.goal_in = nn.Linear(len(spec.goal_dims), d)
            nn.init.zeros_(self.goal_in.weight)
            nn.init.zeros_(self.goal_in.bias)

    # ------------------------------------------------------------------ tokens

    def state_tokens(self, obs: dict[str, Tensor], train_aug: bool = False) -> Tensor:
        """Observation dict of (B, T, ...) tensors -> (B, T, D) state tokens."""
        s = self.state_encoder(obs, train_aug=train_aug)
        return s + self.state_emb if self.cfg.modality_pos_emb else s

    def action_tokens(self, action: Tensor) -> Tensor:
        """(B, T, A) normalised actions -> (B, T, D) action tokens."""
        a = self.action_encoder(action)
        return a + self.action_emb if self.cfg.modality_pos_emb else a

    def mark_prompt(self, tokens: Tensor, prompt_mask: Tensor) -> Tensor:
        """Add the prompt embedding to tokens (B, T, D) where prompt_mask (B, T) is True."""
        if not self.cfg.prompt_pos_emb:
            return tokens
        return tokens + prompt_mask[..., None].to(tokens.dtype) * self.prompt_emb

    def head_input(self, hidden: Tensor, obs: dict[str, Tensor],
                   goal: Tensor | None = None) -> Tensor:
        """Features (..., D) at state tokens -> what the head reads: the same, or with the
        object pointer's read of those steps' objects (``obs["proprio"]`` (..., P)), and with
        a goal-conditioned head the step to ``goal`` (normalised goal dims; default: the goal
        head's prediction)."""
        features = hidden if self.pointer is None else self.pointer(hidden, obs["proprio"])
        if not self.cfg.goal_conditioned:
            return features
        return self._add_goal_step(features, obs["proprio"],
                                   self.goal_head(hidden) if goal is None else goal)

    def _add_goal_step(self, features: Tensor, proprio: Tensor, goal: Tensor) -> Tensor:
        """The goal-conditioned head's input: ``features`` plus the embedded step from the
        current position (``proprio``'s goal dims) to ``goal``, all normalised."""
        here = proprio[..., list(self.spec.goal_dims)]
        return features + self.goal_in(goal.to(here.dtype) - here)

    @staticmethod
    def interleave(states: Tensor, actions: Tensor) -> Tensor:
        """(B, T, D) states and actions -> (B, 2T, D) as s0 a0 s1 a1 ..."""
        B, T, D = states.shape
        return torch.stack([states, actions], dim=2).reshape(B, 2 * T, D)

    # ------------------------------------------------------------------ training

    def attention_mask(self, batch: dict[str, Tensor]) -> Tensor | None:
        """The token mask of a training batch: sliding window over the query (the prompt
        always visible) and, without prompts, each trajectory on its own; None for plain
        causal attention."""
        context = batch.get("context_id")
        if self.spec.window is None and context is None:
            return None
        B, T = batch["prompt_mask"].shape
        steps = torch.arange(T, device=batch["prompt_mask"].device).repeat_interleave(2)
        prompt = batch["prompt_mask"].repeat_interleave(2, dim=1)
        if context is not None:
            context = context.repeat_interleave(2, dim=1)
        return context_mask(steps[None].expand(B, -1), prompt, context, self.spec.window)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Masked, weighted chunk loss over a batch of sequences (see icrt.data.sequence)."""
        states = self.state_tokens(batch, train_aug=self.training)  # (B, T, D)
        actions = self.action_tokens(batch["action"])  # (B, T, D)
        tokens = self.interleave(self.mark_prompt(states, batch["prompt_mask"]),
                                 self.mark_prompt(actions, batch["prompt_mask"]))
        hidden = self.backbone(tokens, mask=self.attention_mask(batch))[:, 0::2]  # (B, T, D)
        features, pointer_logits = hidden, None  # what the head reads
        if self.pointer is not None:
            features, pointer_logits = self.pointer(hidden, batch["proprio"], with_logits=True)
        if self.cfg.goal_loss_weight and "goal" not in batch:  # also what goal-conditioned needs
            raise UserError("--model-cfg.policy-cfg.goal-loss-weight needs the goal labels of "
                            "--dataset-cfg.goal-dims.")
        if self.cfg.goal_conditioned:  # the recorded end in training (teacher forcing)
            features = self._add_goal_step(features, batch["proprio"], batch["goal"])
        B, T, D = hidden.shape
        mask = batch["action_mask"].reshape(B * T, -1)  # (BT, K)
        weight = torch.ones(B * T, device=hidden.device)
        if self.cfg.step_weight != 1.0:
            weight = weight + (self.cfg.step_weight - 1.0) * batch["weighted_step"].reshape(-1)
        if self.cfg.no_prompt_loss:
            weight = weight * (~batch["prompt_mask"]).reshape(-1)
        if "loss_mask" in batch:  # DAgger: no loss on the policy's own steps
            weight = weight * batch["loss_mask"].reshape(-1)
        weight = weight * mask.any(-1)  # a chunk entirely past the episode end teaches nothing
        keep = weight > 0
        n = keep.sum()
        if n == 0:  # e.g. a window made only of prompt under no_prompt_loss
            # touch every trainable weight so DDP's gradient all-reduce still sees them all
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return {"loss": zero, "action_loss": zero.detach(), "num_supervised": n}
        per_sample = self.head.loss(
            features.reshape(B * T, D)[keep],
            batch["action_chunk"].reshape(B * T, *batch["action_chunk"].shape[2:])[keep],
            mask[keep],
        )
        w = weight[keep]
        action_loss = (per_sample * w).sum() / w.sum()
        loss = self.cfg.scale_loss * self.cfg.loss_w_action * action_loss
        out = {"action_loss": action_loss.detach(), "num_supervised": n}
        if self.cfg.pointer_loss_weight:
            pointer_loss = self._pointer_loss(pointer_logits, batch, keep)
            loss = loss + self.cfg.scale_loss * self.cfg.pointer_loss_weight * pointer_loss
            out["pointer_loss"] = pointer_loss.detach()
        if self.cfg.goal_loss_weight:
            pred = self.goal_head(hidden.reshape(B * T, D)[keep])
            goal_loss = (pred - batch["goal"].reshape(B * T, -1)[keep].to(pred.dtype)).abs().mean()
            loss = loss + self.cfg.scale_loss * self.cfg.goal_loss_weight * goal_loss
            out["goal_loss"] = goal_loss.detach()
        return {"loss": loss, **out}

    def _pointer_loss(self, logits: Tensor, batch: dict[str, Tensor], keep: Tensor) -> Tensor:
        """Cross-entropy of every pointer head's attention (logits (B*T, H, n)) against the
        object each supervised step's trajectory moves (``moved_object``, -1: unknown)."""
        if "moved_object" not in batch:
            raise UserError("--model-cfg.policy-cfg.pointer-loss-weight needs the moved-object "
                            "labels of --dataset-cfg.moved-object-slots.")
        label = batch["moved_object"].reshape(-1)
        use = keep & (label >= 0)
        if not use.any():
            return logits.sum() * 0.0
        H = logits.shape[1]
        return F.cross_entropy(logits[use].flatten(0, 1), label[use].repeat_interleave(H))

    # ------------------------------------------------------------------ acting

    def predict_chunk(
        self,
        hidden: Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> Tensor:
        """(N, D) state-token features -> (N, K, A) normalised action chunks."""
        return self.head.sample(hidden, generator=generator, deterministic=deterministic)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: no decay on norms, biases, embeddings and other 1-D parameters."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2 or "norm" in name or name.endswith(("_emb", ".bias")):
                no_decay.append(p)
            else:
                decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def _object_pointer(num_slots: int, spec: PolicySpec, d: int,
                    factored: bool = False) -> ObjectPointer:
    """The pointer over the last low-dim key's ``num_slots`` objects (one sentence when the
    data cannot be split that way)."""
    flag = "--model-cfg.policy-cfg.object-slots"
    if not spec.proprio_keys:
        raise UserError(f"{flag} needs low-dim keys; the data has none.")
    key = spec.proprio_keys[-1]
    meta = spec.key_meta.get(key, {})
    if "shape" not in meta:
        raise UserError(f"{flag}: the shape of the last low-dim key {key!r} is unknown.")
    if spec.rot_6d and meta.get("rotation"):
        raise UserError(f"{flag}: the last low-dim key {key!r} holds a rotation that "
                        f"--shared-cfg.rot-6d rewrites; put the object key last.")
    size = int(math.prod(meta["shape"]))
    if size % num_slots or size > spec.proprio_dim:
        raise UserError(f"{flag} {num_slots}: the last low-dim key {key!r} has {size} values, "
                        f"which do not split into {num_slots} equal objects.")
    return ObjectPointer(num_slots, size // num_slots, spec.proprio_dim - size, d,
                         residual=not factored)
