"""Which algorithms the benchmark knows, and the one place their default grids live.

Later index issues extend DEFAULT_GRIDS for their kind; a kind of ours with no entry
runs once with its defaults. Grids are chosen to span recall@10 of about 0.5 to 0.99
on glove-50 (390k, cosine), the set every index issue reports on.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from bench.adapter import Adapter
from bench.ours import our_adapter
from bench.peers import DiskANN, DiskANNMemory, FaissFlat, FaissHNSW, FaissIVF, FaissOnDiskIVF, Hnswlib
from bench.binary_peers import GRIDS as BINARY_PEER_GRIDS
from bench.binary_peers import FaissIVFPQ, SignBinary
from bench.peers_db import LanceIVFFlat, LanceIVFPQ, MilvusLite
from bench.tenant_peers import TENANT_PEERS

PEERS: dict[str, type[Adapter]] = {cls.name: cls for cls in (
    FaissFlat, FaissIVF, FaissHNSW, FaissOnDiskIVF, Hnswlib, DiskANN, DiskANNMemory,
    LanceIVFPQ, LanceIVFFlat, MilvusLite, SignBinary, FaissIVFPQ, *TENANT_PEERS)}

#: Our kinds as the design names them; those not yet in INDEX_KINDS are reported as skipped.
OUR_KINDS = ("flat", "spann", "curator", "binary")

_IVF_PROBES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    # ours
    "flat": {},
    "spann": {"nprobe": [1, 2, 4, 8, 16, 32, 64, 128]},
    "curator": {"candidate_budget": [64, 128, 256, 512, 1024, 2048, 4096]},
    "binary": {"bits": [1, 2, 4], "oversample": [1, 2, 4, 8, 16, 32]},
    # peers
    "faiss-flat": {},
    "faiss-ivf": {"nlist": [1024], "nprobe": _IVF_PROBES},
    "faiss-ondisk-ivf": {"nlist": [1024], "nprobe": _IVF_PROBES},
    # efConstruction 40 (faiss's default) for both HNSWs: 100 moved recall at efSearch 32 only
    # from .883 to .887 on glove-50 while building 2x slower.
    "faiss-hnsw": {"M": [32], "efConstruction": [40], "efSearch": [10, 16, 24, 32, 48, 64, 96, 128, 256, 512]},
    "hnswlib": {"M": [32], "ef_construction": [40], "ef": [10, 16, 24, 32, 48, 64, 96, 128, 256, 512]},
    "diskann": {"graph_degree": [32], "complexity": [64], "cache_nodes": [0],
                "L": [10, 16, 24, 32, 48, 64, 96, 128, 256], "beam_width": [2]},
    "diskann-memory": {"graph_degree": [32], "complexity": [64], "L": [10, 16, 24, 32, 48, 64, 96, 128, 256]},
    # num_sub_vectors defaults to the divisor of d nearest d/2 (25 on glove-50: 2 dims per code byte)
    "lancedb-ivfpq": {"num_partitions": [512], "nprobes": [2, 4, 8, 16, 32, 64, 128], "refine_factor": [10]},
    "lancedb-ivfflat": {"num_partitions": [512], "nprobes": [1, 2, 4, 8, 16, 32, 64, 128]},
    "milvus-lite": {"index_type": ["IVF_FLAT"], "nlist": [1024], "nprobe": [1, 2, 4, 8, 16, 32, 64, 128]},
    # sign-binary and faiss-ivfpq: the baselines of the binary index (same float rerank)
    **BINARY_PEER_GRIDS,
}


#: Grids on multi-tenant datasets (`bench tenants`), where they replace DEFAULT_GRIDS: spanning
#: recall@10 ~0.5-1 from tenants of a handful of vectors to ~20% of glove-50.
TENANT_GRIDS: dict[str, dict[str, list[Any]]] = {
    # leaf_size 128 (leaves of ~180 on glove-50's 200k-point training sample) cut the candidates
    # the largest tenants need for recall .9 by ~20% against the default 256
    "curator": {"leaf_size": [128], "candidate_budget": [256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 16384]},
    "per-tenant-ivf": {"flat_below": [1000], "nprobe": [1, 2, 4, 8, 16, 32, 64]},
    "shared-ivf-filter": {"nlist": [1024], "nprobe": [8, 32, 128, 512, 1024]},
    "hnswlib-filter": {"M": [16], "ef_construction": [100], "ef": [16, 64, 256]},
    # ~0.1-0.2 s a query whatever the filter: three points keep a run within minutes
    "milvus-lite-filter": {"index_type": ["IVF_FLAT"], "nlist": [1024], "nprobe": [8, 32, 128]},
}
#: The algos `bench tenants` runs when none are named.
TENANT_ALGOS = ("curator", "per-tenant-ivf", "shared-ivf-filter", "hnswlib-filter", "milvus-lite-filter")


class UnknownAlgo(ValueError):
    pass


class NotYetAvailable(RuntimeError):
    """One of our planned kinds that index.registry does not have yet."""


def known_algos() -> list[str]:
    return sorted(set(PEERS) | set(OUR_KINDS) | set(_our_kinds()))


def _our_kinds() -> dict[str, type]:
    from index.registry import INDEX_KINDS

    return INDEX_KINDS


def resolve(name: str) -> type[Adapter]:
    """The adapter class for an algo name; raises UnknownAlgo or NotYetAvailable."""
    if name in PEERS:
        return PEERS[name]
    if name in _our_kinds():
        return our_adapter(name)
    if name in OUR_KINDS:
        raise NotYetAvailable(f"index kind {name!r} is not in index.registry.INDEX_KINDS yet")
    raise UnknownAlgo(f"unknown algo {name!r}; known: {', '.join(known_algos())}")


def parse_grid_option(text: str | None, algos: list[str]) -> tuple[dict[str, dict[str, list[Any]]], bool]:
    """--param-grid JSON: either {key: [values]} for every algo, or {algo: {key: [values]}}.

    Returns the per-algo grids and whether one grid was shared by all algos.
    """
    if not text:
        return {}, False
    try:
        grid = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--param-grid is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(grid, dict):
        raise ValueError("--param-grid must be a JSON object such as '{\"nprobe\": [1, 4, 16, 64]}'")  # noqa: TRY004 -- bad user input, exit 2
    shared = not (grid and all(k in algos for k in grid))
    per_algo = {a: grid for a in algos} if shared else grid
    out: dict[str, dict[str, list[Any]]] = {}
    for algo, g in per_algo.items():
        if not isinstance(g, dict):
            raise ValueError(f"--param-grid for {algo} must be an object of parameter lists")  # noqa: TRY004
        out[algo] = {k: (v if isinstance(v, list) else [v]) for k, v in g.items()}
        for k, v in out[algo].items():
            if not v:
                raise ValueError(f"--param-grid: {k!r} has an empty list of values")
    return out, shared


def grid_for(name: str, adapter: type[Adapter], override: dict[str, list[Any]] | None,
             lenient: bool = False, tenants: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(build points, search points) of the default grid (TENANT_GRIDS' on tenant datasets)
    with `override`'s keys replaced.

    Keys the adapter does not know are an error, unless `lenient` (a grid shared by
    several algos), where they are left out for this algo.
    """
    grid = dict((TENANT_GRIDS if tenants and name in TENANT_GRIDS else DEFAULT_GRIDS).get(name, {}))
    override = override or {}
    allowed = set(adapter.build_keys) | set(adapter.search_keys)
    is_ours = adapter.search_keys and not adapter.build_keys and name not in PEERS
    for key, values in override.items():
        if key in allowed or (is_ours and not lenient):  # our kinds take any config field as a build key
            grid[key] = values
        elif not lenient:
            raise ValueError(f"{name} has no parameter {key!r}; it takes: {', '.join(sorted(allowed)) or 'none'}")
    search_keys = [k for k in grid if k in adapter.search_keys]
    build_keys = [k for k in grid if k not in adapter.search_keys]
    return _product(grid, build_keys), _product(grid, search_keys)


def _product(grid: dict[str, list[Any]], keys: list[str]) -> list[dict[str, Any]]:
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
