"""Flow-matching head: a velocity field transports Gaussian noise to action chunks.

Training samples the probability path ``x_t = alpha_t x1 + sigma_t x0`` (``x0 ~ N(0, I)``,
``x1`` the action chunk; ``flow_scheduler`` condot is the straight-line rectified flow) and
regresses its velocity. Sampling integrates ``dx/dt = v(x, t)`` from t=0 to 1 with
``flow_solver``: fewer network calls than diffusion for the same quality. Paths and solvers are
:mod:`icrt.generative.paths`, shared with the goal-mask model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from icrt.config import PolicyConfig
from icrt.generative.paths import FlowMatchingPath, PathConfig, SamplerConfig
from icrt.models.heads.base import (
    ActionHead,
    Denoiser,
    fill_masked_steps,
    initial_noise,
    masked_step_mean,
)

# The time t in [0, 1] is scaled before its sinusoidal embedding so the embedding's
# frequencies see the same range as integer diffusion timesteps.
TIME_SCALE = 1000.0


class FlowHead(ActionHead):
    """Conditional flow matching over the flattened (K*A) chunk."""

    def __init__(self, d_model: int, action_dim: int, num_pred_steps: int, cfg: PolicyConfig):
        super().__init__(d_model, action_dim, num_pred_steps, cfg)
        self.path = FlowMatchingPath(PathConfig(scheduler=cfg.flow_scheduler))
        self.sampler = SamplerConfig(method=cfg.flow_solver, atol=cfg.flow_tolerance,
                                     rtol=cfg.flow_tolerance)
        self.num_steps = cfg.flow_num_steps
        self.net = Denoiser(self.chunk_dim, d_model, cfg.head_hidden_dim, cfg.head_num_layers)

    def velocity(self, x: Tensor, t: Tensor, hidden: Tensor) -> Tensor:
        """v(x, t | hidden): x (N, K*A), t (N,) in [0, 1], hidden (N, D) -> (N, K*A)."""
        return self.net(x, t * TIME_SCALE, hidden)

    def loss(self, hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        N = hidden.shape[0]
        x1 = fill_masked_steps(target, mask).flatten(1)  # (N, K*A)
        xt, t, velocity = self.path.training_pair(x1)
        pred = self.velocity(xt, t, hidden)
        per_step = (pred - velocity).square().view(N, self.num_pred_steps, -1).mean(-1)
        return masked_step_mean(per_step, mask)  # (N,)

    @torch.no_grad()
    def sample(
        self,
        hidden: Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> Tensor:
        """Integrate from noise (zeros when ``deterministic``) with ``cfg.flow_solver``."""
        N = hidden.shape[0]
        x0 = initial_noise((N, self.chunk_dim), generator, deterministic, hidden)
        x1 = self.path.sample(lambda x, t: self.velocity(x, t, hidden), x0.shape,
                              self.num_steps, self.sampler, x_init=x0)
        return x1.view(N, self.num_pred_steps, self.action_dim)
