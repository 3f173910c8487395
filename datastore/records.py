"""Passages as stored: the domain dataclass and its LMDB key/value encodings.

Keys are big-endian uint64 so that LMDB's byte order equals id order; values are
compact JSON (small, readable with any tool, stable across Python versions).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

_KEY = struct.Struct(">Q")
MAX_ID = 2**63 - 1  # ids travel as int64 through faiss


def key(i: int) -> bytes:
    return _KEY.pack(i)


def key_id(k: bytes) -> int:
    return _KEY.unpack(k)[0]


@dataclass
class Passage:
    id: int
    text: str
    title: str = ""
    source: str = ""
    tenants: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        record = {"text": self.text, "title": self.title}
        if self.source:
            record["source"] = self.source
        if self.tenants:
            record["tenants"] = list(self.tenants)
        if self.metadata:
            record["metadata"] = self.metadata
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, pid: int, value: bytes) -> "Passage":
        r = json.loads(value)
        return cls(pid, r["text"], r.get("title", ""), r.get("source", ""), tuple(r.get("tenants", ())),
                   r.get("metadata", {}))

    def embedding_input(self) -> str:
        """What the encoder sees: the document title kept with every passage (as MassiveDS does)."""
        return f"{self.title}\n{self.text}" if self.title else self.text

    def visible_to(self, tenant: str | None) -> bool:
        return not self.tenants or (tenant is not None and tenant in self.tenants)


VECTOR_DTYPES = {"float32": np.float32, "float16": np.float16}


def encode_vector(vector: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(vector, dtype=VECTOR_DTYPES[dtype]).tobytes()


def decode_vectors(blobs: list[bytes], dtype: str, dim: int) -> np.ndarray:
    """Stack stored vectors into float32 (n, dim)."""
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype=VECTOR_DTYPES[dtype]).reshape(len(blobs), dim).astype(np.float32)


@dataclass
class Hit:
    """One search result: the passage id, its score, and the passage (text only when asked)."""

    id: int
    score: float
    passage: Passage | None = None

    @property
    def title(self) -> str:
        return self.passage.title if self.passage else ""

    @property
    def text(self) -> str:
        return self.passage.text if self.passage else ""
