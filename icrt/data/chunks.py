"""Direct chunk reads for the episode store's frame and feature arrays.

A training window needs a few dozen consecutive rows of each camera. Reading them through
``zarr.Array.__getitem__`` costs about 10 ms of zarr's asynchronous machinery per call, which
dominates the read itself once the store no longer fits in memory (39 windows/s). The store
writes these arrays in one fixed, documented zarr v3 layout, so they can be read the way the
zarr sharding specification lays them out on disk:

* the array is split along time into *shards*, one file each (``c/<i>/0/0/0``);
* a shard holds *inner chunks* of a few rows, each an lz4 block (numcodecs' framing: a 4-byte
  little-endian size, then the block) or, for frames lz4 cannot halve, the rows' bytes as they
  are, followed by its CRC32C, then the shard index: ``(offset, nbytes)`` as little-endian
  uint64 per inner chunk and a CRC32C of the index (an empty chunk has both set to 2**64 - 1).

:class:`ChunkReader` opens the shard, reads its index (both kept for shards that can no longer
change), reads the inner chunks the rows fall in with one ``pread`` when they lie one after
another (uncompressed ones with one ``preadv`` straight into the output), checks them and
decodes them straight into the output. Every check zarr would make is
kept (index and chunk checksums, decoded size), and a missing inner chunk, which zarr would read
as zeros, is an error instead. Chunks that are zstd frames (older stores: one chunk per file,
no shard) are read the same way; :func:`chunk_reader` returns None for a layout it does not
know, and the store falls back to zarr.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import zarr
from google_crc32c import value as crc32c
from numcodecs import LZ4, Zstd
from numcodecs.checksum32 import CRC32C

_EMPTY = np.uint64(2**64 - 1)


def _open_file_budget() -> int:
    """Chunk files all readers of a process may keep open: a quarter of the descriptor limit,
    at most 512, so that many stores and keys never exhaust it."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(0, min(512, (soft if soft > 0 else 1024) // 4))


_BUDGET_LOCK = threading.Lock()
_budget = [_open_file_budget()]  # descriptors still free to keep, shared by every reader
_ZSTD = Zstd()
_LZ4 = LZ4()
_CRC = CRC32C()


class ChunkError(Exception):
    """A chunk that is missing, truncated or does not decode (the caller names the store)."""


