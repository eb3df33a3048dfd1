"""Train an in-context policy.

    python scripts/train.py --dataset-cfg.dataset-json data/mw5.json \
        --model-cfg.policy-cfg.scratch-llama-config config/model_config/small.json
    torchrun --nproc_per_node=8 scripts/train.py ...        # data-parallel (NCCL / gloo)
    python scripts/train.py --load-config runs/x/config.json --shared-cfg.resume runs/x

Flags follow ICRT's (nested tyro groups); run with -h to see them all.
"""

import logging
import os

from icrt.cli import run
from icrt.config import parse_config
from icrt.train.loop import train


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_config(description=__doc__)
    run_dir = train(cfg)
    if rank == 0:
        print(f"run directory: {run_dir}")


if __name__ == "__main__":
    run(main)
