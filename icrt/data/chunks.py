"""Direct chunk reads for the episode store's frame and feature arrays.

A training window needs a few dozen consecutive rows of each camera. Reading them through
``zarr.Array.__getitem__`` costs about 10 ms of zarr's asynchronous machinery per call, which
dominates the read itself once the store no longer fits in memory (39 windows/s). The store
writes these arrays in one fixed, documented zarr v3 layout, so they can be read the way the
zarr sharding specification lays them out on disk:

* the array is split along time into *shards*, one file each (``c/<i>/0/0/0``);
* a shard holds *inner chunks* of a few rows, each an lz4 block (numcodecs' framing: a 4-byte
  little-endian size, then the block) followed by its CRC32C, then the shard index:
  ``(offset, nbytes)`` as little-endian uint64 per inner chunk and a CRC32C of the index (an
  empty chunk has both set to 2**64 - 1).

:class:`ChunkReader` opens the shard, reads its index, ``pread``s just the inner chunks the rows
fall in, checks them and decodes them straight into the output. Every check zarr would make is
kept (index and chunk checksums, decoded size), and a missing inner chunk, which zarr would read
as zeros, is an error instead. Chunks that are zstd frames (older stores: one chunk per file,
no shard) are read the same way; :func:`chunk_reader` returns None for a layout it does not
know, and the store falls back to zarr.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr
from google_crc32c import value as crc32c
from numcodecs import LZ4, Zstd
from numcodecs.checksum32 import CRC32C

_EMPTY = np.uint64(2**64 - 1)
_ZSTD = Zstd()
_LZ4 = LZ4()
_CRC = CRC32C()


class ChunkError(Exception):
    """A chunk that is missing, truncated or does not decode (the caller names the store)."""


class ChunkReader:
    """Reads rows ``start:stop`` of one array straight from its chunk files."""

    def __init__(self, folder: Path, shape: tuple[int, ...], dtype: np.dtype,
                 chunk_rows: int, shard_rows: int | None, lz4: bool = False) -> None:
        self.folder = folder
        self.lz4 = lz4  # lz4 + crc32c chunks, else zstd frames
        self.dtype = dtype
        self.row_shape = shape[1:]
        self.chunk_rows = chunk_rows
        self.file_rows = shard_rows or chunk_rows
        self.per_file = self.file_rows // chunk_rows
        self.sharded = shard_rows is not None
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        self.rest = "/".join("0" for _ in self.row_shape)

    def file(self, i: int) -> Path:
        return self.folder / "c" / (f"{i}/{self.rest}" if self.rest else str(i))

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop``, into ``out`` (a C-contiguous array of that shape) if given."""
        if out is None:
            out = np.empty((max(0, stop - start), *self.row_shape), self.dtype)
        if stop <= start:
            return out
        flat = out.reshape(-1).view(np.uint8)
        first, last = start // self.chunk_rows, (stop - 1) // self.chunk_rows
        for f in range(first // self.per_file, last // self.per_file + 1):
            lo = max(first, f * self.per_file)
            hi = min(last, (f + 1) * self.per_file - 1)
            self._read_file(f, lo, hi, start, stop, flat)
        return out

    def _read_file(self, f: int, lo: int, hi: int, start: int, stop: int,
                   flat: np.ndarray) -> None:
        path = self.file(f)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ChunkError(f"chunk file '{path.name}' is missing") from None
        try:
            if self.sharded:
                index = self._index(fd, path)
            for c in range(lo, hi + 1):
                if self.sharded:
                    offset, nbytes = index[c - f * self.per_file]
                    if offset == _EMPTY:
                        raise ChunkError(f"inner chunk {c} of '{path.name}' is empty")
                    raw = os.pread(fd, int(nbytes), int(offset))
                    if len(raw) != nbytes:
                        raise ChunkError(f"'{path.name}' is truncated")
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
            os.close(fd)

    def _decode(self, raw: bytes, out: np.ndarray | None):
        if not self.lz4:
            return _ZSTD.decode(raw, out=out)
        if len(raw) < 8 or crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise ValueError("checksum mismatch")
        return _LZ4.decode(memoryview(raw)[:-4], out=out)

    def _index(self, fd: int, path: Path) -> np.ndarray:
        size = os.fstat(fd).st_size
        n = self.per_file * 16 + 4
        if size < n:
            raise ChunkError(f"'{path.name}' is truncated ({size} bytes)")
        try:
            body = _CRC.decode(os.pread(fd, n, size - n))
        except RuntimeError as e:
            raise ChunkError(f"the shard index of '{path.name}' is corrupted ({e})") from None
        return np.frombuffer(body, "<u8").reshape(-1, 2)


def _name(codec: object) -> str:
    return type(codec).__name__


def _chunk_codec(codecs: tuple) -> str | None:
    """'zstd' or 'lz4' for the store's own chunk encodings (little-endian bytes, then zstd, or
    lz4 + crc32c), else None."""
    if not codecs or _name(codecs[0]) != "BytesCodec" or not str(
            getattr(codecs[0], "endian", None) or "little").endswith("little"):
        return None
    names = [_name(c) for c in codecs[1:]]
    if names == ["ZstdCodec"]:
        return "zstd"
    if names == ["LZ4", "Crc32cCodec"]:
        return "lz4"
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
                           shard_rows, lz4=codec == "lz4")
    codec = _chunk_codec(codecs)
    if codec is None:
        return None
    return ChunkReader(folder, tuple(arr.shape), dtype.newbyteorder("<"), int(arr.chunks[0]),
                       None, lz4=codec == "lz4")
