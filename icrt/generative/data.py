"""Goal-mask scenes from ``.npz`` files: five context masks and the ground-truth goal mask.

Each file holds 2-D masks (224 x 224 from the NAMO collector; any square size works):
``robot_image``, ``goal_image``, ``movable_objects_image``, ``static_objects_image``,
``target_object`` and ``target_goal`` (legacy files name the first four ``robot``, ``goal``,
``movable`` and ``static``). Masks are resized to ``image_size`` by area averaging (soft edges
kept) and scaled to [0, 1]. A ``scene`` entry (the generator's JSON description), when present,
is kept so a sampled goal can be checked.

    ds = GoalMaskDataset(sorted(Path("data/namo").glob("*.npz")), image_size=64)
    item = ds[0]      # {"context": (5, 64, 64), "goal": (1, 64, 64), "index": 0}
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from icrt.errors import UserError

CONTEXT_KEYS = ("robot_image", "goal_image", "movable_objects_image", "static_objects_image",
                "target_object")
GOAL_KEY = "target_goal"
LEGACY_KEYS = {"robot_image": "robot", "goal_image": "goal",
               "movable_objects_image": "movable", "static_objects_image": "static"}


def scene_files(data_dir: str | Path) -> list[Path]:
    """The ``.npz`` files of a folder, sorted; one sentence if there are none."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise UserError(f"Data folder '{folder}' does not exist (--data.data-dir).")
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise UserError(f"Data folder '{folder}' holds no .npz scene files.")
    return files


def _resize(mask: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(mask, dtype=np.float32))
    if x.max() > 1.0:  # 0/255 masks
        x = x / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x[None, None], size=(size, size), mode="area")[0, 0]
    return x


def load_scene(path: Path, image_size: int) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """(context (5, S, S), goal (1, S, S), scene JSON or None) of one file; a damaged or
    incomplete file is one sentence naming it."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"Scene file '{path}' cannot be read ({type(e).__name__}: {e}).") \
            from None
    masks = []
    for key in (*CONTEXT_KEYS, GOAL_KEY):
        name = key if key in arrays else LEGACY_KEYS.get(key, key)
        if name not in arrays:
            raise UserError(f"Scene file '{path}' lacks '{key}' (it has "
                            f"{', '.join(sorted(arrays))}).")
        m = arrays[name]
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise UserError(f"Scene file '{path}': '{name}' has shape {m.shape}, not a square "
                            f"2-D mask.")
        if not np.isfinite(m).all():
            raise UserError(f"Scene file '{path}': '{name}' holds NaN or infinite values.")
        masks.append(_resize(m, image_size))
    scene = str(arrays["scene"]) if "scene" in arrays else None
    return torch.stack(masks[:5]), masks[5][None], scene


class GoalMaskDataset(Dataset):
    """Every file loaded once into memory at ``image_size`` (a 64 x 64 scene is 24 KB)."""

    def __init__(self, files: Sequence[Path], image_size: int = 64) -> None:
        if not files:
            raise UserError("A goal-mask dataset needs at least one scene file.")
        self.files = list(files)
        loaded = [load_scene(f, image_size) for f in self.files]
        self.context = torch.stack([c for c, _, _ in loaded])  # (N, 5, S, S)
        self.goal = torch.stack([g for _, g, _ in loaded])  # (N, 1, S, S)
        self.scenes = [s for _, _, s in loaded]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return {"context": self.context[i], "goal": self.goal[i], "index": i}


def split_files(files: Sequence[Path], val_fraction: float, seed: int
                ) -> tuple[list[Path], list[Path]]:
    """Deterministic train/validation split of scene files (at least one of each)."""
    if len(files) < 2:
        raise UserError(f"Need at least 2 scene files for a train/validation split (got "
                        f"{len(files)}).")
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    val = sorted(files[i] for i in order[:n_val])
    train = sorted(files[i] for i in order[n_val:])
    return train, val


def coord_grid(size: int) -> torch.Tensor:
    """(2, S, S) x and y coordinates in [-1, 1]."""
    lin = torch.linspace(-1.0, 1.0, size)
    ys, xs = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([xs, ys])


def network_input(context: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """(B, 5, S, S) context in [0, 1] and the noisy goal (B, 1, S, S) -> (B, 8, S, S): context
    scaled to [-1, 1], the coordinate grid, the noisy goal."""
    B, _, S, _ = context.shape
    grid = coord_grid(S).to(context.device, context.dtype).expand(B, -1, -1, -1)
    return torch.cat([context * 2 - 1, grid, x_t.to(context.dtype)], dim=1)
