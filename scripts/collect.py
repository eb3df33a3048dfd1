"""Collect scripted demonstrations into a zarr episode store (+ a ready dataset JSON).

    python scripts/collect.py --env metaworld --tasks reach-v3 push-v3 \
        --episodes-per-task 20 --prompt-episodes-per-task 5 --out data/mw.zarr
    python scripts/collect.py --env robosuite --tasks Lift --episodes-per-task 100 \
        --image-size 84 --out data/lift.zarr

Run with -h for every option.
"""

import json
import logging

from icrt.cli import run
from icrt.config import CollectConfig, parse_config
from icrt.data.collect import collect


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(cls=CollectConfig, description=__doc__)
    summary = collect(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "tasks"}, indent=1))
    for task, parts in summary["tasks"].items():
        line = ", ".join(f"{s}: {v['kept']} kept of {v['attempts']}" for s, v in parts.items())
        print(f"  {task}: {line}")


if __name__ == "__main__":
    run(main)
