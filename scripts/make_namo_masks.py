"""Generate NAMO (navigation among movable obstacles) scenes as mask files for goal-mask models.

Each scene is one compressed ``.npz`` with the six context/goal masks (robot_image, goal_image,
movable_objects_image, static_objects_image, target_object, target_goal) and the scene itself
as JSON under ``scene`` (icrt.generative.namo.Scene.from_json reads it back).

    python scripts/make_namo_masks.py --out data/namo --num-scenes 1000
    python scripts/make_namo_masks.py --out data/namo64 --image-size 64 --seed 1 --overwrite

Run with -h for every option.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import tyro
from tqdm import tqdm

from icrt.cli import run
from icrt.errors import UserError
from icrt.generative.namo import generate_scene, write_scene_npz

GRID = 28
SCENE_FILE = re.compile(r"scene_\d{6}\.npz")


@dataclass(frozen=True)
class MakeNamoConfig:
    # Output folder for scene_000000.npz, scene_000001.npz, ... (created if missing).
    out: str
    # Number of scenes to write.
    num_scenes: int = 1000
    # Base seed: scene i is generate_scene(seed * 1_000_003 + i).
    seed: int = 0
    # Side of every mask in pixels (at least the grid's 28 cells; need not be a multiple of it).
    image_size: int = 224
    # Write into a non-empty folder: replace its scene files, remove old ones past --num-scenes.
    overwrite: bool = False


def main(cfg: MakeNamoConfig) -> None:
    if cfg.num_scenes < 1:
        raise UserError(f"--num-scenes must be at least 1, got {cfg.num_scenes}.")
    if cfg.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {cfg.seed}.")
    if cfg.image_size < GRID:
        raise UserError(f"--image-size must be at least the grid's {GRID} cells, "
                        f"got {cfg.image_size}.")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not a folder.")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"--out '{out}' already exists and is not empty; pass --overwrite to "
                        "replace its scenes.")
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    written = set()
    for i in tqdm(range(cfg.num_scenes), desc="scenes", unit="scene"):
        name = f"scene_{i:06d}.npz"
        write_scene_npz(out / name, generate_scene(cfg.seed * 1_000_003 + i), cfg.image_size)
        written.add(name)
    stale = [p for p in out.iterdir() if SCENE_FILE.fullmatch(p.name) and p.name not in written]
    for p in stale:
        p.unlink()
    removed = f", removed {len(stale)} old scene files" if stale else ""
    print(f"wrote {cfg.num_scenes} scenes ({cfg.image_size}x{cfg.image_size} masks) to {out} "
          f"in {time.perf_counter() - start:.1f} s{removed}")


if __name__ == "__main__":
    run(lambda: main(tyro.cli(MakeNamoConfig, description=__doc__)))
