"""Evaluate a checkpoint with prompted rollouts in a simulator and print a success table.

    python scripts/eval.py --checkpoint runs/mw5 --env metaworld --tasks reach-v3 push-v3 \
        --prompt-dataset data/mw5_prompts.json --num-prompts 1 --episodes-per-task 20 \
        --workers 2 --out results.json --video-dir videos
    python scripts/eval.py --checkpoint runs/mw5 --no-prompt ...     # baseline without prompts

Run with -h for every option.
"""

import dataclasses
import logging

import tyro

from icrt.cli import run
from icrt.config import EvalConfig
from icrt.eval.rollout import evaluate, format_comparison, format_table, read_results


@dataclasses.dataclass(frozen=True)
class EvalCommand(EvalConfig):
    # Results JSON of another evaluation (e.g. --no-prompt) to print side by side.
    baseline: str | None = None


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cmd = tyro.cli(EvalCommand, description=__doc__)
    baseline = read_results(cmd.baseline) if cmd.baseline else None  # before any episode
    cfg = EvalConfig(**{f.name: getattr(cmd, f.name) for f in dataclasses.fields(EvalConfig)})
    results = evaluate(cfg)
    print(format_table(results))
    if baseline is not None:
        print("\n" + format_comparison(results, baseline))
    print(f"\n{sum(t['episodes'] for t in results['tasks'].values())} episodes in "
          f"{results['wall_seconds']:.0f} s" + (f"; results in {cfg.out}" if cfg.out else ""))


if __name__ == "__main__":
    run(main)
