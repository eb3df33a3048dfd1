"""Train the goal-mask generator: a DiT predicts where the selected movable object should go.

    python scripts/make_namo_masks.py --out data/namo --num-scenes 2000
    python scripts/train_generative.py --data.data-dir data/namo                  # flow matching
    python scripts/train_generative.py --model.objective diffusion                # DDPM/DDIM
    python scripts/train_generative.py --model.sampler.method dopri5 --model.path.scheduler cosine
    python scripts/train_generative.py --ckpt-path outputs/goal_dit/checkpoints/last   # resume
    torchrun --nproc_per_node=4 scripts/train_generative.py --batch-size 64 ...       # DDP

Outputs go to OUTPUT_DIR/RUN_NAME (see docs/generative.md). Run with -h for every option.
"""

import logging

import tyro

from icrt.cli import run
from icrt.generative.train import GenerativeConfig, train_generative


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = tyro.cli(GenerativeConfig, description=__doc__)
    run_dir = train_generative(cfg)
    print(f"run written to {run_dir}")


if __name__ == "__main__":
    run(main)
