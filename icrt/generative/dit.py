"""A diffusion transformer (DiT, Peebles & Xie 2023) for goal masks.

The network sees the scene as image channels -- 5 context masks (robot, robot goal, movable
objects, static obstacles, the selected object), 2 coordinate channels (x and y in [-1, 1]) and
the noisy goal mask -- and predicts one channel (a velocity, noise or clean mask, depending on
the path). Time conditions every block through adaLN-Zero: each block's LayerNorms are
modulated by a shift, scale and gate regressed from the time embedding, gates start at zero
so every block starts as the identity.

    net = DiT(DiTConfig(), image_size=64)
    out = net(x, t)          # x (B, 8, 64, 64), t (B,) in [0, 1] -> (B, 1, 64, 64)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from icrt.models.heads.base import timestep_embedding


@dataclass(frozen=True)
class DiTConfig:
    # Input channels: 5 context masks + 2 coordinate channels + 1 noisy goal mask.
    in_ch: int = 8
    # Output channels (the goal mask).
    out_ch: int = 1
    # Patch size in pixels.
    patch_size: int = 4
    # Token width, transformer blocks and attention heads.
    hidden_size: int = 256
    depth: int = 6
    num_heads: int = 4
    # MLP width as a multiple of hidden_size.
    mlp_ratio: float = 4.0


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding (grid * grid, dim)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                            torch.arange(grid, dtype=torch.float64), indexing="ij")
    out = [f(p.reshape(-1)[:, None] * omega[None]) for p in (ys, xs) for f in (torch.sin,
                                                                               torch.cos)]
    return torch.cat(out, dim=1).float()


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU("tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), s2, sc2))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig, image_size: int) -> None:
        super().__init__()
        if image_size % cfg.patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of the patch size "
                             f"{cfg.patch_size}.")
        if cfg.hidden_size % 4 or cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} must be divisible by 4 and by "
                             f"num_heads {cfg.num_heads}.")
        pixels = cfg.in_ch * cfg.patch_size**2
        if pixels > cfg.hidden_size:
            logging.getLogger(__name__).warning(
                "each %dx%d patch holds %d input values but a token only %d: the network cannot "
                "pass the noise through and samples stay speckled; use a smaller patch size or "
                "a larger hidden size", cfg.patch_size, cfg.patch_size, pixels, cfg.hidden_size)
        self.cfg = cfg
        self.grid = image_size // cfg.patch_size
        h, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_ch, h, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed(h, self.grid)[None], persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(256, h), nn.SiLU(), nn.Linear(h, h))
        self.blocks = nn.ModuleList(DiTBlock(h, cfg.num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))
        self.final_linear = nn.Linear(h, p * p * cfg.out_ch)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        # adaLN-Zero: every block (and the output) starts switched off
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_adaLN[-1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x (B, in_ch, H, W), t (B,) or scalar in [0, 1] -> (B, out_ch, H, W)."""
        B = x.shape[0]
        t = t.reshape(-1).expand(B) if t.numel() in (1, B) else t
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, h)
        # times in [0, 1] scaled to the range the sinusoid's frequencies were designed for
        c = self.t_embedder(timestep_embedding(1000.0 * t, 256).to(tokens.dtype))
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        out = self.final_linear(_modulate(self.final_norm(tokens), shift, scale))
        p, g, C = self.cfg.patch_size, self.grid, self.cfg.out_ch
        out = out.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return out.reshape(B, C, g * p, g * p)
