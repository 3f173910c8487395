"""Exact and near-duplicate removal of passages.

Exact: a 64-bit hash of the normalised text (case, punctuation and spacing ignored).
Near: MinHash-LSH (datasketch) over word 13-gram shingles at Jaccard >= threshold;
LSH candidates are confirmed with the MinHash estimate, so a false LSH collision never
drops a distinct passage.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np
from datasketch import MinHash, MinHashLSH

_NON_WORD = re.compile(r"[^\w\s]+")


def normalize(text: str) -> str:
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def text_hash(normalized: str) -> bytes:
    return hashlib.blake2b(normalized.encode(), digest_size=8).digest()


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    ngram: int = 13
    num_perm: int = 128
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"dedup threshold must be in (0, 1], got {self.threshold}")
        if self.ngram <= 0:
            raise ValueError(f"dedup ngram must be positive, got {self.ngram}")


@dataclass
class Deduplicator:
    """Streams passages through `check`; remembers what it kept. Counts what it dropped."""

    config: DedupConfig = field(default_factory=DedupConfig)
    exact_dropped: int = 0
    near_dropped: int = 0

    def __post_init__(self) -> None:
        self._seen: set[bytes] = set()
        self._lsh = MinHashLSH(threshold=self.config.threshold, num_perm=self.config.num_perm)
        self._sigs: dict[int, MinHash] = {}
        seed_hash = MinHash(num_perm=self.config.num_perm, seed=self.config.seed)
        self._permutations, self._scheme = seed_hash.permutations, seed_hash.scheme

    def _minhash(self, words: list[str]) -> MinHash:
        n = self.config.ngram
        shingles = [" ".join(words[i:i + n]).encode() for i in range(max(1, len(words) - n + 1))]
        m = MinHash(num_perm=self.config.num_perm, seed=self.config.seed, permutations=self._permutations,
                    scheme=self._scheme)
        m.update_batch(shingles)
        return m

    def check(self, key: int, text: str) -> bool:
        """True to keep `text` (remembered under `key`), False if it duplicates a kept one."""
        norm = normalize(text)
        if self.config.exact:
            h = text_hash(norm)
            if h in self._seen:
                self.exact_dropped += 1
                return False
        if self.config.near:
            m = self._minhash(norm.split())
            if any(self._sigs[c].jaccard(m) >= self.config.threshold for c in self._lsh.query(m)):
                self.near_dropped += 1
                return False
            self._lsh.insert(key, m, check_duplication=False)
            self._sigs[key] = m
        if self.config.exact:
            self._seen.add(h)
        return True
