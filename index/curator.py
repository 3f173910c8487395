"""Curator: a multi-tenant in-memory index (Jin et al., 2024), per-tenant speed at shared memory.

- One shared clustering tree (index/cluster_tree.py), built once from the training sample;
  every vector is stored once (float32 in RAM) and sits in one leaf.
- Each tenant's own tree is a sub-tree of it (index/tenant_tree.py), encoded by per-node Bloom
  filters (index/bloom.py, "the tenant may have vectors below") and shortlists: the ids of its
  vectors under a node, kept at the highest node where the tenant has at most
  `shortlist_limit` of them. A shortlist that overflows is split among the node's children; when
  the tenant's vectors under a node fall to `merge_ratio * shortlist_limit`, the lists below it
  are merged back into one there. Exact counts of the tenant's vectors below each inner node
  make both decisions O(depth); they are only read by updates, never by searches.
- Public vectors (no tenants) belong to a reserved pseudo-tenant (key 0) whose sub-tree every
  search walks too; tenant=None walks only that one. A vector's last revoked grant leaves it
  visible to no one: it never becomes public.
- Search for tenant t walks t's sub-tree from the root, entering only nodes whose Bloom filter
  holds t, and collects t's shortlists as buckets; the walk is query-independent and cached
  per tenant (rows of all its buckets in one array). A query then takes buckets nearest first
  by the distance to their node's centroid (as IVF ranks lists; on glove-50 tenants this
  reached recall .955 at 4,096 candidates where the largest-distance-on-the-path order of a
  strict best-first walk needed 8,192) until `candidate_budget` vectors, in one faiss heap over
  the tenant's nodes, and scores them with one faiss call straight from the shared rows. With
  `prune_epsilon`, buckets beyond (1 + eps) x the nearest of their level are skipped, as
  SPANN's eps2 does. A tenant whose vectors (nearly) fit the budget is scanned whole, exactly.
  Tree distances are L2 (as SPANN's heads): for "ip" on vectors of unequal norms the tree is
  the usual IVF approximation.
- Access is exact: candidates only ever come from the caller's shortlists and the public ones,
  which updates maintain exactly; a Bloom filter that lies only costs a wasted step.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import faiss
import numpy as np

from index.base import (MISSING_ID, IndexStats, Metric, SearchParams, SearchResult, check_dim_metric,
                        check_ids, check_vectors, dir_size)
from index.cluster_tree import ClusterTree
from index.idmap import IdMap
from index.tenant_tree import Buckets, TenantTrees

FORMAT_VERSION = 1
STATE_FILE = "curator.json"
ARRAYS_FILE = "curator.npz"
#: Filter key of the public pseudo-tenant.
PUBLIC = 0
#: Tenants per vector kept in the fixed-width access table; more go to an overflow dict.
ACL_WIDTH = 3


@dataclass(frozen=True)
class CuratorConfig:
    """Tree shape, tenant encoding and search defaults."""

    #: Children per tree node (fewer where a node holds few sample points).
    branching: int = 16
    #: A node holding more sample points than this is split (leaves hold about leaf_size / 1.6).
    leaf_size: int = 256
    max_depth: int = 6
    #: Curator's default: a tenant's shortlist at an inner node holds at most this many ids.
    shortlist_limit: int = 128
    #: Lists below a node merge when the tenant's vectors there fall to this share of the limit.
    merge_ratio: float = 0.5
    bloom_bits: int = 1024
    bloom_hashes: int = 3
    #: Default SearchParams.candidate_budget: the walk stops after collecting this many vectors.
    candidate_budget: int = 4096
    #: Choosing buckets costs a query about as much as scoring this many rows (~20 us, a dozen
    #: numpy calls, on 50-d): a tenant seeing at most budget + scan_slack vectors is scanned whole.
    scan_slack: int = 512
    #: Default SearchParams.prune_epsilon: skip buckets beyond (1 + eps) x the nearest one's
    #: distance. Off by default: on glove-50 tenants 0.5 scanned only 6% less at equal recall, and
    #: when a query sits on a small leaf's centroid the ratio cuts nearly every other bucket.
    prune_epsilon: float = float("inf")
    train_sample: int = 200_000
    balance_slack: float = 1.3
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "branching": self.branching >= 2, "leaf_size": self.leaf_size >= 1,
            "max_depth": self.max_depth >= 0,
            "shortlist_limit": self.shortlist_limit >= 1, "merge_ratio": 0 <= self.merge_ratio <= 1,
            "bloom_bits": self.bloom_bits >= 64 and self.bloom_bits % 64 == 0,
            "bloom_hashes": 1 <= self.bloom_hashes <= 16, "candidate_budget": self.candidate_budget >= 1,
            "prune_epsilon": self.prune_epsilon >= 0, "train_sample": self.train_sample >= 1,
            "scan_slack": self.scan_slack >= 0,
            "balance_slack": self.balance_slack >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"CuratorConfig: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")

    @property
    def merge_below(self) -> int:
        return int(self.merge_ratio * self.shortlist_limit)


@dataclass(frozen=True)
class TenantLayout:
    """One tenant's sub-tree, for inspection: shortlists (node -> ids) and inner counts."""

    key: int
    lists: dict[int, np.ndarray]
    inner: dict[int, int]


