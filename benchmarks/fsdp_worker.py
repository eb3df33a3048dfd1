"""One rank of ``benchmark_fsdp_vs_ddp`` (benchmarks/speed.py), which launches it with
``torch.distributed.run``: times AdamW training steps of a random backbone under DDP and under
FSDP2, and rank 0 writes the median seconds per step of each as JSON.

    python -m torch.distributed.run --nproc_per_node=2 benchmarks/fsdp_worker.py \\
        --shape config/model_config/small.json --out /tmp/steps.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from icrt.models.backbones.llama import LlamaBackbone, LlamaConfig
from icrt.train.loop import _autocast, _shard


class _Policy(nn.Module):
    """The backbone where ``_shard`` finds it (``model.backbone.layers``), so the blocks are
    sharded exactly as in training."""

    def __init__(self, backbone: LlamaBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", required=True, help="params.json of the backbone")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    shape = LlamaConfig.from_json(args.shape, args.seq_len)
    cpu = torch.device("cpu")
    x = torch.randn(args.batch_size, args.seq_len, shape.dim,
                    generator=torch.Generator().manual_seed(rank))  # (B, T, D), per rank
    steps = {}
    for strategy in ("ddp", "fsdp"):
        torch.manual_seed(0)
        model = _Policy(LlamaBackbone(shape)).train()
        if strategy == "fsdp":
            _shard(model, args.precision)  # parameters become shards: optimizer after this
            wrapped: nn.Module = model
        else:
            wrapped = DistributedDataParallel(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps[strategy] = (wrapped, opt)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        # alternate the order so drifting machine load hits both strategies alike
        for name in list(steps) if i % 2 == 0 else list(reversed(steps)):
            wrapped, opt = steps[name]
            dist.barrier()
            t0 = time.perf_counter()
            with _autocast(args.precision, cpu):
                out = wrapped(x)
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.barrier()  # the step is over when its slowest rank is done
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({name: statistics.median(t) for name, t in times.items()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
