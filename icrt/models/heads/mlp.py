"""Deterministic regression head: an MLP predicts the whole chunk, trained with L1 or L2."""

from __future__ import annotations

import torch
from torch import Tensor

from icrt.config import PolicyConfig
from icrt.models.heads.base import ActionHead, masked_step_mean, mlp


class MLPHead(ActionHead):
    """hidden (N, D) -> MLP (GELU) -> (N, K, A); loss per ``cfg.mlp_loss``, masked."""

    stochastic = False

    def __init__(self, d_model: int, action_dim: int, num_pred_steps: int, cfg: PolicyConfig):
        super().__init__(d_model, action_dim, num_pred_steps, cfg)
        self.loss_type = cfg.mlp_loss
        self.net = mlp(d_model, cfg.head_hidden_dim, self.chunk_dim, cfg.head_num_layers)

    def _predict(self, hidden: Tensor) -> Tensor:
        return self.net(hidden).unflatten(-1, (self.num_pred_steps, self.action_dim))

    def loss(self, hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        err = self._predict(hidden) - target  # (N, K, A)
        per_step = err.abs() if self.loss_type == "l1" else err.square()
        return masked_step_mean(per_step.mean(-1), mask)  # (N,)

    def sample(
        self,
        hidden: Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> Tensor:
        return self._predict(hidden)  # (N, K, A)
