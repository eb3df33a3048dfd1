"""Gaussian-mixture head: a multimodal distribution over the whole flattened chunk.

Each of the M components is a diagonal Gaussian over the K*A chunk numbers, so the mixture
can represent several distinct plans (go left / go right) without averaging them. Padded
chunk steps are marginalised out: for a diagonal Gaussian that is just leaving their
dimensions out of each component's log-density.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from icrt.config import PolicyConfig
from icrt.models.heads.base import ActionHead, mlp, randn

# Clamp of the log standard deviations: keeps the NLL bounded when a component collapses
# onto a training point (std >= e^-7 ~ 1e-3 normalised units) and stops exploding spreads.
LOG_STD_MIN = -7.0
LOG_STD_MAX = 2.0


class GMMHead(ActionHead):
    """MLP -> (logits (N, M), means (N, M, K*A), log-stds (N, M, K*A))."""

    def __init__(self, d_model: int, action_dim: int, num_pred_steps: int, cfg: PolicyConfig):
        super().__init__(d_model, action_dim, num_pred_steps, cfg)
        self.num_components = cfg.gmm_num_components
        M, C = self.num_components, self.chunk_dim
        self.net = mlp(d_model, cfg.head_hidden_dim, M * (2 * C + 1), cfg.head_num_layers)
        with torch.no_grad():
            # Spread the initial means so the components do not start identical (they would
            # then receive identical gradients), and start with moderate spreads.
            last = self.net[-1]
            bias = last.bias.view(M, 2 * C + 1)
            bias[:, :C] = torch.randn(M, C) * 0.5
            bias[:, C : 2 * C] = math.log(0.5)
            bias[:, -1] = 0.0

    def distribution(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log mixture weights (N, M), means (N, M, K*A), log-stds (N, M, K*A))."""
        M, C = self.num_components, self.chunk_dim
        out = self.net(hidden).view(-1, M, 2 * C + 1)
        means = out[..., :C]
        log_stds = out[..., C : 2 * C].clamp(LOG_STD_MIN, LOG_STD_MAX)
        log_weights = out[..., -1].log_softmax(dim=-1)
        return log_weights, means, log_stds

    def loss(self, hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        log_w, means, log_stds = self.distribution(hidden)
        x = target.flatten(1)[:, None, :]  # (N, 1, K*A)
        z = (x - means) * torch.exp(-log_stds)
        log_prob = -0.5 * z.square() - log_stds - 0.5 * math.log(2 * math.pi)  # (N, M, K*A)
        dim_mask = mask[:, :, None].expand(-1, -1, self.action_dim).flatten(1)  # (N, K*A)
        log_prob = torch.where(dim_mask[:, None, :], log_prob, torch.zeros_like(log_prob))
        nll = -torch.logsumexp(log_w + log_prob.sum(-1), dim=-1)  # (N,)
        # Per valid step, like the other heads; 0 with no valid step (log_w sums to 1).
        return nll / mask.sum(-1).clamp(min=1).to(nll.dtype)

    def sample(
        self,
        hidden: Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> Tensor:
        """A component drawn by weight, then a Gaussian draw from it; ``deterministic``
        returns the mean of the most likely component."""
        log_w, means, log_stds = self.distribution(hidden)
        N = hidden.shape[0]
        if deterministic:
            idx = log_w.argmax(dim=-1)  # (N,)
        else:
            probs = log_w.exp()
            if generator is not None and generator.device != probs.device:
                probs = probs.to(generator.device)
            idx = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(hidden.device)
        rows = torch.arange(N, device=hidden.device)
        mean, log_std = means[rows, idx], log_stds[rows, idx]  # (N, K*A)
        out = mean
        if not deterministic:
            out = mean + log_std.exp() * randn(mean.shape, generator, mean.device, mean.dtype)
        return out.view(N, self.num_pred_steps, self.action_dim)
