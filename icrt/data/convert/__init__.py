"""Converters from other tools' dataset formats into icrt episode stores.

Each format is one module with a reader: it opens the source, describes the store it will make
(keys, environment, fps, per-key metadata, the source's validation split) and yields episodes
one at a time, so memory does not grow with the dataset. :func:`convert` writes them with the
episode store's crash safety:

* an episode is committed whole or not at all, so a killed conversion leaves a store of exactly
  its first N episodes; ``--resume`` continues after them (sources are read in a fixed order,
  so the result equals an uninterrupted run);
* an existing store is refused unless ``--resume`` or ``--overwrite``; ``--overwrite`` builds
  the new store beside the old one and swaps it in only when complete;
* the dataset JSON is written next to the store once its first episode is committed.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from icrt.config import ConvertConfig
from icrt.data.spec import write_dataset_json
from icrt.data.store import (
    EpisodeStore,
    acquire_lock,
    finish_swap,
    is_empty_store,
    lock_path,
    release_lock,
    swap_in,
)
from icrt.errors import UserError
from icrt.fsutil import remove_leftovers

log = logging.getLogger(__name__)

READERS = {
    "robomimic": "icrt.data.convert.robomimic:RobomimicReader",
    "icrt": "icrt.data.convert.icrt_hdf5:IcrtReader",
    "lerobot": "icrt.data.convert.lerobot:LeRobotReader",
}


@dataclass
class Episode:
    """One converted episode: arrays under icrt key names, all of the same length."""

    data: dict[str, np.ndarray]
    task: str
    success: bool = True
    source: int = 0  # 0 expert/human, 1 policy


@dataclass
class Layout:
    """What a reader will write: the dataset JSON's keys and the store's attributes."""

    proprio_keys: list[str]
    action_keys: list[str]
    image_keys: list[str]
    env: dict[str, Any]
    fps: float | None = None
    key_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    has_split: bool = False  # the source declares validation episodes
    train_split: float = 0.9  # the dataset JSON's, where the source has no split of its own
    task_grouping: str | None = None  # ICRT's task_grouping file, carried into the JSON


class Reader(Protocol):
    num_episodes: int

    def layout(self) -> Layout: ...

    def episode(self, i: int) -> Episode: ...

    def is_valid(self, i: int) -> bool: ...  # in the source's validation split

    def close(self) -> None: ...


def make_reader(cfg: ConvertConfig) -> Reader:
    module, name = READERS[cfg.format].split(":")
    return getattr(importlib.import_module(module), name)(cfg)


def resize_frames(frames: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 frames (T, H, W, 3) -> (T, size, size, 3) uint8 (antialiased bilinear)."""
    if size is None or frames.shape[1:3] == (size, size):
        return np.ascontiguousarray(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# Flags that change what a conversion writes; --resume requires them unchanged.
_CONTENT_FIELDS = ("format", "input", "image_size", "keys", "cameras", "render_cameras")


def _recorded(cfg: ConvertConfig) -> dict[str, Any]:
    body = {k: v for k, v in asdict(cfg).items() if k in _CONTENT_FIELDS}
    body["input"] = str(Path(cfg.input).resolve())
    return json.loads(json.dumps(body))


def _open_for_resume(path: Path, cfg: ConvertConfig) -> EpisodeStore:
    store = EpisodeStore.open(path, mode="a")
    before = store.env.get("convert")
    if store.num_episodes and before is not None:
        now = _recorded(cfg)
        changed = [k for k in _CONTENT_FIELDS if before.get(k) != now.get(k)]
        if changed:
            store.close()
            raise UserError(
                f"Cannot resume '{path}': it was converted with different "
                f"--{changed[0].replace('_', '-')} ({before.get(changed[0])!r}, now "
                f"{now.get(changed[0])!r}); use the same flags or --overwrite."
            )
    return store


def _write_json(path: Path, layout: Layout) -> None:
    write_dataset_json(path.with_suffix(".json"), stores=[path],
                       proprio_keys=layout.proprio_keys, action_keys=layout.action_keys,
                       image_keys=layout.image_keys,
                       train_split=1.0 if layout.has_split else layout.train_split,
                       **({"task_grouping": layout.task_grouping} if layout.task_grouping
                          else {}))


def convert(cfg: ConvertConfig, progress: bool = True) -> dict[str, Any]:
    """Convert ``cfg.input`` into the store ``cfg.out``; returns a summary."""
    from tqdm import tqdm

    out = Path(cfg.out)
    finish_swap(out, "convert")
    if out.exists() and not (cfg.overwrite or cfg.resume) and not is_empty_store(out):
        raise UserError(f"'{out}' already exists; pass --resume to continue it or --overwrite "
                        f"to replace it.")
    reader = make_reader(cfg)
    layout = reader.layout()
    total = reader.num_episodes if cfg.max_episodes is None else min(cfg.max_episodes,
                                                                       reader.num_episodes)
    if total == 0:
        reader.close()
        raise UserError(f"'{cfg.input}' holds no episodes to convert.")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out.parent, r"^\.+(.+\.zarr)\.(convert|old)-(?P<pid>\d+)(\.lock)?$",
                     "--overwrite conversion")
    lock = acquire_lock(out)
    store: EpisodeStore | None = None
    target = out
    bar = None
    t0 = time.perf_counter()
    steps = 0
    try:
        if cfg.overwrite and out.exists():
            target = out.with_name(f".{out.name}.convert-{os.getpid()}")
            store = EpisodeStore.create(target, overwrite=True)
        elif out.exists() and cfg.resume:
            store = _open_for_resume(out, cfg)
            store.set_attrs(convert_complete=False)
        else:
            store = EpisodeStore.create(out, overwrite=out.exists())
        start = store.num_episodes
        if start > total:
            raise UserError(f"'{out}' already holds {start} episodes, more than the {total} to "
                            f"convert; use --overwrite.")
        valid = [i for i in range(total) if reader.is_valid(i)] if layout.has_split else []
        bar = tqdm(total=total, initial=start, desc=f"convert {cfg.format}", unit="ep",
                   disable=not progress)
        for i in range(start, total):
            ep = reader.episode(i)
            steps += len(next(iter(ep.data.values())))
            store.add_episode(ep.data, task=ep.task, success=ep.success, source=ep.source)
            if store.num_episodes == 1:
                for key, meta in layout.key_meta.items():
                    store.set_key_meta(key, **meta)
                store.set_attrs(fps=layout.fps, env={**layout.env, "convert": _recorded(cfg)})
                if target == out:  # usable (and resumable) from the first commit
                    _write_json(out, layout)
            if layout.has_split:  # the split so far (a resume rewrites it)
                store.set_attrs(valid_episodes=[v for v in valid if v <= i])
            bar.update(1)
        store.set_attrs(convert_complete=True)  # every asked-for episode is in
        store.close()
        if target != out:
            swap_in(target, out)
            target = out
        _write_json(out, layout)
    finally:
        if bar is not None:
            bar.close()
        reader.close()
        if store is not None:
            store.close()
            if target != out:  # a failed --overwrite: the old store stays as it was
                shutil.rmtree(target, ignore_errors=True)
                lock_path(target).unlink(missing_ok=True)
            elif store.num_episodes == 0:  # failed before its first episode: leave nothing
                shutil.rmtree(out, ignore_errors=True)
        release_lock(lock)
    seconds = time.perf_counter() - t0
    converted = total - start
    return {"store": str(out), "episodes": total, "converted_now": converted,
            "steps": steps, "seconds": seconds,
            "episodes_per_min": 60.0 * converted / max(seconds, 1e-9)}


def select_names(wanted: tuple[str, ...] | None, have: list[str], flag: str, what: str,
                 cleanup: Callable[[], None]) -> list[str]:
    """The names ``--keys`` / ``--cameras`` keep (all of ``have`` when not given), or one
    sentence naming the first one the source lacks (after ``cleanup``, e.g. closing files)."""
    if wanted is None:
        return list(have)
    missing = [k for k in wanted if k not in have]
    if missing:
        cleanup()
        raise UserError(f"{flag}: '{missing[0]}' is not in {what} "
                        f"({', '.join(have) or 'none'}).")
    return list(wanted)


def check_same_length(name: str, arrays: Mapping[str, np.ndarray], where: str) -> int:
    """The common length of an episode's arrays, or one sentence naming the odd key."""
    lengths = {k: len(v) for k, v in arrays.items()}
    first = next(iter(lengths.values()))
    for k, n in lengths.items():
        if n != first:
            raise UserError(f"{where}: '{k}' has {n} steps but '{next(iter(lengths))}' has "
                            f"{first} ({name}).")
    return first
