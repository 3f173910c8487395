"""Multi-tenant datasets: tenants of Zipf-distributed sizes laid over an existing dataset.

Each base vector is visible to 1-3 tenants (a `public` share to none: visible to all), and
tenant sizes follow Zipf's law, from a handful of vectors to tens of thousands. Two layouts:

- "clustered": each tenant's vectors are neighbours (a contiguous run of the base in the
  depth-first order of a k-means tree), and each query runs as a tenant with data near it;
- "random": tenants pick their vectors, and queries their tenant, at random.

Queries are spread evenly over tenant-size buckets (share of the base a tenant sees), so a
run measures small and large tenants alike; `split_by_tenant_size` writes one dataset per
bucket, for reading results per tenant size with the ordinary runner.

Writes the directory format of bench.datasets (base_tenants.npz as CSR, query_tenants.npy).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.datasets import DatasetError, load_dataset, read_meta, write_meta
from index.cluster_tree import ClusterTree

LAYOUTS = ("clustered", "random")
#: Bucket edges as shares of the base a tenant sees: <0.01%, 0.01-0.1%, 0.1-1%, >1%.
SIZE_EDGES = (0.0, 1e-4, 1e-3, 1e-2, 1.0)
#: Vectors sampled to build the tree that orders the base for the clustered layout.
ORDER_SAMPLE = 50_000


@dataclass
class TenantConfig:
    source: Path
    out: Path
    layout: str = "clustered"
    tenants: int = 10_000
    zipf: float = 1.0
    min_per_vector: int = 1
    max_per_vector: int = 3
    public: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.source, self.out = Path(self.source), Path(self.out)
        if self.layout not in LAYOUTS:
            raise DatasetError.field("layout", f"must be one of {LAYOUTS}, got {self.layout!r}")
        if self.tenants < 1:
            raise DatasetError.field("tenants", f"must be positive, got {self.tenants}")
        if self.zipf <= 0:
            raise DatasetError.field("zipf", f"must be positive, got {self.zipf}")
        if not 1 <= self.min_per_vector <= self.max_per_vector:
            raise DatasetError.field("max_per_vector", f"need 1 <= min_per_vector <= max_per_vector, got "
                                     f"{self.min_per_vector}..{self.max_per_vector}")
        if not 0 <= self.public < 1:
            raise DatasetError.field("public", f"must be in [0, 1), got {self.public}")
        if self.out.resolve() == self.source.resolve():
            raise DatasetError.field("out", "must differ from the source dataset")


def zipf_sizes(total: int, tenants: int, exponent: float) -> np.ndarray:
    """Sizes proportional to 1 / rank**exponent, each >= 1, summing to `total`."""
    if tenants > total:
        raise DatasetError.field("tenants", f"{tenants} tenants cannot share {total} grants")
    w = 1.0 / np.arange(1, tenants + 1) ** exponent
    sizes = np.maximum(1, np.floor(w / w.sum() * total)).astype(np.int64)
    sizes[0] += total - sizes.sum()  # the largest absorbs the rounding
    return sizes


def deal_tenants(order: np.ndarray, per_vector: np.ndarray, sizes: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, indices) of tenants per vector: tenants, in random order, take runs of
    consecutive grant slots; slot layer j lists the vectors with more than j grants in
    `order`, so a tenant's run is a stretch of `order` and a vector's grants come from
    different layers. Repeats of a tenant on one vector are dropped."""
    slots = np.concatenate([order[per_vector[order] > j] for j in range(int(per_vector.max(initial=0)))])
    if len(slots) != sizes.sum():
        raise ValueError(f"{len(slots)} grant slots for tenant sizes summing to {sizes.sum()}")
    perm = rng.permutation(len(sizes))
    owner = np.repeat(perm, sizes[perm])
    pairs = np.unique(np.stack([slots, owner], 1), axis=0)
    counts = np.bincount(pairs[:, 0], minlength=len(per_vector))
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), pairs[:, 1].astype(np.int64)


def tree_order(base: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, ClusterTree]:
    """(order, leaf): the base in depth-first order of a k-means tree, so that stretches of
    the order are neighbourhoods, and each vector's leaf."""
    rng = np.random.default_rng(seed)
    sample = base[np.sort(rng.choice(len(base), min(len(base), ORDER_SAMPLE), replace=False))]
    tree = ClusterTree.build(sample, branching=16, leaf_size=64, max_depth=6, seed=seed)
    leaf = tree.assign(base)
    path = tree.ancestors[leaf]
    order = np.lexsort((rng.random(len(base)),) + tuple(path[:, d] for d in range(path.shape[1] - 1, -1, -1)))
    return order, leaf, tree


def size_bucket(fractions: np.ndarray, edges=SIZE_EDGES) -> np.ndarray:
    """Bucket number of each tenant's share of the base."""
    return np.clip(np.searchsorted(edges, fractions, side="right") - 1, 0, len(edges) - 2)


