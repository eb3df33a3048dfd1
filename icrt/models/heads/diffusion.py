"""Diffusion head: DDPM training, DDPM or DDIM sampling (diffusers schedulers).

The network is our small FiLM-conditioned residual MLP (:class:`Denoiser`) over the flattened
chunk, conditioned on the state feature and the diffusion timestep. Diffusion handles
multimodal action distributions without choosing a number of modes up front.
"""

from __future__ import annotations

import torch
from torch import Tensor

from icrt.config import PolicyConfig
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
        self.prediction_type = cfg.diffusion_prediction_type
        self.sampler = cfg.diffusion_sampler
        self.num_inference_steps = cfg.num_inference_diffusion_steps
        sched_kwargs = dict(
            num_train_timesteps=cfg.num_train_diffusion_steps,
            beta_schedule=cfg.diffusion_beta_schedule,
            clip_sample=True,
            # actions are normalised to about [-1, 1] (min_max) or a few standard deviations
            # (mean_std); clipping the denoised chunk there stops early-step blow-ups
            clip_sample_range=cfg.diffusion_clip_sample,
            prediction_type=cfg.diffusion_prediction_type,
        )
        # imported here: diffusers pulls in torch._dynamo (~2 s), which other heads never need
        from diffusers import DDIMScheduler, DDPMScheduler

        self.train_scheduler = DDPMScheduler(**sched_kwargs)
        self.ddpm = DDPMScheduler(**sched_kwargs)
        self.ddim = DDIMScheduler(**sched_kwargs)
        self.net = Denoiser(self.chunk_dim, d_model, cfg.head_hidden_dim, cfg.head_num_layers)

    def loss(self, hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        N = hidden.shape[0]
        x0 = fill_masked_steps(target, mask).flatten(1)  # (N, K*A)
        noise = torch.randn_like(x0)
        t = torch.randint(
            0, self.train_scheduler.config.num_train_timesteps, (N,), device=x0.device
        )
        xt = self.train_scheduler.add_noise(x0, noise, t)  # (N, K*A)
        pred = self.net(xt, t, hidden)
        goal = noise if self.prediction_type == "epsilon" else x0
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
        use_ddim = deterministic or self.sampler == "ddim"
        sched = self.ddim if use_ddim else self.ddpm
        sched.set_timesteps(self.num_inference_steps, device=hidden.device)
        for t in sched.timesteps:
            pred = self.net(x, t.expand(N), hidden)
            if use_ddim:
                x = sched.step(pred, t, x, eta=0.0, generator=generator).prev_sample
            else:
                x = sched.step(pred, t, x, generator=generator).prev_sample
        return x.view(N, self.num_pred_steps, self.action_dim)
