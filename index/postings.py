"""Posting list codec: one blob per list, ids, versions and vectors contiguous.

Layout: 8-byte header (magic b"PL", dtype code, flags, count uint32), then int64 ids,
uint16 versions, zero padding (flag _PADDED) so the rows start 8-byte aligned, rows (float16
or float32 vectors, or uint64 words of binary codes), optionally zstd-compressed after the
header. Decoding is zero-copy np.frombuffer slices.

Why the padding: without it the rows of a list with an odd count start 2 bytes off a 4-byte
boundary, and numpy scores a misaligned float32 matrix ~30x slower (no BLAS). LMDB puts large
values on page-aligned overflow pages, so aligned within the blob is aligned in memory.
Blobs written before the flag still decode (their rows may be misaligned; `aligned` copies).
A row's width (dim for vectors, bits x words for codes) is the reader's to know.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_HEADER = struct.Struct("<2sBBI")
_MAGIC = b"PL"
_DTYPES = {0: np.dtype("<f2"), 1: np.dtype("<f4"), 2: np.dtype("<u8")}
_CODES = {v: k for k, v in _DTYPES.items()}
_ZSTD = 1
_PADDED = 2


def _pad(n: int) -> int:
    """Zero bytes after n ids and versions so the rows start 8-byte aligned."""
    return -(10 * n) % 8


@dataclass
class Posting:
    ids: np.ndarray  # int64 (n,)
    versions: np.ndarray  # uint16 (n,)
    vectors: np.ndarray  # float16/float32 (n, dim), or uint64 codes (n, bits * words)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, dim: int, dtype: str = "float16") -> Posting:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.uint16), np.zeros((0, dim), dtype))

    def take(self, mask_or_index: np.ndarray) -> Posting:
        return Posting(self.ids[mask_or_index], self.versions[mask_or_index], self.vectors[mask_or_index])

    def concat(self, other: Posting) -> Posting:
        return Posting(np.concatenate([self.ids, other.ids]), np.concatenate([self.versions, other.versions]),
                       np.concatenate([self.vectors, other.vectors.astype(self.vectors.dtype)]))


def encode(p: Posting, compress: bool = False) -> bytes:
    dtype = np.dtype(p.vectors.dtype).newbyteorder("<")
    body = (np.ascontiguousarray(p.ids, "<i8").tobytes() + np.ascontiguousarray(p.versions, "<u2").tobytes()
            + bytes(_pad(len(p.ids))) + np.ascontiguousarray(p.vectors, dtype).tobytes())
    flags = _PADDED
    if compress:
        import zstandard
        body = zstandard.ZstdCompressor(level=3).compress(body)
        flags |= _ZSTD
    return _HEADER.pack(_MAGIC, _CODES[dtype], flags, len(p.ids)) + body


def decode(blob: bytes | memoryview, dim: int) -> Posting:
    """The posting in `blob`; `dim` is the row width (elements per row)."""
    magic, code, flags, n = _HEADER.unpack_from(blob, 0)
    if magic != _MAGIC or code not in _DTYPES:
        raise ValueError("not a posting list blob")
    body = memoryview(blob)[_HEADER.size:]
    if flags & _ZSTD:
        import zstandard
        body = memoryview(zstandard.ZstdDecompressor().decompress(bytes(body)))
    dtype = _DTYPES[code]
    ids = np.frombuffer(body, "<i8", n, 0)
    versions = np.frombuffer(body, "<u2", n, 8 * n)
    start = 10 * n + (_pad(n) if flags & _PADDED else 0)
    vectors = np.frombuffer(body, dtype, n * dim, start).reshape(n, dim)
    return Posting(ids, versions, vectors)


def aligned(rows: np.ndarray) -> np.ndarray:
    """rows, copied only when misaligned (a blob from before _PADDED): BLAS needs alignment."""
    return rows if rows.flags.aligned else np.require(rows, requirements="AC")
