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
bumping ``attrs["num_episodes"]`` (zarr's local store replaces files atomically); the chunk
files of the episode are fsynced before that write and the attributes after it, so neither a
kill nor a power cut tears a commit. Readers see only committed episodes; a writer that reopens
a store rolls uncommitted rows back. So a writer killed at any moment leaves a store holding
exactly its completed episodes. One writer at a time: writers hold an exclusive ``fcntl`` lock
on ``.NAME.zarr.lock`` beside the store, and a second one fails at once.

Layout of frames: image and feature keys are sharded along time (``icrt.data.chunks`` reads a
training window straight from the few small inner chunks it needs).

Integrity: low-dim chunks are zstd frames with a content checksum and frame chunks are lz4
blocks with a CRC32C (shard indexes carry one too), so a corrupted or truncated chunk fails to
decode; a *missing* chunk (which zarr would silently read as zeros) is found on open by
checking that every chunk file the committed rows need exists. Both become one sentence naming
the store, the key and the episodes affected; :meth:`EpisodeStore.verify` (and
``scripts/check_store.py``) scans a whole store. Non-finite values are refused when written.
A key's rows live in the array ``attrs["arrays"].get(key, key)``, so ``write_key(overwrite=True)``
writes the new column beside the old one and swaps them with the same single commit.

    store = EpisodeStore.create("data/demo.zarr", env={"name": "metaworld"}, fps=80)
    store.add_episode({"state": s, "action": a}, task="reach-v3", success=True)
    store.close()                                   # writes normalisation stats
    store = EpisodeStore.open("data/demo.zarr")
    ep = store.episode(0)                           # {"state": (T, S), "action": (T, A)}
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from numcodecs import LZ4 as _NumcodecsLZ4
from zarr.codecs.numcodecs import LZ4

from icrt.data.chunks import ChunkError, ChunkReader, chunk_reader
from icrt.errors import UserError
from icrt.fsutil import fsync_path, pid_alive

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
# Rows per chunk for low-dim keys.
_LOWDIM_CHUNK = 4096
# Image and feature keys: inner chunks of about 512 KB along time (at most 64 rows), so a
# training window decodes little beyond itself, in shards of about 8 MB, one file each, so a
# store stays a modest number of files; read directly by icrt.data.chunks.
_FRAME_CHUNK_BYTES = 512 << 10
_FRAME_CHUNK_ROWS = 64
_SHARD_BYTES = 8 << 20
# Quantile statistics are estimated from at most this many rows per key.
_MAX_STAT_ROWS = 1_000_000
# zstd frames carry a checksum of their content: a damaged chunk fails to decode.
_COMPRESSOR = ZstdCodec(level=0, checksum=True)
# Frames and features are lz4 blocks followed by a CRC32C of the block: on a training window
# lz4 decodes 2.7 GB/s where checksummed zstd decodes 0.5-1.5 GB/s, for chunks ~1.5x larger
# (rendered Meta-World frames still shrink ~2.7x; noisy camera frames are stored as they are).
# lz4 is a numcodecs codec outside the zarr v3 spec: zarr warns whenever it meets one
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr",
                        category=UserWarning)
_FRAME_COMPRESSORS = (LZ4(acceleration=1), Crc32cCodec())
# Frames that lz4 cannot shrink to half (camera noise, float features) are stored as they are:
# decoding them would cost more than the disk reads they save; an uncompressed window is one
# read straight into the batch (icrt.data.chunks). Decided per array from its first rows.
_FRAME_RAW = (Crc32cCodec(),)
_RAW_ABOVE = 0.5
_LZ4_PROBE = _NumcodecsLZ4(acceleration=1)
_ARRAY_CONFIG = {"write_empty_chunks": True}
_RESERVED_ATTRS = {"complete_chunks", "store_id", "format", "version", "num_episodes", "keys", "arrays", "stats",
                   "stats_num_steps"}


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


