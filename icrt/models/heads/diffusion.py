"""Diffusion head: DDPM training, DDPM or DDIM sampling (diffusers schedulers, through
:mod:`icrt.generative.paths`, shared with the goal-mask model).

The network is our small FiLM-conditioned residual MLP (:class:`Denoiser`) over the flattened
chunk, conditioned on the state feature and the diffusion timestep. Diffusion handles
multimodal action distributions without choosing a number of modes up front.
"""

from __future__ import annotations

import torch
from torch import Tensor

from icrt.config import PolicyConfig
from icrt.generative.paths import DiffusionPath, PathConfig, SamplerConfig
from icrt.models.heads.base import (
    ActionHead,
    Denoiser,
    fill_masked_steps,
    initial_noise,
    masked_step_mean,
)


class DiffusionHead(ActionHead):
    """Denoising diffusion over the flattened (K*A) chunk."""

    def __init__(self, d_model: int, action_dim: int, num_pred_steps: int, cfg: PolicyConfig):
        super().__init__(d_model, action_dim, num_pred_steps, cfg)
        self.sampler = SamplerConfig(sampler_type=cfg.diffusion_sampler, eta=cfg.diffusion_eta)
        self.num_inference_steps = cfg.num_inference_diffusion_steps
        # actions are normalised to about [-1, 1] (min_max) or a few standard deviations
        # (mean_std); clipping the denoised chunk there stops early-step blow-ups
        self.path = DiffusionPath(PathConfig(
            num_train_timesteps=cfg.num_train_diffusion_steps,
            beta_schedule=cfg.diffusion_beta_schedule,
            prediction_type=cfg.diffusion_prediction_type,
            clip_sample_range=cfg.diffusion_clip_sample))
        self.net = Denoiser(self.chunk_dim, d_model, cfg.head_hidden_dim, cfg.head_num_layers)

    def _net(self, x: Tensor, t: Tensor, hidden: Tensor) -> Tensor:
        """The denoiser at path time t in [0, 1), i.e. at training timestep t * T."""
        return self.net(x, (t * self.path.n).round(), hidden)

    def loss(self, hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        N = hidden.shape[0]
        x0 = fill_masked_steps(target, mask).flatten(1)  # (N, K*A)
        xt, t, goal = self.path.training_pair(x0)
        pred = self._net(xt, t, hidden)
        per_step = (pred - goal).square().view(N, self.num_pred_steps, self.action_dim).mean(-1)
        return masked_step_mean(per_step, mask)  # (N,)

    @torch.no_grad()
    def sample(
        self,
        hidden: Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> Tensor:
        """Denoise from Gaussian noise with ``cfg.diffusion_sampler``. ``deterministic`` starts
        from zero noise and uses DDIM with eta=0, so no randomness enters at all."""
        N = hidden.shape[0]
        x = initial_noise((N, self.chunk_dim), generator, deterministic, hidden)
        sampler = SamplerConfig(sampler_type="ddim", eta=0.0) if deterministic else self.sampler
        x = self.path.sample(lambda x_t, t: self._net(x_t, t, hidden), x.shape,
                             self.num_inference_steps, sampler, generator, x_init=x)
        return x.view(N, self.num_pred_steps, self.action_dim)
