"""Synthetic episode stores for fast tests (no simulator needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icrt.data.spec import write_dataset_json
from icrt.data.store import EpisodeStore

# Each task moves a point to its own goal; the goal is not observed, only the prompt shows it.
GOALS = {"left": (-1.0, 0.2), "right": (1.0, -0.2), "up": (0.1, 1.0)}


def reach_episode(goal, rng: np.random.Generator, max_len: int = 60) -> dict[str, np.ndarray]:
    pos = rng.uniform(-0.3, 0.3, size=2)
    states, actions = [], []
    for _ in range(max_len):
        action = np.clip((np.asarray(goal) - pos) * 4.0, -1.0, 1.0)
        states.append(np.concatenate([pos, [np.linalg.norm(pos)]]))
        actions.append(action)
        pos = pos + 0.05 * action
        if np.linalg.norm(np.asarray(goal) - pos) < 0.05:
            break
    return {"state": np.asarray(states, np.float32), "action": np.asarray(actions, np.float32)}


def make_reach_dataset(
    folder: Path,
    episodes_per_task: int = 8,
    tasks: tuple[str, ...] = ("left", "right"),
    seed: int = 0,
    train_split: float = 1.0,
    name: str = "reach",
) -> Path:
    """Write ``folder/NAME.zarr`` and ``folder/NAME.json``; returns the JSON path."""
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(folder / f"{name}.zarr", env={"name": "synthetic"}, fps=10)
    for task in tasks:
        for _ in range(episodes_per_task):
            store.add_episode(reach_episode(GOALS[task], rng), task=task, success=True)
    store.close()
    path = folder / f"{name}.json"
    write_dataset_json(path, stores=[folder / f"{name}.zarr"], proprio_keys=["state"],
                       action_keys=["action"], train_split=train_split)
    return path


def dot_image(pos: np.ndarray, size: int = 32) -> np.ndarray:
    """A camera frame showing the point as a bright square (so images carry the state)."""
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 2] = 40
    r, c = (np.clip((np.asarray(pos[:2]) + 1.2) / 2.4, 0, 0.999) * size).astype(int)
    img[max(0, r - 2) : r + 2, max(0, c - 2) : c + 2] = 255
    return img


def make_image_dataset(folder: Path, episodes_per_task: int = 4, size: int = 32) -> Path:
    """Reach episodes with one camera, ``image_cam``; returns the dataset JSON path."""
    rng = np.random.default_rng(0)
    store = EpisodeStore.create(folder / "img.zarr", env={"name": "synthetic"}, fps=10)
    for task in ("left", "right"):
        for _ in range(episodes_per_task):
            ep = reach_episode(GOALS[task], rng)
            ep["image_cam"] = np.stack([dot_image(s, size) for s in ep["state"]])
            store.add_episode(ep, task=task)
    store.close()
    path = folder / "img.json"
    write_dataset_json(path, stores=[folder / "img.zarr"], proprio_keys=["state"],
                       action_keys=["action"], image_keys=["image_cam"], train_split=1.0)
    return path
