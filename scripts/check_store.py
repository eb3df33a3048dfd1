"""Check episode stores for damage: every chunk present and decodable (checksums verified),
episode metadata consistent, float keys finite. Exit status 0: intact; 1: damaged.

    python scripts/check_store.py data/mw5.zarr data/mw5_prompts.zarr
    python scripts/check_store.py --dataset-json data/mw5.json

Run with -h for every option.
"""

import dataclasses
import logging
import sys

import tyro

from icrt.cli import run
from icrt.errors import UserError


@dataclasses.dataclass(frozen=True)
class CheckStoreConfig:
    """Scan episode stores for missing, truncated or corrupted data."""

    # Episode stores to check.
    stores: tyro.conf.Positional[tuple[str, ...]] = ()
    # Also check every store a dataset JSON lists.
    dataset_json: str | None = None


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = tyro.cli(CheckStoreConfig, description=__doc__)
    from icrt.data.spec import DatasetSpec
    from icrt.data.store import EpisodeStore

    paths = list(cfg.stores)
    if cfg.dataset_json:
        paths += [str(p) for p in DatasetSpec.load(cfg.dataset_json).stores]
    if not paths:
        raise UserError("Name the stores to check (or --dataset-json D.json).")
    damaged = 0
    for path in paths:
        try:
            store = EpisodeStore.open(path, check=False)
            problems = store.verify(progress=sys.stderr.isatty())
        except UserError as e:
            problems = [str(e)]
            store = None
        if problems:
            damaged += 1
            print(f"DAMAGED {path}: {len(problems)} problem(s)")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"ok      {path}: {store.num_episodes} episodes, {store.num_steps} steps, "
                  f"keys {', '.join(store.keys)}")
    sys.exit(1 if damaged else 0)


if __name__ == "__main__":
    run(main)