def select_buckets(walk: np.ndarray, own: np.ndarray, groups: np.ndarray, sizes: np.ndarray, budget: int,
                   epsilon: float) -> np.ndarray:
    """(Q, B) bool: the buckets a best-first walk collects (in `walk` order) before `budget`
    vectors, less those beyond (1 + eps) x the nearest collected bucket's `own` distance.

    SPANN's eps2 compares clusters of one level; buckets here sit at several (a small
    tenant's list high up, a big one's at the leaves), so each competes only with its own
    group: the buckets of one level (of one tenant), contiguous from groups[g]. Distances
    are squared."""
    order = np.argsort(walk, axis=1, kind="stable")
    ordered_sizes = sizes[order]
    collected = np.empty(walk.shape, bool)
    before = np.cumsum(ordered_sizes, axis=1) - ordered_sizes  # vectors collected before each bucket
    collected[np.arange(len(walk))[:, None], order] = before < budget
    if not np.isfinite(epsilon):
        return collected
    mine = np.where(collected, own, np.inf)
    nearest = np.minimum.reduceat(mine, groups, axis=1)
    group_of = np.repeat(np.arange(len(groups)), np.diff(np.append(groups, walk.shape[1])))
    return collected & (mine <= (1.0 + epsilon) ** 2 * nearest[:, group_of])


