"""ACT's conditional-VAE chunk head: an L1 chunk regression conditioned on a latent style
variable that an encoder infers from the true chunk during training.

Training encodes (state feature, true chunk) into q(z) = N(mu, sigma^2), decodes (feature, z)
into the chunk, and minimises L1 + ``cvae_kl_weight`` * KL(q(z) || N(0, I)) (ACT: weight 10,
latent 32). Acting decodes with z = 0, the prior's mean, as ACT does, so the head is
deterministic. With ``cvae_kl_weight 0`` the latent is ignored at test time and the head is
a plain L1 regression (ACT without the VAE).
"""

from __future__ import annotations

import torch
from torch import Tensor

from icrt.config import PolicyConfig
from icrt.models.heads.base import ActionHead, fill_masked_steps, masked_step_mean, mlp


class CVAEHead(ActionHead):
    """hidden (N, D) [+ true chunk in training] -> z -> (N, K, A); L1 + weighted KL."""

    stochastic = False

    def __init__(self, d_model: int, action_dim: int, num_pred_steps: int, cfg: PolicyConfig):
        super().__init__(d_model, action_dim, num_pred_steps, cfg)
        self.latent_dim = cfg.cvae_latent_dim
        self.kl_weight = cfg.cvae_kl_weight
        h, n = cfg.head_hidden_dim, cfg.head_num_layers
        self.encoder = mlp(d_model + self.chunk_dim, h, 2 * self.latent_dim, max(n, 1))
        self.decoder = mlp(d_model + self.latent_dim, h, self.chunk_dim, n)

    def _decode(self, hidden: Tensor, z: Tensor) -> Tensor:
        out = self.decoder(torch.cat([hidden, z], -1))
        return out.unflatten(-1, (self.num_pred_steps, self.action_dim))

    def loss(self, hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        chunk = fill_masked_steps(target, mask).flatten(1)  # padding must not leak into z
        mu, logvar = self.encoder(torch.cat([hidden, chunk], -1)).chunk(2, dim=-1)
        logvar = logvar.clamp(-10.0, 10.0)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        l1 = masked_step_mean((self._decode(hidden, z) - target).abs().mean(-1), mask)  # (N,)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)  # (N,)
        return l1 + self.kl_weight * kl * mask.any(-1)  # a sample without steps: 0

    def sample(self, hidden: Tensor, generator: torch.Generator | None = None,
               deterministic: bool = False) -> Tensor:
        z = hidden.new_zeros(hidden.shape[0], self.latent_dim)
        return self._decode(hidden, z)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, latent={self.latent_dim}, kl_weight={self.kl_weight}"
