"""Probability paths and samplers: flow matching through Facebook's ``flow_matching`` library
and DDPM/DDIM through Hugging Face ``diffusers``. One implementation serves the goal-mask model
and the policy's flow and diffusion action heads.

Both expose the same three calls, so the training loop does not know which one it runs:

    path = build_path("flow_matching", PathConfig(scheduler="cosine"))
    x_t, t, target = path.training_pair(x1, generator)  # the network learns target from (x_t, t)
    x1_hat = path.clean_estimate(net_out, x_t, t)       # its implied clean sample (aux loss)
    x1 = path.sample(fn, shape, steps, SamplerConfig(method="midpoint"), generator)

``t`` is what the network sees: in [0, 1] for both (flow time, 0 = noise and 1 = data; or the
diffusion timestep divided by ``num_train_timesteps``). Data are in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from icrt.errors import UserError

Objective = Literal["flow_matching", "diffusion"]
Network = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> output


@dataclass(frozen=True)
class PathConfig:
    # flow matching: the probability path's scheduler (condot = straight lines).
    scheduler: Literal["condot", "cosine", "vp", "linear_vp"] = "condot"
    # diffusion: training timesteps, noise schedule and what the network predicts.
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    # diffusion: denoised samples are clipped to +-this at every sampling step.
    clip_sample_range: float = 1.0


@dataclass(frozen=True)
class SamplerConfig:
    # flow matching: ODE method (dopri5 is adaptive and ignores the step count).
    method: Literal["euler", "midpoint", "rk4", "dopri5"] = "midpoint"
    # dopri5 tolerances.
    atol: float = 1e-5
    rtol: float = 1e-5
    # diffusion: ddim (deterministic at eta 0) or ddpm (stochastic).
    sampler_type: Literal["ddim", "ddpm"] = "ddim"
    # DDIM's eta: 0 deterministic, 1 DDPM-like noise.
    eta: float = 0.0


class FlowMatchingPath:
    """Affine probability path x_t = alpha_t x1 + sigma_t x0 (x0 ~ N(0, I)); the network
    predicts the velocity; sampling integrates it from t = 0 to 1 with ``ODESolver``."""

    def __init__(self, cfg: PathConfig) -> None:
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import (
            CondOTScheduler,
            CosineScheduler,
            LinearVPScheduler,
            VPScheduler,
        )

        schedulers = {"condot": CondOTScheduler, "cosine": CosineScheduler,
                      "vp": VPScheduler, "linear_vp": LinearVPScheduler}
        self.cfg = cfg
        self.path = AffineProbPath(scheduler=schedulers[cfg.scheduler]())

    def training_pair(self, x1: Tensor, generator: torch.Generator | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device)
        # stay off the end points, where VP schedules are singular
        t = torch.rand(x1.shape[0], generator=generator, device=x1.device) * 0.998 + 0.001
        s = self.path.sample(x_0=x0, x_1=x1, t=t)
        return s.x_t, t, s.dx_t

    def clean_estimate(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.path.velocity_to_target(out, x_t, t.view(-1, *[1] * (x_t.dim() - 1)))

    def sample(self, fn: Network, shape: tuple[int, ...], steps: int, cfg: SamplerConfig,
               generator: torch.Generator | None = None, device: str | torch.device = "cpu",
               x_init: Tensor | None = None) -> Tensor:
        """Integrate ``fn`` from ``x_init`` (default: noise from ``generator``) at t = 0 to
        t = 1."""
        from flow_matching.solver import ODESolver
        from flow_matching.utils import ModelWrapper

        class _Velocity(ModelWrapper):
            def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
                return fn(x, t.reshape(-1).expand(x.shape[0]))

        x0 = torch.randn(shape, generator=generator, device=device) if x_init is None else x_init
        solver = ODESolver(velocity_model=_Velocity(torch.nn.Identity()))
        step = None if cfg.method == "dopri5" else 1.0 / steps
        grid = torch.tensor([0.0, 1.0], device=x0.device, dtype=x0.dtype)
        with torch.no_grad():
            return solver.sample(x_init=x0, step_size=step, method=cfg.method, atol=cfg.atol,
                                 rtol=cfg.rtol, time_grid=grid)


class DiffusionPath:
    """DDPM forward process from ``diffusers``; the network predicts ``prediction_type``;
    sampling runs DDIM (with ``eta``) or DDPM over ``steps`` inference timesteps."""

    def __init__(self, cfg: PathConfig) -> None:
        from diffusers import DDPMScheduler

        if cfg.num_train_timesteps < 2:
            raise UserError("--model.path.num-train-timesteps must be at least 2.")
        self.cfg = cfg
        self.scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                                       beta_schedule=cfg.beta_schedule,
                                       prediction_type=cfg.prediction_type, clip_sample=True,
                                       clip_sample_range=cfg.clip_sample_range)
        self.n = cfg.num_train_timesteps
        self._samplers: dict[str, object] = {}  # built once: sampling runs every policy step

    def _alpha_bar(self, t: Tensor, ndim: int) -> Tensor:
        steps = (t * self.n).round().long().clamp(0, self.n - 1)
        return self.scheduler.alphas_cumprod.to(t.device)[steps].view(-1, *[1] * (ndim - 1))

    def training_pair(self, x1: Tensor, generator: torch.Generator | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
        noise = torch.randn(x1.shape, generator=generator, device=x1.device)
        steps = torch.randint(0, self.n, (x1.shape[0],), generator=generator, device=x1.device)
        x_t = self.scheduler.add_noise(x1, noise, steps)
        target = {"epsilon": noise, "sample": x1}.get(self.cfg.prediction_type)
        if target is None:
            target = self.scheduler.get_velocity(x1, noise, steps)
        return x_t, steps.float() / self.n, target

    def clean_estimate(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        ab = self._alpha_bar(t, x_t.dim())
        if self.cfg.prediction_type == "epsilon":
            return (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
        if self.cfg.prediction_type == "v_prediction":
            return ab.sqrt() * x_t - (1 - ab).sqrt() * out
        return out

    def sample(self, fn: Network, shape: tuple[int, ...], steps: int, cfg: SamplerConfig,
               generator: torch.Generator | None = None, device: str | torch.device = "cpu",
               x_init: Tensor | None = None) -> Tensor:
        """Denoise from ``x_init`` (default: noise from ``generator``) over ``steps``
        inference timesteps."""
        from diffusers import DDIMScheduler, DDPMScheduler

        if cfg.sampler_type not in self._samplers:
            kind = DDIMScheduler if cfg.sampler_type == "ddim" else DDPMScheduler
            self._samplers[cfg.sampler_type] = kind.from_config(self.scheduler.config)
        sched = self._samplers[cfg.sampler_type]
        x = torch.randn(shape, generator=generator, device=device) if x_init is None else x_init
        sched.set_timesteps(min(steps, self.n), device=x.device)
        extra = {"eta": cfg.eta} if cfg.sampler_type == "ddim" else {}
        with torch.no_grad():
            for step in sched.timesteps:
                t = torch.full((shape[0],), float(step) / self.n, device=x.device)
                x = sched.step(fn(x, t), step, x, generator=generator, **extra).prev_sample
        return x


def build_path(objective: Objective, cfg: PathConfig) -> FlowMatchingPath | DiffusionPath:
    if objective == "flow_matching":
        return FlowMatchingPath(cfg)
    if objective == "diffusion":
        return DiffusionPath(cfg)
    raise UserError(f"Unknown objective '{objective}'; use flow_matching or diffusion.")
