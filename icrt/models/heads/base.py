"""The action-head interface and pieces shared by the heads.

A head turns the backbone's feature of a state token into a chunk of ``K`` future actions
(``A`` numbers each, normalised units). Training calls :meth:`ActionHead.loss` with the
ground-truth chunk and a mask of the steps that exist (chunks running past the episode end
are padded); acting calls :meth:`ActionHead.sample`.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor, nn

from icrt.config import PolicyConfig


class ActionHead(nn.Module, abc.ABC):
    """Maps (N, D) state-token features to (N, K, A) action chunks.

    ``stochastic`` says whether :meth:`sample` draws from a distribution (so two calls
    differ unless they share a generator seed) or is a deterministic regression.
    """

    stochastic: bool = True

    def __init__(self, d_model: int, action_dim: int, num_pred_steps: int, cfg: PolicyConfig):
        super().__init__()
        self.d_model = d_model
        self.action_dim = action_dim
        self.num_pred_steps = num_pred_steps
        self.chunk_dim = action_dim * num_pred_steps  # K * A, the flattened chunk

    @abc.abstractmethod
    def loss(self, hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """hidden (N, D) state-token features; target (N, K, A) normalised action chunk;
        mask (N, K) bool, False where the chunk step is padding past the episode end.
        Returns the per-sample loss (N,), averaged over the valid chunk steps of each sample
        (samples with no valid step get 0)."""

    @abc.abstractmethod
    def sample(
        self,
        hidden: Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> Tensor:
        """(N, D) -> (N, K, A) action chunk (normalised units).

        ``generator`` makes stochastic heads reproducible; ``deterministic`` asks for a point
        estimate without any randomness (e.g. the mean of the most likely mixture component,
        or the sampler started from zero noise).
        """

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, action_dim={self.action_dim}, K={self.num_pred_steps}"


# ------------------------------------------------------------------------------- helpers


def masked_step_mean(per_step: Tensor, mask: Tensor) -> Tensor:
    """Mean of per-step values (N, K) over the valid steps of each sample -> (N,); 0 where a
    sample has no valid step. Masked entries are zeroed with ``where`` so a NaN or inf there
    cannot leak into the result or its gradient."""
    valid = mask.to(per_step.dtype)
    total = torch.where(mask, per_step, torch.zeros_like(per_step)).sum(-1)  # (N,)
    return total / valid.sum(-1).clamp(min=1.0)


def fill_masked_steps(target: Tensor, mask: Tensor) -> Tensor:
    """Replace padded chunk steps by the last valid step before them (0 if there is none).

    Generative heads feed the (noised) whole chunk to their network, so padded values would
    otherwise leak into the loss of the valid steps. Holding the last action is also what a
    robot does after the episode ends, so sampled chunks stay sensible past that point.
    target (N, K, A), mask (N, K) -> (N, K, A).
    """
    N, K, _ = target.shape
    steps = torch.arange(K, device=target.device).expand(N, K)  # (N, K)
    src = torch.where(mask, steps, torch.full_like(steps, -1)).cummax(dim=-1).values
    filled = target.gather(1, src.clamp(min=0)[..., None].expand_as(target))  # (N, K, A)
    return torch.where((src >= 0)[..., None], filled, torch.zeros_like(target))


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """``num_layers`` hidden layers of width ``hidden_dim`` with GELU (0: one linear map)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(dim, hidden_dim), nn.GELU()]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator gives the
    same numbers whatever device the head runs on), then moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator | None, deterministic: bool, like: Tensor
) -> Tensor:
    """Where sampling starts: zeros when ``deterministic`` (no randomness enters at all), else
    :func:`randn` noise, on ``like``'s device and dtype."""
    if deterministic:
        return torch.zeros(shape, device=like.device, dtype=like.dtype)
    return randn(shape, generator, like.device, like.dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (N,) timesteps -> (N, dim) (transformer / DDPM style)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class _FiLMBlock(nn.Module):
    """Residual MLP block whose normalised input is scaled and shifted by the condition."""

    def __init__(self, width: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(cond_dim, 2 * width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.act = nn.GELU()
        # Start as the identity (zero residual) and with unit FiLM scale: stable early steps.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.film(cond).chunk(2, dim=-1)  # (N, W) each
        z = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(self.act(self.fc1(z)))


class Denoiser(nn.Module):
    """Predicts noise/sample/velocity for a noisy flattened chunk.

    A residual MLP over the (N, K*A) noisy chunk, conditioned on the state feature (N, D) and
    a sinusoidal embedding of the diffusion time through FiLM in every block. Small enough to
    run many denoising steps per control step on a CPU.
    """

    def __init__(
        self, chunk_dim: int, d_model: int, width: int, num_blocks: int, time_dim: int = 64
    ) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.cond = nn.Sequential(
            nn.Linear(d_model + time_dim, width), nn.GELU(), nn.Linear(width, width)
        )
        self.inp = nn.Linear(chunk_dim, width)
        self.blocks = nn.ModuleList(_FiLMBlock(width, width) for _ in range(num_blocks))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, chunk_dim)

    def forward(self, x: Tensor, t: Tensor, hidden: Tensor) -> Tensor:
        """x (N, K*A) noisy chunk, t (N,) time (any scale), hidden (N, D) -> (N, K*A)."""
        temb = timestep_embedding(t, self.time_dim).to(hidden.dtype)  # (N, time_dim)
        cond = self.cond(torch.cat([hidden, temb], dim=-1))  # (N, W)
        h = self.inp(x) + cond
        for block in self.blocks:
            h = block(h, cond)
        return self.out(self.out_norm(h))
