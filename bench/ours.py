"""Our index kinds behind the benchmark adapter, through the VectorIndex protocol only.

Any kind in index.registry.INDEX_KINDS is benchmarked by name: build parameters go to
create_index as that kind's config fields, search parameters to SearchParams.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
from typing import Any

import numpy as np

from bench.adapter import Adapter


@functools.cache
def search_param_names() -> tuple[str, ...]:
    from index.base import SearchParams

    return tuple(f.name for f in dataclasses.fields(SearchParams))


@functools.lru_cache(maxsize=256)
def _search_params(items: tuple):
    """SearchParams of a grid point, built once: the adapter's cost per query counts against
    our index in the benchmark (about 6 us of a ~20 us tenant query)."""
    from index.base import SearchParams

    names = search_param_names()
    return SearchParams(**{k: v for k, v in items if k in names})


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
        # kinds without a datastore keep their lists in a scratch LMDB that the index removes
        # when it is collected; drop it now, not at interpreter exit (which may skip it and
        # leave GBs in /tmp per run)
        del index
        gc.collect()

    def load(self, params: dict[str, Any]) -> None:
        from index.registry import load_index

        self._index = load_index(self.kind, self.workdir)

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any], tenant: str | None = None) -> np.ndarray:
        return self._index.search(queries, k, tenant=tenant, params=_search_params(tuple(sorted(params.items())))).ids

    def close(self) -> None:
        self._index = None


def our_adapter(kind: str) -> type[OurIndex]:
    """An adapter class for `kind`; its search keys are SearchParams' fields."""
    return type(f"Our_{kind}", (OurIndex,), {"name": kind, "kind": kind, "search_keys": search_param_names(),
                                             "build_keys": ()})
