"""Index kinds by name: the one place that maps a manifest's `index.kind` to a class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from index.base import Metric, VectorIndex
from index.flat import FlatIndex

INDEX_KINDS: dict[str, type] = {FlatIndex.kind: FlatIndex}


def _kind_class(kind: str) -> type:
    try:
        return INDEX_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(sorted(INDEX_KINDS))}") from None


def create_index(kind: str, dim: int, metric: Metric = "ip", **params: Any) -> VectorIndex:
    """A new, empty index of `kind`; `params` are that kind's config fields."""
    return _kind_class(kind)(dim, metric, **params)


def load_index(kind: str, directory: Path) -> VectorIndex:
    return _kind_class(kind).load(directory)
