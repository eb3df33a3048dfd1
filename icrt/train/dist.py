"""torch.distributed set-up for torchrun (NCCL on CUDA, gloo on CPU) and small helpers."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from icrt.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU if there is one, else Apple's MPS, else the CPU."""
    if flag == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank}")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except (RuntimeError, ValueError):
        raise UserError(f"--device '{flag}' is not a device; use auto, cpu, cuda, cuda:N or mps."
                        ) from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device '{flag}' is not supported; use auto, cpu, cuda, cuda:N or mps.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {flag} was asked for, but MPS is not available here.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {flag} was asked for, but no CUDA device is available.")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_flag: str = "auto", timeout_minutes: float = 60.0) -> DistInfo:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # long enough for rank 0's simulator evaluation while the others wait at a barrier
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world, local_rank, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a no-op when running alone)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values
