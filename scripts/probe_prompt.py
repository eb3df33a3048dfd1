"""Does a policy read its prompt? Teacher-forced action error on recorded episodes, prompted by
an episode of the same task vs of another task (no simulator; seconds on a CPU).

    python scripts/probe_prompt.py --checkpoint runs/icg --dataset data/icg_heldout.json
    python scripts/probe_prompt.py --checkpoint runs/icg --dataset data/icg_prompts.zarr \
        --steps 40 --out runs/icg/probe_train_pairs.json

A ratio (other task's prompt / matched prompt) near 1 means the prompt is ignored. Use
episodes the policy never trained on: a NAME_prompts store, or held-out tasks.

Run with -h for every option.
"""

import dataclasses
import json
import logging

import tyro

from icrt.cli import run
from icrt.fsutil import atomic_write_text


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Matched vs mismatched prompts, teacher forced."""

    # Checkpoint directory (or a run directory: its newest checkpoint).
    checkpoint: str
    # Dataset JSON or episode store whose episodes are prompts and queries (two or more tasks).
    dataset: str
    # Query steps compared per episode (the first ones: where the prompt matters most).
    steps: int = 40
    # Query episodes per task (each task's first successful episode is its prompt).
    queries_per_task: int = 3
    # Other tasks whose prompt each query is also replayed after.
    mismatched_per_query: int = 3
    # Only these tasks (default: every task of the dataset).
    tasks: tuple[str, ...] | None = None
    # Seed of the choice of mismatched tasks.
    seed: int = 0
    # Also write the results as JSON here.
    out: str | None = None


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = tyro.cli(ProbeConfig, description=__doc__)
    from icrt.errors import UserError
    from icrt.eval.inference import InContextPolicy
    from icrt.eval.probe import format_table, prompt_reading

    for name in ("steps", "queries_per_task", "mismatched_per_query"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1.")
    policy = InContextPolicy.from_checkpoint(cfg.checkpoint)
    results = prompt_reading(policy, cfg.dataset, steps=cfg.steps,
                             queries_per_task=cfg.queries_per_task,
                             mismatched_per_query=cfg.mismatched_per_query, tasks=cfg.tasks,
                             seed=cfg.seed)
    print(format_table(results))
    if cfg.out:
        atomic_write_text(cfg.out, json.dumps(
            {**results, "checkpoint": cfg.checkpoint, "dataset": cfg.dataset}, indent=1) + "\n")


if __name__ == "__main__":
    run(main)
