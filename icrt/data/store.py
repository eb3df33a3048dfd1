"""The zarr episode store: every episode icrt trains on, in one on-disk format.

Layout (diffusion_policy's replay buffer, extended with tasks and flags)::

    NAME.zarr/
      data/<key>             all episodes concatenated along time, e.g. state (T, S) float32,
                             action (T, A) float32, image_<camera> (T, H, W, 3) uint8
      meta/episode_ends      (E,) int64 cumulative end index of each episode
      meta/episode_task      (E,) int32 index into attrs["tasks"]
      meta/episode_success   (E,) bool
      meta/episode_source    (E,) int8 (0 expert/human, 1 policy)
      meta/episode_seed      (E,) int64 simulator seed of the episode (-1 if unknown)
      attrs                  format, version, num_episodes (the commit record), tasks, fps,
                             env description, per-key kind/shape/dtype/extra metadata, and
                             normalisation stats per key (mean, std, min, max, q01, q99)

Crash safety: an episode is written as data rows, then meta rows, and is committed last by
bumping ``attrs["num_episodes"]`` (zarr's local store replaces files atomically). Readers see
only committed episodes; a writer that reopens a store rolls uncommitted rows back. So a writer
killed at any moment leaves a store holding exactly its completed episodes.

    store = EpisodeStore.create("data/demo.zarr", env={"name": "metaworld"}, fps=80)
    store.add_episode({"state": s, "action": a}, task="reach-v3", success=True)
    store.close()                                   # writes normalisation stats
    store = EpisodeStore.open("data/demo.zarr")
    ep = store.episode(0)                           # {"state": (T, S), "action": (T, A)}
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from icrt.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "icrt-episodes"
VERSION = 1
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
_META = {
    "episode_ends": np.int64,
    "episode_task": np.int32,
    "episode_success": np.bool_,
    "episode_source": np.int8,
    "episode_seed": np.int64,
}
# Rows per chunk for low-dim keys; image and feature keys use ~4 MB chunks.
_LOWDIM_CHUNK = 4096
_IMAGE_CHUNK_BYTES = 4 << 20
# Quantile statistics are estimated from at most this many rows per key.
_MAX_STAT_ROWS = 1_000_000


def key_kind(key: str) -> str:
    """The kind of a data key, by naming convention."""
    if key.startswith("image_"):
        return "image"
    if key.startswith("feature_"):
        return "feature"
    if key.startswith("action"):
        return "action"
    return "lowdim"


def compute_stats(x: np.ndarray) -> dict[str, list[float]]:
    """Per-dimension mean, std, min, max, 1% and 99% quantiles of rows ``x`` (N, D)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if len(x) == 0:
        raise ValueError("cannot compute statistics of zero rows")
    q = x
    if len(x) > _MAX_STAT_ROWS:  # quantiles of a deterministic subsample
        q = x[np.linspace(0, len(x) - 1, _MAX_STAT_ROWS).astype(np.int64)]
    q01, q99 = np.quantile(q, [0.01, 0.99], axis=0)
    out = {
        "mean": x.mean(0),
        "std": x.std(0),
        "min": x.min(0),
        "max": x.max(0),
        "q01": q01,
        "q99": q99,
    }
    return {k: v.astype(np.float64).tolist() for k, v in out.items()}


