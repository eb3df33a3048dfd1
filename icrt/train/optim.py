"""AdamW and the learning-rate schedule (linear warm-up, then half-cycle cosine, by epoch)."""

from __future__ import annotations

import math

import torch

from icrt.config import OptimizerConfig


def base_lr(cfg: OptimizerConfig, effective_batch: int) -> float:
    """``--optimizer-cfg.lr``, or ``blr * effective batch / 256`` when lr is None (as in ICRT)."""
    return cfg.lr if cfg.lr is not None else cfg.blr * effective_batch / 256


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at a fractional epoch."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return lr
    progress = min(1.0, (epoch - warmup_epochs) / (epochs - warmup_epochs))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(param_groups: list[dict], cfg: OptimizerConfig, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(cfg.betas))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
