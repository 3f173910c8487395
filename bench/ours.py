"""Our index kinds behind the benchmark adapter, through the VectorIndex protocol only.

Any kind in index.registry.INDEX_KINDS is benchmarked by name: build parameters go to
create_index as that kind's config fields, search parameters to SearchParams.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bench.adapter import Adapter


def search_param_names() -> tuple[str, ...]:
    from index.base import SearchParams

    return tuple(f.name for f in dataclasses.fields(SearchParams))


class OurIndex(Adapter):
    """One of our kinds; build keys are whatever the grid gives beyond SearchParams fields."""

    supports_tenants = True
    kind = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._index = None

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        from index.registry import create_index

        build = {k: v for k, v in params.items() if k not in search_param_names()}
        index = create_index(self.kind, self.dim, self.metric, **build)
        index.train(base)  # each kind samples what it needs, by its own config (e.g. train_sample)
        index.add(np.arange(len(base), dtype=np.int64), base, tenants=tenants)
        index.save(self.workdir)

    def load(self, params: dict[str, Any]) -> None:
        from index.registry import load_index

        self._index = load_index(self.kind, self.workdir)

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any], tenant: str | None = None) -> np.ndarray:
        from index.base import SearchParams

        names = search_param_names()
        sp = SearchParams(**{k_: v for k_, v in params.items() if k_ in names})
        return self._index.search(queries, k, tenant=tenant, params=sp).ids

    def close(self) -> None:
        self._index = None


def our_adapter(kind: str) -> type[OurIndex]:
    """An adapter class for `kind`; its search keys are SearchParams' fields."""
    return type(f"Our_{kind}", (OurIndex,), {"name": kind, "kind": kind, "search_keys": search_param_names(),
                                             "build_keys": ()})