class EpisodeStore:
    """Reader and (single) writer of one ``.zarr`` episode store."""

    def __init__(self, path: Path, group: zarr.Group, writable: bool) -> None:
        self.path = path
        self._root = group
        self._writable = writable
        self._attrs: dict[str, Any] = dict(group.attrs)
        n = int(self._attrs["num_episodes"])
        self._meta = {k: np.asarray(group["meta"][k][:n]) for k in _META}
        self._stats_cache: dict[str, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------ open / create

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        env: Mapping[str, Any] | None = None,
        fps: float | None = None,
        overwrite: bool = False,
    ) -> EpisodeStore:
        """Create an empty store for writing. Refuses to replace an existing one unless asked."""
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise UserError(
                    f"Episode store '{path}' already exists; pass overwrite to replace it."
                )
            shutil.rmtree(path)
        root = zarr.open_group(str(path), mode="w")
        root.require_group("data")
        meta = root.require_group("meta")
        for name, dtype in _META.items():
            meta.create_array(name, shape=(0,), dtype=dtype, chunks=(_LOWDIM_CHUNK,))
        root.attrs.update(
            {
                "format": FORMAT,
                "version": VERSION,
                "num_episodes": 0,
                "tasks": [],
                "fps": fps,
                "env": dict(env or {}),
                "keys": {},
                "stats": {},
                "stats_num_steps": 0,
            }
        )
        return cls(path, root, writable=True)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> EpisodeStore:
        """Open a store for reading (``"r"``) or appending (``"a"``); validates the format."""
        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
        if not path.exists():
            raise UserError(f"Episode store '{path}' does not exist.")
        try:
            root = zarr.open_group(str(path), mode="r+" if mode == "a" else "r")
        except Exception as e:  # zarr raises several types for a non-store directory
            raise UserError(f"'{path}' is not a zarr episode store ({type(e).__name__}).") from None
        attrs = dict(root.attrs)
        if attrs.get("format") != FORMAT:
            raise UserError(
                f"'{path}' is not an icrt episode store (format {attrs.get('format')!r}, "
                f"expected {FORMAT!r})."
            )
        if int(attrs.get("version", -1)) != VERSION:
            raise UserError(
                f"Episode store '{path}' has format version {attrs.get('version')}, but this "
                f"icrt reads version {VERSION}."
            )
        store = cls(path, root, writable=mode == "a")
        if mode == "a":
            store._rollback()
        return store

    def _rollback(self) -> None:
        """Drop rows an interrupted writer left past the last committed episode."""
        n = self.num_episodes
        end = self.num_steps
        for key in self.keys:
            arr = self._root["data"][key]
            if arr.shape[0] != end:
                log.warning("%s: rolling back %d uncommitted rows of '%s'", self.path,
                            arr.shape[0] - end, key)
                arr.resize((end, *arr.shape[1:]))
        for key in list(self._root["data"].keys()):
            if key not in self.keys:  # a key whose first episode never committed
                del self._root["data"][key]
        for name in _META:
            arr = self._root["meta"][name]
            if arr.shape[0] != n:
                arr.resize((n,))

    # ------------------------------------------------------------------ properties

    @property
    def num_episodes(self) -> int:
        return int(self._attrs["num_episodes"])

    @property
    def episode_ends(self) -> np.ndarray:
        return self._meta["episode_ends"]

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(np.concatenate([[0], self.episode_ends])).astype(np.int64)

    @property
    def num_steps(self) -> int:
        return int(self.episode_ends[-1]) if self.num_episodes else 0

    @property
    def tasks(self) -> list[str]:
        """Task names; ``episode_task`` indexes this list."""
        return list(self._attrs["tasks"])

    @property
    def episode_task(self) -> np.ndarray:
        return self._meta["episode_task"]

    @property
    def episode_task_names(self) -> list[str]:
        tasks = self.tasks
        return [tasks[i] for i in self.episode_task]

    @property
    def episode_success(self) -> np.ndarray:
        return self._meta["episode_success"]

    @property
    def episode_source(self) -> np.ndarray:
        return self._meta["episode_source"]

    @property
    def episode_seed(self) -> np.ndarray:
        return self._meta["episode_seed"]

    @property
    def keys(self) -> list[str]:
        return list(self._attrs["keys"])

    @property
    def fps(self) -> float | None:
        return self._attrs.get("fps")

    @property
    def env(self) -> dict[str, Any]:
        return dict(self._attrs.get("env", {}))

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    def key_info(self, key: str) -> dict[str, Any]:
        """``{"kind", "shape", "dtype", ...extra}`` of a key (shape excludes time)."""
        self._require_key(key)
        return dict(self._attrs["keys"][key])

    def __repr__(self) -> str:
        return (f"EpisodeStore('{self.path}', episodes={self.num_episodes}, "
                f"steps={self.num_steps}, keys={self.keys})")

    # ------------------------------------------------------------------ reading

    def _require_key(self, key: str) -> None:
        if key not in self._attrs["keys"]:
            raise UserError(
                f"Episode store '{self.path}' has no key '{key}'; it has "
                f"{', '.join(self.keys) or 'no keys'}."
            )

    def _require_episode(self, i: int) -> int:
        if not -self.num_episodes <= i < self.num_episodes:
            raise IndexError(f"Episode {i} out of range: '{self.path}' has {self.num_episodes}.")
        return i % self.num_episodes

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``data/<key>`` in global (concatenated) time."""
        self._require_key(key)
        stop = min(stop, self.num_steps)
        return np.asarray(self._root["data"][key][start:stop])

    def load(self, key: str) -> np.ndarray:
        """Every committed row of a key (use for low-dim keys)."""
        return self.read(key, 0, self.num_steps)

    def episode(self, i: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """All steps of episode ``i``."""
        i = self._require_episode(i)
        return self.episode_slice(i, 0, int(self.episode_lengths[i]), keys)

    def episode_slice(
        self, i: int, start: int, stop: int, keys: Iterable[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Steps ``start:stop`` (episode-local) of episode ``i``."""
        i = self._require_episode(i)
        length = int(self.episode_lengths[i])
        start, stop = max(0, start), min(stop, length)
        offset = int(self.episode_starts[i])
        keys = self.keys if keys is None else list(keys)
        return {k: self.read(k, offset + start, offset + stop) for k in keys}

    def array(self, key: str) -> zarr.Array:
        """The raw zarr array of a key (rows past ``num_steps`` are not committed)."""
        self._require_key(key)
        return self._root["data"][key]

    # ------------------------------------------------------------------ statistics

    def stats(self, key: str) -> dict[str, np.ndarray]:
        """Normalisation statistics of a key: stored ones if current, else computed now."""
        self._require_key(key)
        if key in self._stats_cache:
            return self._stats_cache[key]
        stored = self._attrs.get("stats", {}).get(key)
        if stored is not None and self._attrs.get("stats_num_steps") == self.num_steps:
            out = {k: np.asarray(v, dtype=np.float32) for k, v in stored.items()}
        else:
            if self.num_steps == 0:
                raise UserError(f"Episode store '{self.path}' is empty; it has no statistics.")
            data = self.load(key)
            out = {k: np.asarray(v, np.float32) for k, v in compute_stats(data).items()}
        self._stats_cache[key] = out
        return out

    def compute_stats(self, keys: Sequence[str] | None = None) -> None:
        """Compute and store statistics of the low-dim and action keys (on close, or on demand)."""
        self._check_writable()
        if self.num_steps == 0:
            return
        keys = [k for k in (keys or self.keys)
                if self.key_info(k)["kind"] not in ("image", "feature")]
        stats = dict(self._attrs.get("stats", {}))
        for k in keys:
            stats[k] = compute_stats(self.load(k))
        self._update_attrs(stats=stats, stats_num_steps=self.num_steps)
        self._stats_cache.clear()

    # ------------------------------------------------------------------ writing

    def _check_writable(self) -> None:
        if not self._writable:
            raise UserError(f"Episode store '{self.path}' was opened read-only.")

    def _update_attrs(self, **changes: Any) -> None:
        self._attrs.update(changes)
        self._root.attrs.update(changes)

    def set_key_meta(self, key: str, **extra: Any) -> None:
        """Attach extra JSON metadata to a key, e.g. ``rotation={"start": 3, "format": ...}``."""
        self._check_writable()
        self._require_key(key)
        keys = {k: dict(v) for k, v in self._attrs["keys"].items()}
        keys[key].update(extra)
        self._update_attrs(keys=keys)

    def set_attrs(self, **values: Any) -> None:
        """Update free-form store attributes (``env``, ``fps``, ...)."""
        self._check_writable()
        reserved = {"format", "version", "num_episodes", "keys", "stats", "stats_num_steps"}
        bad = reserved & set(values)
        if bad:
            raise ValueError(f"attributes {sorted(bad)} are managed by the store")
        self._update_attrs(**values)

    def _create_key(self, key: str, value: np.ndarray) -> None:
        kind = key_kind(key)
        step_shape = tuple(value.shape[1:])
        if kind in ("image", "feature"):  # large rows: chunks of about 4 MB
            frame = max(1, int(np.prod(step_shape)) * value.dtype.itemsize)
            rows = max(1, min(256, _IMAGE_CHUNK_BYTES // frame))
        else:
            rows = _LOWDIM_CHUNK
        self._root["data"].create_array(
            key, shape=(0, *step_shape), dtype=value.dtype, chunks=(rows, *step_shape)
        )
        keys = {k: dict(v) for k, v in self._attrs["keys"].items()}
        keys[key] = {"kind": kind, "shape": list(step_shape), "dtype": str(value.dtype)}
        self._attrs["keys"] = keys  # committed together with the episode

    def add_episode(
        self,
        data: Mapping[str, np.ndarray],
        task: str,
        success: bool = True,
        source: int = 0,
        seed: int = -1,
    ) -> int:
        """Append one whole episode (every key with the same length T >= 1); returns its index."""
        self._check_writable()
        arrays = {k: np.asarray(v) for k, v in data.items()}
        if not arrays:
            raise UserError(f"Cannot add an episode without data to '{self.path}'.")
        lengths = {k: len(v) for k, v in arrays.items()}
        length = next(iter(lengths.values()))
        if length == 0 or any(n != length for n in lengths.values()):
            raise UserError(
                f"Episode for '{self.path}' has keys of different or zero lengths: {lengths}."
            )
        if self.num_episodes:
            known = set(self.keys)
            if set(arrays) != known:
                missing, extra = sorted(known - set(arrays)), sorted(set(arrays) - known)
                raise UserError(
                    f"Episode keys do not match store '{self.path}': missing {missing}, "
                    f"unexpected {extra}."
                )
            for k, v in arrays.items():
                info = self._attrs["keys"][k]
                if list(v.shape[1:]) != info["shape"]:
                    raise UserError(
                        f"Key '{k}' of store '{self.path}' has step shape {tuple(info['shape'])},"
                        f" but the episode has {tuple(v.shape[1:])}."
                    )
                arrays[k] = v.astype(info["dtype"], copy=False)
        else:
            for k, v in arrays.items():
                if k not in self._root["data"]:
                    self._create_key(k, v)
        start = self.num_steps
        # 1) data rows (invisible until committed)
        for k, v in arrays.items():
            arr = self._root["data"][k]
            if arr.shape[0] != start:  # leftovers of an interrupted write
                arr.resize((start, *arr.shape[1:]))
            arr.append(v, axis=0)
        # 2) meta rows
        tasks = self.tasks
        if task not in tasks:
            tasks.append(task)
        n = self.num_episodes
        row = {
            "episode_ends": start + length,
            "episode_task": tasks.index(task),
            "episode_success": bool(success),
            "episode_source": int(source),
            "episode_seed": int(seed),
        }
        for name, value in row.items():
            arr = self._root["meta"][name]
            if arr.shape[0] != n:
                arr.resize((n,))
            arr.append(np.asarray([value], dtype=_META[name]))
            self._meta[name] = np.append(self._meta[name], np.asarray(value, _META[name]))
        # 3) commit: one atomic rewrite of the root attributes
        self._update_attrs(num_episodes=n + 1, tasks=tasks, keys=self._attrs["keys"])
        self._stats_cache.clear()
        return n

    def write_key(self, key: str, rows: np.ndarray, overwrite: bool = False, **extra: Any) -> None:
        """Add a whole new key for every committed step (e.g. precomputed image features).

        ``rows`` has one row per step, in store order. The key becomes visible only once fully
        written (it is registered in the attributes last), so an interrupted write leaves the
        store as it was.
        """
        self._check_writable()
        rows = np.asarray(rows)
        if len(rows) != self.num_steps:
            raise UserError(
                f"New key '{key}' for '{self.path}' has {len(rows)} rows; the store has "
                f"{self.num_steps} steps."
            )
        if key in self._attrs["keys"]:
            if not overwrite:
                raise UserError(f"Episode store '{self.path}' already has key '{key}'.")
            keys = {k: dict(v) for k, v in self._attrs["keys"].items() if k != key}
            self._update_attrs(keys=keys)
        if key in self._root["data"]:
            del self._root["data"][key]
        self._create_key(key, rows[:1])
        info = self._attrs["keys"].pop(key)
        arr = self._root["data"][key]
        arr.resize(rows.shape)
        step = max(1, arr.chunks[0])
        for start in range(0, len(rows), step):
            arr[start : start + step] = rows[start : start + step]
        keys = {k: dict(v) for k, v in self._attrs["keys"].items()}
        keys[key] = {**info, **extra}
        self._update_attrs(keys=keys)
        self._stats_cache.pop(key, None)

    def close(self) -> None:
        """Finish writing: compute normalisation statistics. Reading stores need no close."""
        stale = self._attrs.get("stats_num_steps") != self.num_steps
        if self._writable and self.num_steps and stale:
            self.compute_stats()

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
