"""Posting list codec: one blob per list, ids, versions and vectors contiguous.

Layout: 8-byte header (magic b"PL", dtype code, flags, count uint32), then int64 ids,
uint16 versions, rows (float16 or float32 vectors, or uint64 words of binary codes),
optionally zstd-compressed after the header. Decoding is zero-copy np.frombuffer slices.
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
            + np.ascontiguousarray(p.vectors, dtype).tobytes())
    flags = 0
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
    vectors = np.frombuffer(body, dtype, n * dim, 10 * n).reshape(n, dim)
    return Posting(ids, versions, vectors)
