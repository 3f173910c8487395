"""Index kinds by name: the one place that maps a manifest's `index.kind` to a class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from index.base import Metric, VectorIndex
from index.binary import BinaryIndex
from index.curator import CuratorIndex
from index.flat import FlatIndex
from index.spann import SpannIndex
from index.storage import BlobStore

INDEX_KINDS: dict[str, type] = {cls.kind: cls for cls in (FlatIndex, SpannIndex, BinaryIndex, CuratorIndex)}


def _kind_class(kind: str) -> type:
    try:
        return INDEX_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(sorted(INDEX_KINDS))}") from None


def create_index(kind: str, dim: int, metric: Metric = "ip", storage: BlobStore | None = None,
                 **params: Any) -> VectorIndex:
    """A new, empty index of `kind`; `params` are that kind's config fields. Disk kinds keep
    their lists in `storage` (a private LMDB when None); memory kinds take none."""
    cls = _kind_class(kind)
    if getattr(cls, "uses_storage", False):
        return cls(dim, metric, storage=storage, **params)
    return cls(dim, metric, **params)


def load_index(kind: str, directory: Path, storage: BlobStore | None = None) -> VectorIndex:
    cls = _kind_class(kind)
    if getattr(cls, "uses_storage", False):
        return cls.load(directory, storage=storage)
    return cls.load(directory)


def validate_params(kind: str, params: dict[str, Any]) -> None:
    """ValueError naming the field when `params` do not fit `kind`'s config."""
    cls = _kind_class(kind)
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        if params:
            raise ValueError(f"index kind {kind!r} takes no parameters, got {sorted(params)}")
        return
    try:
        config_class(**params)
    except TypeError as e:
        raise ValueError(f"{kind} index: {e}") from None