class CuratorIndex:
    """Curator over float32 vectors in RAM; see the module docstring for the design."""

    kind = "curator"
    config_class = CuratorConfig

    def __init__(self, dim: int, metric: Metric = "ip", **config) -> None:
        check_dim_metric(dim, metric)
        self.dim, self.metric = dim, metric
        self.config = CuratorConfig(**config)
        self._lock = threading.RLock()
        self._saved_dir: Path | None = None
        self._reset(None)

    def _reset(self, tree: ClusterTree | None) -> None:
        cfg = self.config
        self.tree = tree
        self.trees = TenantTrees(tree, cfg.shortlist_limit, cfg.merge_below, cfg.bloom_bits, cfg.bloom_hashes,
                                 lambda rows: self._leaf[rows]) if tree is not None else None
        self._names: list[str | None] = [None]  # filter key -> tenant name; key 0 is the public one
        self._keys: dict[str, int] = {}
        self._vectors = np.zeros((0, self.dim), np.float32)
        self._ids = np.zeros(0, np.int64)  # row -> id, -1 for a free row
        # the narrowest ints that hold node ids and filter keys: with float32 vectors of 50-d, each
        # byte per row here is 0.5% of the index
        self._leaf = np.zeros(0, np.int16 if tree is None or tree.n_nodes < 2**15 else np.int32)
        self._acl = np.zeros((0, ACL_WIDTH), np.int16)  # row -> filter keys, -1 padded; widened when needed
        self._acl_extra: dict[int, set[int]] = {}
        self._rows_used = 0
        self._free: list[int] = []
        self._idmap = IdMap()

    def __len__(self) -> int:
        return len(self._idmap)

    # -- training and adding ---------------------------------------------------------------------

    def train(self, sample: np.ndarray) -> None:
        """Build the shared tree from `sample` (at most train_sample of it) and empty the index.
        An empty sample defers the tree to the first add, which is then its sample."""
        sample = check_vectors(sample, self.dim, "sample")
        if len(sample) > self.config.train_sample:
            rng = np.random.default_rng(self.config.seed)
            sample = sample[np.sort(rng.choice(len(sample), self.config.train_sample, replace=False))]
        with self._lock:
            self._reset(self._build_tree(sample) if len(sample) else None)

    def _build_tree(self, sample: np.ndarray) -> ClusterTree:
        cfg = self.config
        return ClusterTree.build(sample, branching=cfg.branching, leaf_size=cfg.leaf_size,
                                 max_depth=cfg.max_depth, slack=cfg.balance_slack, seed=cfg.seed)

    def add(self, ids: np.ndarray, vectors: np.ndarray,
            tenants: Sequence[Iterable[str]] | None = None) -> None:
        """Add (or replace) vectors; tenants[i] names who may see vector i, empty = public."""
        vectors = check_vectors(vectors, self.dim)
        ids = check_ids(ids, len(vectors))
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique within one add")
        if tenants is not None and len(tenants) != len(ids):
            raise ValueError(f"tenants must have one entry per id ({len(ids)}), got {len(tenants)}")
        names = [self._check_names(ts, i) for i, ts in enumerate(tenants)] if tenants is not None else None
        if not len(ids):
            return
        with self._lock:
            if self.tree is None:
                self.train(vectors)
            self._remove_rows(self._idmap.get(ids))
            leaves = self.tree.assign(vectors)
            rows = np.empty(len(ids), np.int64)
            # rows in leaf order: a shortlist's vectors then lie close together in memory
            rows[np.argsort(leaves, kind="stable")] = self._alloc(len(ids))
            self._vectors[rows] = vectors
            self._ids[rows] = ids
            self._leaf[rows] = leaves
            self._idmap.put(ids, rows)
            for i in np.argsort(rows, kind="stable").tolist():
                row = int(rows[i])
                given = names[i] if names is not None else []
                keys = sorted({self._key(n) for n in given}) if given else [PUBLIC]
                self._set_acl(row, keys)
                path = self.tree.paths[self._leaf[row]]
                for key in keys:
                    self.trees.insert(row, key, path)
            self.trees.flush()

    @staticmethod
    def _check_names(tenants: Iterable[str], i: int) -> list[str]:
        if isinstance(tenants, str):
            raise ValueError(f"tenants[{i}] must be a collection of tenant names, not the string {tenants!r}")
        names = list(tenants)
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"tenants[{i}]: tenant names are non-empty strings, got {name!r}")
        return names

    def _key(self, name: str) -> int:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = len(self._names)
            self._names.append(name)
            if key > np.iinfo(self._acl.dtype).max:
                self._acl = self._acl.astype(np.int32)
        return key

    def _alloc(self, n: int) -> np.ndarray:
        reused = [self._free.pop() for _ in range(min(n, len(self._free)))]
        fresh = np.arange(self._rows_used, self._rows_used + n - len(reused))
        self._rows_used += len(fresh)
        if self._rows_used > len(self._ids):
            cap = max(self._rows_used, int(1.5 * len(self._ids)))
            grow = cap - len(self._ids)
            self._vectors = np.concatenate([self._vectors, np.zeros((grow, self.dim), np.float32)])
            self._ids = np.concatenate([self._ids, np.full(grow, -1, np.int64)])
            self._leaf = np.concatenate([self._leaf, np.zeros(grow, self._leaf.dtype)])
            self._acl = np.concatenate([self._acl, np.full((grow, ACL_WIDTH), -1, self._acl.dtype)])
        return np.concatenate([np.asarray(reused, np.int64), fresh]).astype(np.int64)

    # -- access table ----------------------------------------------------------------------------

    def _acl_of(self, row: int) -> list[int]:
        keys = [k for k in self._acl[row].tolist() if k >= 0]
        extra = self._acl_extra.get(row)
        return keys + sorted(extra) if extra else keys

    def _set_acl(self, row: int, keys: list[int]) -> None:
        self._acl[row] = keys[:ACL_WIDTH] + [-1] * (ACL_WIDTH - len(keys[:ACL_WIDTH]))
        if len(keys) > ACL_WIDTH:
            self._acl_extra[row] = set(keys[ACL_WIDTH:])
        else:
            self._acl_extra.pop(row, None)

    # -- removing, granting, revoking ------------------------------------------------------------

    def remove(self, ids: np.ndarray) -> int:
        ids = np.asarray(ids, np.int64).reshape(-1)
        with self._lock:
            if self.tree is None or not len(ids):
                return 0
            removed = self._remove_rows(self._idmap.get(ids))
            self.trees.refresh()
            return removed

    def _remove_rows(self, rows: np.ndarray) -> int:
        rows = np.unique(rows[rows >= 0])
        for row in rows.tolist():
            path = self.tree.paths[self._leaf[row]]
            for key in self._acl_of(row):
                self.trees.unlink(row, key, path)
            self._set_acl(row, [])
            self._free.append(row)
        self._idmap.delete(self._ids[rows])
        self._ids[rows] = -1
        return len(rows)

    def grant(self, ids: np.ndarray, tenant: str) -> int:
        """Make vectors visible to `tenant` too; returns how many were not already (public
        vectors are visible to every tenant and stay public). KeyError on unknown ids."""
        (name,) = self._check_names([tenant], 0)
        with self._lock:
            rows = self._rows_of(ids)
            if not len(rows):
                return 0
            key = self._key(name)
            changed = 0
            for row in rows.tolist():
                keys = self._acl_of(row)
                if PUBLIC in keys or key in keys:
                    continue
                self._set_acl(row, sorted(keys + [key]))
                self.trees.insert(row, key, self.tree.paths[self._leaf[row]])
                changed += 1
            self.trees.flush()
            return changed

    def revoke(self, ids: np.ndarray, tenant: str) -> int:
        """Take `tenant`'s access to vectors away; returns how many lost it. A vector whose last
        tenant goes is visible to no one (never public). KeyError on unknown ids."""
        (name,) = self._check_names([tenant], 0)
        with self._lock:
            rows = self._rows_of(ids)
            key = self._keys.get(name)
            if key is None or not len(rows):
                return 0
            changed = 0
            for row in rows.tolist():
                keys = self._acl_of(row)
                if key not in keys:
                    continue
                self._set_acl(row, [k for k in keys if k != key])
                self.trees.unlink(row, key, self.tree.paths[self._leaf[row]])
                changed += 1
            self.trees.refresh()
            return changed

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(-1)
        rows = self._idmap.get(ids) if self.tree is not None else np.full(len(ids), -1, np.int32)
        if (rows < 0).any():
            missing = ids[rows < 0][:10].tolist()
            raise KeyError(f"no vector with id {', '.join(map(str, missing))}")
        return np.unique(rows)

    def tenants(self) -> dict[str, int]:
        """Each tenant that can see any vector, with how many it sees (public ones not counted)."""
        with self._lock:
            if self.trees is None:
                return {}
            counts = {name: self.trees.count(key) for key, name in enumerate(self._names[1:], 1)}
            return {name: n for name, n in sorted(counts.items()) if n}

    def layout(self, tenant: str | None) -> TenantLayout:
        """`tenant`'s sub-tree (None: the public one) with ids, for inspection and tests."""
        with self._lock:
            key = PUBLIC if tenant is None else self._keys.get(tenant, -1)
            lists = self.trees.lists if self.trees else []
            inner = self.trees.inner if self.trees else []
            return TenantLayout(key, {n: self._ids[np.frombuffer(d[key], np.int32)]
                                      for n, d in enumerate(lists) if key in d},
                                {n: d[key] for n, d in enumerate(inner) if key in d})

    # -- search ----------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, tenant: str | None = None,
               params: SearchParams | None = None, allowed_ids: np.ndarray | None = None) -> SearchResult:
        queries = check_vectors(queries, self.dim, "queries")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if tenant is not None and not isinstance(tenant, str):
            raise ValueError(f"tenant must be a string or None, got {tenant!r}")
        budget, epsilon = self._search_knobs(params)
        with self._lock:
            view = self._view(tenant) if self.tree is not None and len(queries) else None
            if view is None:
                return SearchResult.empty(len(queries), k)
            allowed = None
            if allowed_ids is not None:
                allowed = np.zeros(len(self._ids), bool)
                got = self._idmap.get(np.asarray(allowed_ids, np.int64))
                allowed[got[got >= 0]] = True
            need = max(budget, k)
            if len(view.rows) <= need + self.config.scan_slack:  # (nearly) fits the budget: scan it whole
                cand = view.rows if allowed is None else view.rows[allowed[view.rows]]
                return self._knn(queries, np.ascontiguousarray(cand, np.int64)[None, :], k)
            if not np.isfinite(epsilon) and view.single:  # a heap per query over the tenant's own nodes
                chosen = [self._nearest_buckets(queries[i:i + 1], view, need) for i in range(len(queries))]
            else:
                own = view.distances(self.tree.distances(queries))
                chosen = [np.flatnonzero(row) for row in
                          select_buckets(own, own, view.levels, view.sizes, need, epsilon)]
            cands = [view.rows_of(c) for c in chosen]
            if allowed is not None:
                cands = [c[allowed[c]] for c in cands]
            if len(cands) == 1:
                return self._knn(queries, np.ascontiguousarray(cands[0], np.int64)[None, :], k)
            # one row of candidates per query, padded with -1 (faiss skips those)
            subset = np.full((len(cands), max(map(len, cands))), -1, np.int64)
            for row, c in zip(subset, cands):
                row[:len(c)] = c
            return self._knn(queries, subset, k, padded=True)

    def _nearest_buckets(self, query: np.ndarray, view: Buckets, budget: int) -> np.ndarray:
        """One query's buckets (places in `view`), nearest centroid first, until they hold
        `budget` vectors (the last may overflow it): `select_buckets` without pruning, in a
        faiss heap over the view's nodes only (they ascend: nodes are numbered breadth-first and
        a tenant has one list per node), which saves the product with every node of the tree."""
        n = len(view.nodes)
        guess = min(n, int(2 * budget * n / max(1, len(view.rows))) + 8)
        while True:
            found = np.empty((1, guess), np.int64)
            dist = np.empty((1, guess), np.float32)
            faiss.knn_L2sqr_by_idx(faiss.swig_ptr(query), faiss.swig_ptr(self.tree.centroids),
                                   faiss.swig_ptr(view.nodes), self.dim, 1, self.tree.n_nodes, n, guess,
                                   faiss.swig_ptr(dist), faiss.swig_ptr(found), 0)
            order = np.searchsorted(view.nodes, found[0])
            held = np.cumsum(view.sizes[order])
            if held[-1] >= budget or guess >= n:
                # in node order: rows were laid out leaf by leaf, so the scan then reads memory forward
                return np.sort(order[:int(np.searchsorted(held, budget)) + 1])
            guess = min(n, 4 * guess)

    def _view(self, tenant: str | None) -> Buckets | None:
        """The buckets `tenant` may search: its own and the public ones."""
        key = self._keys.get(tenant) if tenant is not None else None
        mine = self.trees.buckets(key) if key is not None else None
        public = self.trees.buckets(PUBLIC)
        if public is None or mine is None:
            return mine if public is None else public
        return Buckets.join([public, mine])

    def _search_knobs(self, params: SearchParams | None) -> tuple[int, float]:
        budget = self.config.candidate_budget
        epsilon = self.config.prune_epsilon
        if params is not None and params.candidate_budget is not None:
            budget = params.candidate_budget
        if params is not None and params.prune_epsilon is not None:
            epsilon = params.prune_epsilon
        if budget < 1:
            raise ValueError(f"candidate_budget must be >= 1, got {budget}")
        if not epsilon >= 0:
            raise ValueError(f"prune_epsilon must be >= 0, got {epsilon}")
        return int(budget), float(epsilon)

    def _knn(self, queries: np.ndarray, subset: np.ndarray, k: int, padded: bool = False) -> SearchResult:
        """Best k of each query among rows `subset` ((Q, L), or (1, L) shared by all queries;
        -1 entries, `padded`, skipped): faiss scores them straight from the shared rows and
        keeps a heap, one call for the batch (no gathered copy, no score matrix)."""
        nq, width = len(queries), subset.shape[1]
        if not width:  # everything filtered out by allowed_ids
            return SearchResult.empty(nq, k)
        rows = np.empty((nq, k), np.int64)
        scores = np.empty((nq, k), np.float32)
        knn = faiss.knn_inner_products_by_idx if self.metric == "ip" else faiss.knn_L2sqr_by_idx
        knn(faiss.swig_ptr(queries), faiss.swig_ptr(self._vectors), faiss.swig_ptr(subset), self.dim, nq,
            self._rows_used, width, k, faiss.swig_ptr(scores), faiss.swig_ptr(rows),
            0 if len(subset) == 1 else width)
        ids = self._ids[rows]
        if self.metric != "ip":
            np.negative(scores, out=scores)  # a higher score is better
        if padded or width < k:
            missing = rows < 0
            ids[missing] = MISSING_ID
            scores[missing] = -np.inf
        return SearchResult(ids, scores)

    # -- persistence -----------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            n = self._rows_used
            arrays = {"vectors": self._vectors[:n], "ids": self._ids[:n], "leaf": self._leaf[:n],
                      "acl": self._acl[:n]}
            arrays["idmap_ids"], arrays["idmap_rows"] = self._idmap.arrays()
            extra_rows = sorted(self._acl_extra)
            arrays["acl_extra_rows"] = np.asarray(extra_rows, np.int64)
            arrays["acl_extra_len"] = np.asarray([len(self._acl_extra[r]) for r in extra_rows], np.int64)
            arrays["acl_extra_keys"] = np.asarray([k for r in extra_rows for k in sorted(self._acl_extra[r])],
                                                  np.int64)
            if self.tree is not None:
                arrays.update({f"tree_{k}": v for k, v in self.tree.arrays().items()})
                arrays.update({f"trees_{k}": v for k, v in self.trees.arrays().items()})
            tmp = directory / (ARRAYS_FILE + ".tmp.npz")
            np.savez(tmp, **arrays)
            tmp.replace(directory / ARRAYS_FILE)
            state = {"format": FORMAT_VERSION, "dim": self.dim, "metric": self.metric,
                     "config": asdict(self.config), "tenants": self._names[1:]}
            tmp = directory / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(directory / STATE_FILE)
            self._saved_dir = directory

    @classmethod
    def load(cls, directory: Path) -> "CuratorIndex":
        directory = Path(directory)
        state = json.loads((directory / STATE_FILE).read_text())
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"{directory / STATE_FILE}: format {state.get('format')!r}, "
                             f"expected {FORMAT_VERSION}")
        index = cls(state["dim"], state["metric"], **state["config"])
        with np.load(directory / ARRAYS_FILE) as z:
            a = {k: z[k] for k in z.files}
        if "tree_parent" in a:
            index._reset(ClusterTree.from_arrays({k[5:]: v for k, v in a.items() if k.startswith("tree_")}))
            index.trees.restore({k[6:]: v for k, v in a.items() if k.startswith("trees_")})
        for name in state["tenants"]:
            index._key(name)
        n = len(a["ids"])
        index._vectors, index._ids, index._leaf, index._acl = a["vectors"], a["ids"], a["leaf"], a["acl"]
        index._rows_used = n
        index._free = np.flatnonzero(index._ids < 0)[::-1].tolist()
        index._idmap = IdMap.from_arrays(a["idmap_ids"], a["idmap_rows"])
        offsets = np.cumsum(a["acl_extra_len"])
        for row, keys in zip(a["acl_extra_rows"].tolist(), np.split(a["acl_extra_keys"], offsets[:-1])):
            index._acl_extra[row] = set(keys.tolist())
        index._saved_dir = directory
        return index

    def stats(self) -> IndexStats:
        with self._lock:
            rows = sum(a.nbytes for a in (self._vectors, self._ids, self._leaf, self._acl))
            extra = {"metric": self.metric, "tenants": len(self._names) - 1,
                     "vector_bytes": self._vectors.nbytes}
            memory = rows + self._idmap.nbytes + 200 * len(self._acl_extra)
            if self.tree is not None:
                t = self.trees
                memory += self.tree.nbytes + t.memory_bytes()
                extra.update({"nodes": self.tree.n_nodes, "leaves": int(self.tree.is_leaf.sum()),
                              "shortlists": t.n_lists, "inner_entries": t.n_inner, "grants": t.pairs,
                              "tree_bytes": self.tree.nbytes, "tenant_tree_bytes": t.memory_bytes(),
                              "bloom_fill": round(t.bloom.fill_ratio(), 4)})
            disk = dir_size(self._saved_dir) if self._saved_dir is not None else 0
            return IndexStats(self.kind, len(self), self.dim, memory, disk, extra)