class ChunkReader:
    """Reads rows ``start:stop`` of one array straight from its chunk files.

    Safe to call from several threads at once (``pread`` and the decoders release the GIL, so
    a window's chunks decode in parallel). The index and file descriptor of a *complete* shard
    (every row of it below the array's length when the reader was made) are kept for the
    reader's lifetime (at most ``max_open`` descriptors per reader, and a process-wide budget
    well inside the descriptor limit): appending rows never rewrites such a shard. The last,
    growing shard is opened and indexed on every read."""

    def __init__(self, folder: Path, shape: tuple[int, ...], dtype: np.dtype,
                 chunk_rows: int, shard_rows: int | None, codec: str = "zstd",
                 max_open: int = 64) -> None:
        self.folder = folder
        self.codec = codec  # "zstd" frames, "lz4" + crc32c blocks or "raw" bytes + crc32c
        self.dtype = dtype
        self.row_shape = shape[1:]
        self.chunk_rows = chunk_rows
        self.file_rows = shard_rows or chunk_rows
        self.per_file = self.file_rows // chunk_rows
        self.sharded = shard_rows is not None
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        self.rest = "/".join("0" for _ in self.row_shape)
        self._chunk_dir = str(folder / "c")
        self.complete_files = int(shape[0]) // self.file_rows if shape else 0
        self.max_open = max_open
        self._lock = threading.Lock()
        self._indexes: dict[int, np.ndarray] = {}  # complete shards' indexes
        self._fds: dict[int, int] = {}  # complete shards' open files (never closed early)

    def file(self, i: int) -> str:
        return f"{self._chunk_dir}/{i}/{self.rest}" if self.rest else f"{self._chunk_dir}/{i}"

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop``, into ``out`` (a C-contiguous array of that shape) if given."""
        if out is None:
            out = np.empty((max(0, stop - start), *self.row_shape), self.dtype)
        if stop <= start:
            return out
        flat = out.reshape(-1).view(np.uint8)
        for f, lo, hi in self._files(start, stop):
            self._read_file(f, lo, hi, start, stop, flat)
        return out

    def _files(self, start: int, stop: int):
        """(file, first inner chunk, last inner chunk) of every chunk file rows
        ``start:stop`` (not empty) fall in; chunks are numbered across the array."""
        first, last = start // self.chunk_rows, (stop - 1) // self.chunk_rows
        for f in range(first // self.per_file, last // self.per_file + 1):
            yield f, max(first, f * self.per_file), min(last, (f + 1) * self.per_file - 1)

    def close(self) -> None:
        """Close the files this reader keeps open (it still reads, opening them per read)."""
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        with _BUDGET_LOCK:
            _budget[0] += len(fds)

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()

    def _open(self, f: int) -> tuple[int, bool]:
        """(descriptor, whether the caller must close it) of chunk file ``f``."""
        fd = self._fds.get(f)
        if fd is not None:
            return fd, False
        path = self.file(f)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ChunkError(f"chunk file '{_short(path)}' is missing") from None
        if f < self.complete_files:
            with self._lock, _BUDGET_LOCK:
                if f not in self._fds and len(self._fds) < self.max_open and _budget[0] > 0:
                    self._fds[f] = fd
                    _budget[0] -= 1
                    return fd, False
        return fd, True

    def _read_file(self, f: int, lo: int, hi: int, start: int, stop: int,
                   flat: np.ndarray) -> None:
        fd, owned = self._open(f)
        path = self.file(f)
        try:
            if self.sharded:
                spans = self._shard_index(f, fd, path)[
                    lo - f * self.per_file:hi - f * self.per_file + 1]
                if (spans[:, 0] == _EMPTY).any():
                    c = lo + int(np.flatnonzero(spans[:, 0] == _EMPTY)[0])
                    raise ChunkError(f"inner chunk {c} of '{_short(path)}' is empty")
                # chunks written one after another are one read
                begin = int(spans[0, 0])
                end = int(spans[-1, 0] + spans[-1, 1])
                contiguous = end - begin == int(spans[:, 1].sum())
                if contiguous and self.codec == "raw":
                    self._read_raw(fd, path, lo, hi, begin, end - begin, start, stop, flat)
                    return
                blob = os.pread(fd, end - begin, begin) if contiguous else None
                if blob is not None and len(blob) != end - begin:
                    raise ChunkError(f"'{_short(path)}' is truncated")
            for c in range(lo, hi + 1):
                if self.sharded:
                    offset, nbytes = (int(v) for v in spans[c - lo])
                    if blob is not None:
                        raw = blob[offset - begin:offset - begin + nbytes]
                    else:
                        raw = os.pread(fd, nbytes, offset)
                        if len(raw) != nbytes:
                            raise ChunkError(f"'{_short(path)}' is truncated")
                else:
                    raw = os.pread(fd, os.fstat(fd).st_size, 0)
                c0 = c * self.chunk_rows
                a, b = max(start, c0), min(stop, c0 + self.chunk_rows)
                whole = b - a == self.chunk_rows  # decode straight into the output
                dest = flat[(a - start) * self.row_bytes:(b - start) * self.row_bytes]
                try:
                    data = self._decode(raw, dest if whole else None)
                except (RuntimeError, ValueError) as e:  # bad block, checksum, wrong size
                    raise ChunkError(f"inner chunk {c} does not decode ({e})") from None
                if not whole:
                    if len(data) != self.chunk_rows * self.row_bytes:
                        raise ChunkError(f"inner chunk {c} decodes to {len(data)} bytes, not "
                                         f"{self.chunk_rows * self.row_bytes}")
                    dest[:] = np.frombuffer(data, np.uint8)[
                        (a - c0) * self.row_bytes:(b - c0) * self.row_bytes]
        finally:
            if owned:
                os.close(fd)

    def prefetch(self, start: int, stop: int) -> None:
        """Ask the OS to start reading the chunks of rows ``start:stop`` from the disk in the
        background (``posix_fadvise(WILLNEED)``), so that the reads of a batch's windows
        overlap; problems are left for :meth:`read` to report."""
        if stop <= start or not hasattr(os, "posix_fadvise"):
            return
        for f, lo, hi in self._files(start, stop):
            try:
                fd, owned = self._open(f)
            except ChunkError:
                continue
            try:
                begin, length = 0, 0  # 0: to the end of an unsharded chunk file
                if self.sharded:
                    spans = self._shard_index(f, fd, self.file(f))[
                        lo - f * self.per_file:hi - f * self.per_file + 1]
                    if (spans[:, 0] == _EMPTY).any():
                        continue
                    begin = int(spans[:, 0].min())
                    length = int((spans[:, 0] + spans[:, 1]).max()) - begin
                os.posix_fadvise(fd, begin, length, os.POSIX_FADV_WILLNEED)
            except (ChunkError, OSError):
                pass
            finally:
                if owned:
                    os.close(fd)

    def _shard_index(self, f: int, fd: int, path: str) -> np.ndarray:
        index = self._indexes.get(f)
        if index is None:
            index = self._index(fd, path)
            if f < self.complete_files:
                self._indexes[f] = index
        return index

    def _read_raw(self, fd: int, path: str, lo: int, hi: int, offset: int, nbytes: int,
                  start: int, stop: int, flat: np.ndarray) -> None:
        """Uncompressed chunks lo..hi, stored one after another from ``offset``: one
        ``preadv`` straight into the output (a scratch row block for partly needed chunks),
        then each chunk's CRC32C checked."""
        size = self.chunk_rows * self.row_bytes
        parts, checks = [], []
        for c in range(lo, hi + 1):
            c0 = c * self.chunk_rows
            a, b = max(start, c0), min(stop, c0 + self.chunk_rows)
            if b - a == self.chunk_rows:
                body = flat[(a - start) * self.row_bytes:(b - start) * self.row_bytes]
            else:
                body = np.empty(size, np.uint8)
            crc = bytearray(4)
            parts += [body, crc]
            checks.append((c, body, crc, a, b, c0))
        if nbytes != len(checks) * (size + 4):
            raise ChunkError(f"inner chunks {lo}-{hi} of '{_short(path)}' hold {nbytes} bytes, "
                             f"not {len(checks) * (size + 4)}")
        if os.preadv(fd, parts, offset) != nbytes:
            raise ChunkError(f"'{_short(path)}' is truncated")
        for c, body, crc, a, b, c0 in checks:
            if crc32c(body) != int.from_bytes(crc, "little"):
                raise ChunkError(f"inner chunk {c} does not decode (checksum mismatch)")
            if b - a != self.chunk_rows:
                flat[(a - start) * self.row_bytes:(b - start) * self.row_bytes] = body[
                    (a - c0) * self.row_bytes:(b - c0) * self.row_bytes]

    def _decode(self, raw, out: np.ndarray | None):
        if self.codec == "zstd":
            return _ZSTD.decode(raw, out=out)
        if len(raw) < 4 or crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise ValueError("checksum mismatch")
        if self.codec == "raw":
            body = np.frombuffer(raw, np.uint8, len(raw) - 4)
            if out is None:
                return body
            if len(body) != out.nbytes:
                raise ValueError(f"{len(body)} bytes, not {out.nbytes}")
            out.reshape(-1).view(np.uint8)[:] = body
            return out
        return _LZ4.decode(memoryview(raw)[:-4], out=out)

    def _index(self, fd: int, path: str) -> np.ndarray:
        size = os.fstat(fd).st_size
        n = self.per_file * 16 + 4
        if size < n:
            raise ChunkError(f"'{_short(path)}' is truncated ({size} bytes)")
        try:
            body = _CRC.decode(os.pread(fd, n, size - n))
        except RuntimeError as e:
            raise ChunkError(f"the shard index of '{_short(path)}' is corrupted ({e})") from None
        return np.frombuffer(body, "<u8").reshape(-1, 2)


