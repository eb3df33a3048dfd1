"""Evaluate a checkpoint with prompted rollouts in a simulator and print a success table.

    python scripts/eval.py --checkpoint runs/mw5 --env metaworld --tasks reach-v3 push-v3 \
        --prompt-dataset data/mw5_prompts.json --num-prompts 1 --episodes-per-task 20 \
        --workers 2 --out results.json --video-dir videos
    python scripts/eval.py --checkpoint runs/mw5 --no-prompt ...     # baseline without prompts

Run with -h for every option.
"""

import logging
import sys

from icrt.config import EvalConfig, parse_config
from icrt.errors import UserError
from icrt.eval.rollout import evaluate, format_table


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(cls=EvalConfig, description=__doc__)
    results = evaluate(cfg)
    print(format_table(results))
    print(f"\n{sum(t['episodes'] for t in results['tasks'].values())} episodes in "
          f"{results['wall_seconds']:.0f} s" + (f"; results in {cfg.out}" if cfg.out else ""))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