def lock_path(path: str | Path) -> Path:
    """The lock file a writer of the store at ``path`` holds (beside the store)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


# Writer locks this process holds: lock file -> [descriptor, holders]. POSIX record locks
# belong to the process, and closing *any* descriptor of the file drops them, so a second
# writer object in the same process shares the descriptor instead of opening its own.
_HELD: dict[str, list[int]] = {}


def acquire_lock(path: str | Path) -> str:
    """Take the exclusive writer lock of a store path; returns the token for
    :func:`release_lock`. The kernel drops the lock when the process dies (kill -9 included);
    the same process may take a lock it already holds."""
    lock = lock_path(path)
    key = os.path.abspath(lock)
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise UserError(
                f"Episode store '{path}' is being written by another process (it holds "
                f"'{lock}'); wait for it to finish or stop it first."
            ) from None
        raise
    _HELD[key] = [fd, 1]
    return key


def release_lock(token: str | None) -> None:
    held = _HELD.get(token) if token is not None else None
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[token]
        os.close(held[0])  # closing the descriptor releases the lock


def _file_rows(arr: zarr.Array) -> int:
    """Rows per chunk file: the shard's for sharded arrays, else the chunk's."""
    return int(arr.shards[0] if arr.shards is not None else arr.chunks[0])


def _damaged(path: Path, what: str) -> UserError:
    return UserError(
        f"Episode store '{path}' is damaged: {what}; restore it from a copy or collect it "
        f"again (scripts/check_store.py {path} lists every problem)."
    )


class EpisodeStore:
    """Reader and (single) writer of one ``.zarr`` episode store."""

    def __init__(self, path: Path, group: zarr.Group, writable: bool,
                 lock: str | None = None) -> None:
        self.path = path
        self._root = group
        self._writable = writable
        self._lock = lock
        self._attrs: dict[str, Any] = dict(group.attrs)
        # opened arrays: opening one reads its zarr.json, too slow to repeat per window read
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._readers: dict[str, ChunkReader | None] = {}  # direct chunk readers per array
        n = int(self._attrs["num_episodes"])
        self._meta = {}
        for k in _META:
            arr = self._open_array("meta", k)
            if arr.shape[0] < n:
                raise _damaged(path, f"'meta/{k}' has {arr.shape[0]} rows but {n} episodes "
                                     f"are committed")
            self._meta[k] = self._read_array(arr, f"meta/{k}", 0, n, meta=True)
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
        lock = acquire_lock(path)
        try:
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
                meta.create_array(name, shape=(0,), dtype=dtype, chunks=(_LOWDIM_CHUNK,),
                                  compressors=_COMPRESSOR, config=_ARRAY_CONFIG)
            root.attrs.update(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "num_episodes": 0,
                    "tasks": [],
                    "fps": fps,
                    "env": dict(env or {}),
                    "keys": {},
                    "arrays": {},
                    "stats": {},
                    "stats_num_steps": 0,
                    # written by a version that stores every chunk (so absence is damage)
                    "complete_chunks": True,
                    # identifies the store wherever it is opened from (splits refer to it)
                    "store_id": uuid.uuid4().hex,
                }
            )
            fsync_path(path / "zarr.json")
            fsync_path(path)
            fsync_path(path.parent)
        except BaseException:
            release_lock(lock)
            raise
        return cls(path, root, writable=True, lock=lock)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r", check: bool = True) -> EpisodeStore:
        """Open a store for reading (``"r"``) or appending (``"a"``); validates the format and
        (``check``) that every committed chunk is present."""
        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
        if not path.exists():
            raise UserError(f"Episode store '{path}' does not exist.")
        if not path.is_dir():
            raise UserError(f"Episode store '{path}' is a file, not a .zarr directory.")
        if not (path / "zarr.json").is_file():
            raise UserError(f"'{path}' is not a zarr episode store (it has no zarr.json).")
        try:
            root = zarr.open_group(str(path), mode="r+" if mode == "a" else "r")
            attrs = dict(root.attrs)
        except PermissionError as e:
            raise UserError(f"Episode store '{path}' cannot be read: {e.strerror}.") from None
        except (ValueError, KeyError, TypeError) as e:  # json errors are ValueErrors
            raise UserError(
                f"'{path}' is not a readable zarr episode store: its zarr.json is invalid "
                f"({type(e).__name__}: {e})."
            ) from None
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
        missing = [k for k in ("num_episodes", "tasks", "keys") if k not in attrs]
        if missing:  # a store another process is still creating, or a damaged one
            raise _damaged(path, f"its attributes lack '{missing[0]}' (a store still being "
                                 f"created reads like this)")
        lock = acquire_lock(path) if mode == "a" else None
        store = None
        try:
            store = cls(path, root, writable=mode == "a", lock=lock)
            if mode == "a":
                store._rollback()
            if check:
                store._check_chunks()
        except BaseException:
            if store is not None:
                store._lock = None  # released here, not again when it is collected
            release_lock(lock)
            raise
        return store

    def _rollback(self) -> None:
        """Drop rows an interrupted writer left past the last committed episode, and arrays no
        committed key points at (a key whose first episode, or whose rewrite, never committed)."""
        n = self.num_episodes
        end = self.num_steps
        live = {self._array_name(k) for k in self.keys}
        for name in list(self._root["data"].keys()):
            if name not in live:
                log.warning("%s: removing uncommitted array 'data/%s'", self.path, name)
                self._delete_array(name)
        for key in self.keys:
            arr = self.array(key)
            if arr.shape[0] != end:
                log.warning("%s: rolling back %d uncommitted rows of '%s'", self.path,
                            arr.shape[0] - end, key)
                arr.resize((end, *arr.shape[1:]))
        for name in _META:
            arr = self._open_array("meta", name)
            if arr.shape[0] != n:
                arr.resize((n,))

    def _open_array(self, group: str, name: str) -> zarr.Array:
        if (group, name) in self._arrays:
            return self._arrays[group, name]
        try:
            # every chunk is written, even an all-zero one: a missing file is then damage
            arr = self._root[group][name].with_config(_ARRAY_CONFIG)
            self._arrays[group, name] = arr
            return arr
        except KeyError:
            raise _damaged(self.path, f"the array '{group}/{name}' is missing") from None
        except (ValueError, TypeError) as e:
            raise _damaged(self.path, f"the metadata of '{group}/{name}' is unreadable "
                                      f"({type(e).__name__}: {e})") from None

    def _delete_array(self, name: str) -> None:
        self._arrays.pop(("data", name), None)
        self._readers.pop(name, None)
        del self._root["data"][name]

    def _chunk_files(self, arr: zarr.Array, group: str, name: str,
                     rows: int) -> list[tuple[Path, int]]:
        """(file, first row) of every chunk holding rows ``0:rows`` (default key encoding)."""
        enc = arr.metadata.chunk_key_encoding if hasattr(arr.metadata, "chunk_key_encoding") \
            else None
        if getattr(enc, "name", None) != "default" or getattr(enc, "separator", "/") != "/":
            return []
        step = _file_rows(arr)
        rest = "/".join("0" for _ in arr.shape[1:])
        folder = self.path / group / name / "c"
        return [(folder / (f"{i}/{rest}" if rest else str(i)), i * step)
                for i in range(-(-rows // step))]

    def _check_chunks(self) -> None:
        """Every chunk file the committed rows need must exist: zarr reads a missing one as
        zeros, which would silently become training data. Stores written before every chunk
        was stored (no ``complete_chunks`` attribute) cannot tell missing from empty."""
        if not self._attrs.get("complete_chunks"):
            return
        n_steps = self.num_steps
        for key in self.keys:
            name = self._array_name(key)
            arr = self._open_array("data", name)
            if arr.shape[0] < n_steps:
                raise _damaged(self.path, f"'data/{name}' has {arr.shape[0]} rows but "
                                          f"{n_steps} steps are committed")
            for f, row in self._chunk_files(arr, "data", name, n_steps):
                if not f.is_file():
                    eps = self._episodes_of_rows(row, row + _file_rows(arr))
                    raise _damaged(self.path, f"chunk file '{f.relative_to(self.path)}' of key "
                                              f"'{key}' ({eps}) is missing")
        for name in _META:
            arr = self._open_array("meta", name)
            for f, _ in self._chunk_files(arr, "meta", name, self.num_episodes):
                if not f.is_file():
                    raise _damaged(self.path, f"chunk file '{f.relative_to(self.path)}' of "
                                              f"'meta/{name}' is missing")

    def _episodes_of_rows(self, start: int, stop: int) -> str:
        """'episode 3' or 'episodes 3-7': the committed episodes overlapping rows start:stop."""
        ends = self.episode_ends
        if not len(ends):
            return "no committed episode"
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, max(start, stop - 1), side="right"))
        last = min(last, len(ends) - 1)
        first = min(first, last)
        return f"episode {first}" if first == last else f"episodes {first}-{last}"

    def _read_array(self, arr: zarr.Array, where: str, start: int, stop: int,
                    meta: bool = False) -> np.ndarray:
        try:
            return np.asarray(arr[start:stop])
        except (RuntimeError, ValueError, OSError) as e:  # zstd, checksum and I/O errors
            what = f"rows {start}-{stop}" if meta else self._episodes_of_rows(start, stop)
            raise _damaged(self.path, f"'{where}' does not decode at {what} "
                                      f"({type(e).__name__}: {e})") from None

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

    @property
    def store_id(self) -> str:
        """How run files (``split.json``) refer to this store, whatever the working directory:
        its id, written at creation, or its absolute path for stores written before ids."""
        sid = self._attrs.get("store_id")
        return f"id:{sid}" if sid else str(self.path.resolve())

    def key_info(self, key: str) -> dict[str, Any]:
        """``{"kind", "shape", "dtype", ...extra}`` of a key (shape excludes time)."""
        self._require_key(key)
        return dict(self._attrs["keys"][key])

    def _array_name(self, key: str) -> str:
        return self._attrs.get("arrays", {}).get(key, key)

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

    def read(self, key: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``data/<key>`` in global (concatenated) time (written into
        ``out``, a C-contiguous array of that many rows, if given)."""
        stop = min(stop, self.num_steps)
        arr = self.array(key)
        name = self._array_name(key)
        reader = self.reader(key)
        if reader is None or stop - start > 4 * reader.file_rows:  # long reads: zarr's own
            rows = self._read_array(arr, f"data/{key}", start, stop)
            if out is None:
                return rows
            out[...] = rows
            return out
        return self._read_direct(reader, f"data/{name}", start, stop, out)

    def reader(self, key: str) -> ChunkReader | None:
        """The direct chunk reader of ``data/<key>`` (made once; None where zarr reads it)."""
        name = self._array_name(key)
        if name not in self._readers:
            self._readers[name] = chunk_reader(self.array(key), self.path / "data" / name)
        return self._readers[name]

    def prefetch(self, key: str, start: int, stop: int) -> None:
        """Start reading rows ``start:stop`` of a frame or feature key from the disk in the
        background (a hint; :meth:`read` still reads and checks them)."""
        reader = self.reader(key)
        if reader is not None:
            reader.prefetch(start, min(stop, self.num_steps))

    def _read_direct(self, reader: ChunkReader, where: str, start: int, stop: int,
                     out: np.ndarray | None) -> np.ndarray:
        try:
            return reader.read(start, stop, out)
        except (ChunkError, OSError) as e:
            raise _damaged(self.path, f"'{where}' does not decode at "
                                      f"{self._episodes_of_rows(start, stop)} ({e})") from None

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
        return self._open_array("data", self._array_name(key))

    def verify(self, progress: bool = False) -> list[str]:
        """Scan the whole store: every chunk present and decodable (checksums verified), meta
        rows consistent, float keys finite. Returns one sentence per problem (empty: intact)."""
        from tqdm import tqdm

        problems: list[str] = []
        if not self._attrs.get("complete_chunks"):
            log.warning("%s was written by an older icrt that skipped all-zero chunks: a "
                        "missing chunk cannot be told from an empty one", self.path)
        ends = self.episode_ends
        if len(ends) and (np.any(np.diff(ends) <= 0) or ends[0] <= 0):
            problems.append("meta/episode_ends is not strictly increasing")
        if len(self.episode_task) and int(self.episode_task.max()) >= len(self.tasks):
            problems.append("meta/episode_task points past the task list")
        keys = self.keys
        bar = tqdm(total=len(keys) * self.num_steps, desc=f"check {self.path.name}",
                   unit="row", disable=not progress)
        for key in keys:
            try:
                arr = self.array(key)
            except UserError as e:
                problems.append(str(e))
                continue
            if arr.shape[0] < self.num_steps:
                problems.append(f"'data/{key}' has {arr.shape[0]} rows but {self.num_steps} "
                                f"steps are committed")
                continue
            step = int(arr.chunks[0])
            files = self._chunk_files(arr, "data", self._array_name(key), self.num_steps)
            for f, row in files if self._attrs.get("complete_chunks") else ():
                if not f.is_file():
                    problems.append(f"chunk file '{f.relative_to(self.path)}' of key '{key}' "
                                    f"({self._episodes_of_rows(row, row + step)}) is missing")
            for start in range(0, self.num_steps, step):
                stop = min(start + step, self.num_steps)
                try:
                    rows = self.read(key, start, stop)
                except UserError as e:
                    problems.append(str(e))
                    continue
                finally:
                    bar.update(stop - start)
                if rows.dtype.kind == "f" and not np.isfinite(rows).all():
                    bad = start + int(np.flatnonzero(~np.isfinite(rows.reshape(len(rows), -1))
                                                     .all(1))[0])
                    problems.append(f"key '{key}' has a non-finite value in "
                                    f"{self._episodes_of_rows(bad, bad + 1)}")
        bar.close()
        return problems

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
        fsync_path(self.path / "zarr.json")
        fsync_path(self.path)

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
        bad = _RESERVED_ATTRS & set(values)
        if bad:
            raise ValueError(f"attributes {sorted(bad)} are managed by the store")
        self._update_attrs(**values)

    def _create_array(self, name: str, value: np.ndarray) -> zarr.Array:
        step_shape = tuple(value.shape[1:])
        if key_kind(name) in ("image", "feature"):
            frame = max(1, int(np.prod(step_shape)) * value.dtype.itemsize)
            rows = 1 << max(0, min(_FRAME_CHUNK_ROWS, _FRAME_CHUNK_BYTES // frame).bit_length() - 1)
            shard = rows * max(1, _SHARD_BYTES // (rows * frame))
            sample = np.ascontiguousarray(value[:_FRAME_CHUNK_ROWS])
            packed = len(_LZ4_PROBE.encode(sample)) if sample.nbytes else 0
            compressors = (_FRAME_RAW if packed > _RAW_ABOVE * sample.nbytes
                           else _FRAME_COMPRESSORS)
            arr = self._root["data"].create_array(
                name, shape=(0, *step_shape), dtype=value.dtype, chunks=(rows, *step_shape),
                shards=(shard, *step_shape), compressors=compressors,
                config=_ARRAY_CONFIG,
            )
        else:
            arr = self._root["data"].create_array(
                name, shape=(0, *step_shape), dtype=value.dtype,
                chunks=(_LOWDIM_CHUNK, *step_shape), compressors=_COMPRESSOR,
                config=_ARRAY_CONFIG,
            )
        self._arrays["data", name] = arr
        return arr

    @staticmethod
    def _key_record(key: str, value: np.ndarray) -> dict[str, Any]:
        return {"kind": key_kind(key), "shape": list(value.shape[1:]), "dtype": str(value.dtype)}

    def _check_finite(self, key: str, rows: np.ndarray, what: str, offset: int = 0) -> None:
        """Refuse NaN/inf at write time, where the culprit is still known."""
        if rows.dtype.kind not in "fc":
            return
        for lo in range(0, len(rows), 65536):  # bounded memory for large feature columns
            part = np.asarray(rows[lo : lo + 65536]).reshape(min(65536, len(rows) - lo), -1)
            bad = np.flatnonzero(~np.isfinite(part).all(1))
            if len(bad):
                raise UserError(
                    f"{what} has a non-finite value (NaN or inf) in '{key}' at step "
                    f"{offset + lo + int(bad[0])}; '{self.path}' accepts finite numbers only."
                )

    def _sync_rows(self, arr: zarr.Array, group: str, name: str, start: int, stop: int) -> None:
        """fsync the chunk files holding rows start:stop, and their folders."""
        step = _file_rows(arr)
        folders = set()
        for f, row in self._chunk_files(arr, group, name, stop):
            if row + step > start:
                fsync_path(f)
                folders.add(f.parent)
        for folder in folders:
            fsync_path(folder)
        fsync_path(self.path / group / name / "zarr.json")

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
        n = self.num_episodes
        keys = {k: dict(v) for k, v in self._attrs["keys"].items()}
        if n:
            known = set(self.keys)
            if set(arrays) != known:
                missing, extra = sorted(known - set(arrays)), sorted(set(arrays) - known)
                raise UserError(
                    f"Episode keys do not match store '{self.path}': missing {missing}, "
                    f"unexpected {extra}."
                )
            for k, v in arrays.items():
                info = keys[k]
                if list(v.shape[1:]) != info["shape"]:
                    raise UserError(
                        f"Key '{k}' of store '{self.path}' has step shape {tuple(info['shape'])},"
                        f" but the episode has {tuple(v.shape[1:])}."
                    )
                arrays[k] = v.astype(info["dtype"], copy=False)
        for k, v in arrays.items():
            self._check_finite(k, v, f"Episode {n} for store '{self.path}'")
        if not n:
            keys = {}
            for k, v in arrays.items():
                if k not in self._root["data"]:
                    self._create_array(k, v)
                keys[k] = self._key_record(k, v)
            self._attrs["keys"] = keys  # committed together with the episode
        start = self.num_steps
        # 1) data rows (invisible until committed)
        for k, v in arrays.items():
            arr = self.array(k)
            if arr.shape[0] != start:  # leftovers of an interrupted write
                arr.resize((start, *arr.shape[1:]))
            arr.append(v, axis=0)
            self._sync_rows(arr, "data", self._array_name(k), start, start + length)
        # 2) meta rows
        tasks = self.tasks
        if task not in tasks:
            tasks.append(task)
        row = {
            "episode_ends": start + length,
            "episode_task": tasks.index(task),
            "episode_success": bool(success),
            "episode_source": int(source),
            "episode_seed": int(seed),
        }
        for name, value in row.items():
            arr = self._open_array("meta", name)
            if arr.shape[0] != n:
                arr.resize((n,))
            arr.append(np.asarray([value], dtype=_META[name]))
            self._sync_rows(arr, "meta", name, n, n + 1)
        # 3) commit: one atomic rewrite of the root attributes
        self._update_attrs(num_episodes=n + 1, tasks=tasks, keys=self._attrs["keys"])
        for name, value in row.items():
            self._meta[name] = np.append(self._meta[name], np.asarray(value, _META[name]))
        self._stats_cache.clear()
        return n

    def write_key(self, key: str, rows: np.ndarray, overwrite: bool = False, **extra: Any) -> None:
        """Add a whole new key for every committed step (e.g. precomputed image features).

        ``rows`` has one row per step, in store order. The rows go to a new array and the key
        points at it only once it is fully written (one attribute commit), so an interrupted
        write, a replacement (``overwrite``) included, leaves the store as it was.
        """
        self._check_writable()
        if len(rows) != self.num_steps:
            raise UserError(
                f"New key '{key}' for '{self.path}' has {len(rows)} rows; the store has "
                f"{self.num_steps} steps."
            )
        old = None
        if key in self._attrs["keys"]:
            if not overwrite:
                raise UserError(f"Episode store '{self.path}' already has key '{key}'.")
            old = self._array_name(key)
        name, version = key, 1
        while name in self._root["data"]:  # beside the live array (and any leftovers)
            if name != old and name not in {self._array_name(k) for k in self.keys}:
                self._delete_array(name)  # an interrupted write's leftover
                continue
            version += 1
            name = f"{key}.v{version}"
        first = np.asarray(rows[:1])
        arr = self._create_array(name, first)
        arr.resize((len(rows), *first.shape[1:]))
        step, per_file = int(arr.chunks[0]), _file_rows(arr)
        for lo in range(0, len(rows), per_file):  # one write per chunk file
            hi = min(len(rows), lo + per_file)
            blocks = []
            for start in range(lo, hi, step):  # rows are read once, checked, written
                blocks.append(np.asarray(rows[start : min(hi, start + step)]))
                try:
                    self._check_finite(key, blocks[-1], f"Key '{key}' for store '{self.path}'",
                                       start)
                except UserError:
                    self._delete_array(name)
                    raise
            arr[lo:hi] = np.concatenate(blocks)
        self._sync_rows(arr, "data", name, 0, len(rows))
        keys = {k: dict(v) for k, v in self._attrs["keys"].items()}
        keys[key] = {**self._key_record(key, first), **extra}
        arrays = {k: v for k, v in self._attrs.get("arrays", {}).items() if k != key}
        if name != key:
            arrays[key] = name
        self._update_attrs(keys=keys, arrays=arrays)  # the commit
        if old is not None and old != name:
            self._delete_array(old)
        self._stats_cache.pop(key, None)

    def close(self) -> None:
        """Finish writing: compute normalisation statistics and release the writer lock.
        Reading stores need no close."""
        stale = self._attrs.get("stats_num_steps") != self.num_steps
        if self._writable and self.num_steps and stale:
            self.compute_stats()
        self._writable = False
        release_lock(self._lock)
        self._lock = None

    def __del__(self) -> None:  # a writer dropped without close() still frees its lock
        release_lock(getattr(self, "_lock", None))
        self._lock = None

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- whole-store swaps


def is_empty_store(path: str | Path) -> bool:
    """An icrt store without a committed episode (what a killed or failed writer leaves)."""
    try:
        store = EpisodeStore.open(path)
    except UserError:
        return False
    return store.num_episodes == 0


def finish_swap(path: str | Path, tag: str) -> None:
    """A rebuild (``--overwrite``) killed between the two renames of :func:`swap_in` left no
    ``path`` but the complete new store (``.NAME.zarr.<tag>-PID``) and the old one
    (``.old-PID``): put the new one in place (it is only swapped in once complete)."""
    path = Path(path)
    if path.exists():
        return
    for old in path.parent.glob(f".{path.name}.old-*"):
        pid = old.name.rsplit("-", 1)[1]
        new = path.with_name(f".{path.name}.{tag}-{pid}")
        if pid.isdigit() and not pid_alive(int(pid)) and new.is_dir():
            os.replace(new, path)
            log.warning("completed the interrupted --overwrite of '%s'", path)
            return


def swap_in(new: str | Path, path: str | Path) -> None:
    """Replace the store at ``path`` by ``new`` (a rename each; the old one goes last)."""
    new, path = Path(new), Path(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(new, path)
    lock_path(new).unlink(missing_ok=True)
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)
