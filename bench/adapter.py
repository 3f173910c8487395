"""The one interface every benchmarked index sits behind, ours and peers alike.

The runner builds an index into a work directory, drops it, and opens it again from
there, so that the resident memory it measures is what a served index holds, not what
the build left behind. Every adapter therefore persists; most peers do anyway.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bench.measure import disk_bytes


class PeerUnavailable(RuntimeError):
    """The library behind an adapter cannot be imported; the run records it as skipped."""


def require(module: str, install: str) -> Any:
    """Import a peer library or raise PeerUnavailable naming how to install it."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, but also ABI errors from compiled wheels
        raise PeerUnavailable(f"{module} not importable ({type(e).__name__}: {e}); install with: {install}") from e


class Adapter(ABC):
    """Build, persist, reopen and search one index; `metric` is "ip" or "l2".

    `build_keys` are grid parameters that need a new build; `search_keys` only change
    the queries. Scores are not returned: recall only needs ids.
    """

    name: ClassVar[str]
    build_keys: ClassVar[tuple[str, ...]] = ()
    search_keys: ClassVar[tuple[str, ...]] = ()
    supports_tenants: ClassVar[bool] = False

    def __init__(self, workdir: Path, dim: int, metric: str, threads: int) -> None:
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        self.workdir = Path(workdir)
        self.dim = dim
        self.metric = metric
        self.threads = threads

    @classmethod
    def check_available(cls) -> None:
        """Raise PeerUnavailable when the library is missing; ours are always there."""

    @abstractmethod
    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        """Build over `base` (ids are row numbers) and persist everything under workdir."""

    @abstractmethod
    def load(self, params: dict[str, Any]) -> None:
        """Open the persisted index from workdir, ready to search (build params given)."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, params: dict[str, Any], tenant: str | None = None) -> np.ndarray:
        """Ids (Q, k) int64 of the top-k, -1 where fewer were found."""

    def close(self) -> None:
        """Drop the in-memory index (files stay)."""

    def index_files(self) -> list[Path]:
        """Files the opened index reads; their size is disk_bytes and --cold evicts them."""
        return [self.workdir]

    def disk_bytes(self) -> int:
        return disk_bytes(self.index_files())


def pad_ids(rows: list[list[int]], k: int) -> np.ndarray:
    """Lists of ids (any lengths) as an int64 (Q, k) array padded with -1."""
    out = np.full((len(rows), k), -1, np.int64)
    for i, r in enumerate(rows):
        r = r[:k]
        out[i, :len(r)] = r
    return out