def query_tenants(queries: np.ndarray, indptr: np.ndarray, indices: np.ndarray, n_tenants: int,
                  rng: np.random.Generator, near: tuple[np.ndarray, ClusterTree] | None = None) -> np.ndarray:
    """A tenant per query, buckets of tenant size taking turns. With `near` (leaf per base
    vector, tree), the tenant is drawn among the bucket's tenants with vectors in the query's
    top-level cluster, weighted by how many; otherwise uniformly in the bucket."""
    n = len(indptr) - 1
    size = np.bincount(indices, minlength=n_tenants)
    bucket = size_bucket(size / n)
    members = {b: np.flatnonzero((bucket == b) & (size > 0)) for b in range(len(SIZE_EDGES) - 1)}
    present = [b for b, m in members.items() if len(m)]
    if near is not None:
        leaf, tree = near
        top = tree.ancestors[:, min(1, tree.levels - 1)]
        owner_region = top[leaf[np.repeat(np.arange(n), np.diff(indptr))]]
        pairs, counts = np.unique(np.stack([owner_region, indices], 1), axis=0, return_counts=True)
        query_region = top[tree.assign(queries)]
    out = np.empty(len(queries), np.int64)
    for q in range(len(queries)):
        b = present[q % len(present)]
        if near is not None:
            lo, hi = np.searchsorted(pairs[:, 0], [query_region[q], query_region[q] + 1])
            cand, weight = pairs[lo:hi, 1], counts[lo:hi]
            ok = bucket[cand] == b
            if ok.any():
                out[q] = rng.choice(cand[ok], p=weight[ok] / weight[ok].sum())
                continue
        out[q] = rng.choice(members[b])
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def prepare_tenants(cfg: TenantConfig) -> Path:
    """Write the tenant dataset of cfg.source's vectors to cfg.out; returns cfg.out."""
    meta = read_meta(cfg.source)
    base = np.load(cfg.source / "base.npy", mmap_mode="r")
    queries = np.load(cfg.source / "queries.npy")
    rng = np.random.default_rng([cfg.seed, 1])
    n = len(base)
    per_vector = rng.integers(cfg.min_per_vector, cfg.max_per_vector + 1, n)
    per_vector[rng.random(n) < cfg.public] = 0
    sizes = zipf_sizes(int(per_vector.sum()), cfg.tenants, cfg.zipf)
    near = None
    if cfg.layout == "clustered":
        x = np.asarray(base, np.float32)
        if meta["metric"] == "cos":  # order by the geometry searches will use
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        order, leaf, tree = tree_order(x, cfg.seed)
        near = (leaf, tree)
    else:
        order = rng.permutation(n)
    indptr, indices = deal_tenants(order, per_vector, sizes, rng)
    if meta["metric"] == "cos":
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    qt = query_tenants(np.asarray(queries, np.float32), indptr, indices, cfg.tenants, rng, near)

    cfg.out.mkdir(parents=True, exist_ok=True)
    for name in ("base.npy", "queries.npy"):
        _link_or_copy(cfg.source / name, cfg.out / name)
    (cfg.out / "gt.npy").unlink(missing_ok=True)
    np.savez(cfg.out / "base_tenants.npz", indptr=indptr, indices=indices)
    np.save(cfg.out / "query_tenants.npy", qt)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "out"}
    write_meta(cfg.out, f"{meta['name']}-tenants-{cfg.layout}", meta["metric"], tenants=settings,
               size_edges=list(SIZE_EDGES))
    return cfg.out


def split_by_tenant_size(directory: Path, out_root: Path) -> list[Path]:
    """One dataset per tenant-size bucket, each with the queries of that bucket's tenants
    (base files linked, gt rows kept); its dataset.json records the bucket as
    "tenant_fraction": [lo, hi]."""
    directory, out_root = Path(directory), Path(out_root)
    ds = load_dataset(directory)  # validates and caches the tenant-filtered gt.npy
    if not ds.has_tenants:
        raise DatasetError(f"{directory} has no tenants (base_tenants.npz, query_tenants.npy)")
    indptr, indices = ds.base_tenants
    size = np.bincount(indices, minlength=int(max(indices.max(initial=0), ds.query_tenants.max()) + 1))
    qbucket = size_bucket(size[ds.query_tenants] / ds.n)
    meta = read_meta(directory)
    written = []
    for b in np.unique(qbucket).tolist():
        lo, hi = SIZE_EDGES[b], SIZE_EDGES[b + 1]
        out = out_root / f"{directory.name}-tf{lo:g}-{hi:g}"
        out.mkdir(parents=True, exist_ok=True)
        for name in ("base.npy", "base_tenants.npz"):
            _link_or_copy(directory / name, out / name)
        rows = np.flatnonzero(qbucket == b)
        np.save(out / "queries.npy", np.load(directory / "queries.npy")[rows])
        np.save(out / "query_tenants.npy", ds.query_tenants[rows])
        np.save(out / "gt.npy", ds.gt[rows])
        extra = {k: v for k, v in meta.items() if k not in ("metric", "name")}
        write_meta(out, f"{meta['name']}-tf{lo:g}-{hi:g}", meta["metric"], **extra, tenant_fraction=[lo, hi])
        written.append(out)
    return written