def _short(path: str) -> str:
    """A chunk file as errors name it: its path inside the array (``c/3/0/0/0``)."""
    return path[path.rfind("/c/") + 1:]


def _name(codec: object) -> str:
    return type(codec).__name__


def _chunk_codec(codecs: tuple) -> str | None:
    """'zstd', 'lz4' or 'raw' for the store's own chunk encodings (little-endian bytes, then
    zstd, lz4 + crc32c, or crc32c alone), else None."""
    if not codecs or _name(codecs[0]) != "BytesCodec" or not str(
            getattr(codecs[0], "endian", None) or "little").endswith("little"):
        return None
    names = [_name(c) for c in codecs[1:]]
    if names == ["ZstdCodec"]:
        return "zstd"
    if names == ["LZ4", "Crc32cCodec"]:
        return "lz4"
    if names == ["Crc32cCodec"]:
        return "raw"
    return None


def chunk_reader(arr: zarr.Array, folder: Path) -> ChunkReader | None:
    """A direct reader for ``arr`` (stored under ``folder``), or None if its layout is not the
    store's own (then zarr reads it)."""
    meta = arr.metadata
    enc = getattr(meta, "chunk_key_encoding", None)
    if getattr(enc, "name", None) != "default" or getattr(enc, "separator", "/") != "/":
        return None
    if len(arr.shape) < 1 or any(int(c) != int(s) for c, s in
                                 zip(arr.chunks[1:], arr.shape[1:], strict=True)):
        return None  # chunked across more than time
    dtype = np.dtype(arr.dtype)
    if dtype.byteorder == ">" or dtype.kind not in "biuf":
        return None
    codecs = tuple(getattr(meta, "codecs", ()))
    if len(codecs) == 1 and _name(codecs[0]) == "ShardingCodec":
        shard = codecs[0]
        loc = getattr(shard.index_location, "value", shard.index_location)
        index = tuple(shard.index_codecs)
        codec = _chunk_codec(tuple(shard.codecs))
        if (loc != "end" or codec is None or len(index) != 2
                or _name(index[0]) != "BytesCodec" or _name(index[1]) != "Crc32cCodec"):
            return None
        shard_rows = int(arr.shards[0])
        chunk_rows = int(shard.chunk_shape[0])
        if shard_rows % chunk_rows:
            return None
        return ChunkReader(folder, tuple(arr.shape), dtype.newbyteorder("<"), chunk_rows,
                           shard_rows, codec=codec)
    codec = _chunk_codec(codecs)
    if codec is None:
        return None
    return ChunkReader(folder, tuple(arr.shape), dtype.newbyteorder("<"), int(arr.chunks[0]),
                       None, codec=codec)
