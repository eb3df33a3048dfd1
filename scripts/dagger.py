"""Interactive DAgger without a human: the scripted expert labels the policy's own rollouts,
the policy is fine-tuned on the original demonstrations plus every labelled rollout so far, and
each round's checkpoint is evaluated prompted.

    python scripts/dagger.py --checkpoint runs/mw5 --prompt-dataset data/mw5_prompts.json \
        --tasks reach-v3 --rounds 3 --episodes-per-round 20 --max-steps 200 \
        --finetune-steps 300 --out runs/dagger_reach

Re-running the same command continues after the last completed round (--rounds N more
continues further). Run with -h for every option; see docs/rl.md.
"""

import logging

import tyro

from icrt.cli import run
from icrt.rl.dagger import DaggerConfig, dagger, format_rounds


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = tyro.cli(DaggerConfig, description=__doc__)
    state = dagger(cfg)
    print("\nPrompted success per DAgger round (round 0: the starting checkpoint)\n")
    print(format_rounds(state))
    print(f"\nper-round record: {cfg.out}/dagger.json")


if __name__ == "__main__":
    run(main)
