"""Every tenant's sub-tree of Curator's shared clustering tree, kept compact and exact.

A tenant's vectors under a node are listed (a shortlist of rows) at the highest node where
the tenant has at most `shortlist_limit` of them; above it, the nodes are the tenant's
inner nodes, with an exact count of its vectors below (so that splits and merges are
decided in O(depth)). Shortlists of one tenant never nest, and each of its vectors is in
exactly one, on the vector's own root-to-leaf path. A leaf's list has no limit.

Per-node Bloom filters hold the tenants whose sub-tree reaches a node; the search walk
reads only them (one vectorised test per level) and the shortlists it reaches. Filters
cannot forget, so they are rebuilt from the exact maps once enough tenants have left nodes.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from index.bloom import NodeBloomFilters
from index.cluster_tree import ClusterTree

#: Filters are rebuilt once this many (node, tenant) entries have gone, and a quarter of all.
BLOOM_REFRESH_MIN = 64
#: Bytes per shortlist (array object + dict entry + key), per inner count and per numpy array
#: object, measured with tracemalloc; used for memory accounting and to bound the cache.
LIST_OVERHEAD = 150
INNER_OVERHEAD = 90
ARRAY_OVERHEAD = 112


#: Shared by every root-list view (never written).
_ZERO = np.zeros(1, np.int64)
_ZERO.flags.writeable = False


@dataclass
class Buckets:
    """One tenant's shortlists flattened for search: what its walk found, cached until it changes.

    Search ranks buckets by the distance from the query to their own node's centroid (as IVF
    ranks its lists): a faiss heap over `nodes` for one tenant, or a product with every node
    of the tree for joined views and pruning. A bucket's rows lie together in `rows`.
    """

    nodes: np.ndarray  # (B,) int64 bucket nodes ascending, so level by level (numbered breadth-first)
    sizes: np.ndarray  # (B,) int64
    starts: np.ndarray  # (B,) int64, where each bucket's rows begin in `rows`
    rows: np.ndarray  # int32, the buckets' rows one after the other
    levels: np.ndarray  # where each tree level's buckets start
    #: One tenant's (nodes unique and ascending), not several joined.
    single: bool = True

    @classmethod
    def build(cls, tree: ClusterTree, nodes: list[int], lists: list[array]) -> "Buckets":
        nodes_arr = np.asarray(nodes, np.int64)
        order = np.argsort(nodes_arr, kind="stable")  # ascending (searches rely on it), so level by level
        nodes_arr = nodes_arr[order]
        lists = [lists[i] for i in order.tolist()]
        sizes = np.asarray([len(a) for a in lists], np.int64)
        rows = np.concatenate([np.frombuffer(a, np.int32) for a in lists])
        depth = tree.depth[nodes_arr]
        return cls(nodes_arr, sizes, np.cumsum(sizes) - sizes, rows, np.flatnonzero(np.diff(depth, prepend=-1)))

    @classmethod
    def at_root(cls, rows: array) -> "Buckets":
        """A tenant whose vectors all sit in one list at the root: nothing to walk."""
        return cls(_ZERO, np.array([len(rows)], np.int64), _ZERO, np.frombuffer(rows, np.int32).astype(np.int64),
                   _ZERO)

    @classmethod
    def join(cls, parts: list["Buckets"]) -> "Buckets":
        """Several tenants' buckets as one (the public ones and the caller's)."""
        sizes = np.concatenate([p.sizes for p in parts])
        offsets = np.cumsum([0] + [len(p.sizes) for p in parts[:-1]])
        return cls(np.concatenate([p.nodes for p in parts]), sizes, np.cumsum(sizes) - sizes,
                   np.concatenate([p.rows for p in parts]),
                   np.concatenate([p.levels + o for p, o in zip(parts, offsets)]), single=False)

    @property
    def nbytes(self) -> int:
        arrays = (self.nodes, self.sizes, self.starts, self.rows, self.levels)
        return sum(a.nbytes + ARRAY_OVERHEAD for a in arrays)

    def distances(self, node_distances: np.ndarray) -> np.ndarray:
        """(Q, B) squared distances of each bucket's node from the queries, given theirs to
        every node; 0 for a list at the root (a few vectors anywhere: always scanned first)."""
        d = node_distances[:, self.nodes]
        if not self.single or self.nodes[0] == 0:  # one tenant's nodes ascend: its root list is first
            d[:, self.nodes == 0] = 0.0
        return d

    def rows_of(self, chosen: np.ndarray) -> np.ndarray:
        """The rows of buckets `chosen`, one bucket after the other."""
        n = self.sizes[chosen]
        if len(n) == 1:
            s = int(self.starts[chosen[0]])
            return self.rows[s:s + int(n[0])]
        ends = np.cumsum(n)
        pos = np.repeat(self.starts[chosen] - (ends - n), n) + np.arange(int(ends[-1]))
        return self.rows[pos]


class TenantTrees:
    """Shortlists and inner counts per node and tenant key, with the per-node filters."""

    def __init__(self, tree: ClusterTree, shortlist_limit: int, merge_below: int, bloom_bits: int,
                 bloom_hashes: int, leaf_of: Callable[[np.ndarray], np.ndarray]) -> None:
        self.tree = tree
        self.limit, self.merge_below = shortlist_limit, merge_below
        self.bloom = NodeBloomFilters(tree.n_nodes, bloom_bits, bloom_hashes)
        self._leaf_of = leaf_of
        self.lists: list[dict[int, array]] = [{} for _ in range(tree.n_nodes)]
        self.inner: list[dict[int, int]] = [{} for _ in range(tree.n_nodes)]
        self._pending: list[tuple[int, int]] = []  # (node, key) to add to the filters
        self.n_lists = self.n_inner = self.pairs = self.stale = 0
        self._cache: OrderedDict[int, Buckets | None] = OrderedDict()
        self._cached_bytes = 0

    def count(self, key: int) -> int:
        """How many vectors `key` sees."""
        rows = self.lists[0].get(key)
        return len(rows) if rows is not None else self.inner[0].get(key, 0)

    def memory_bytes(self) -> int:
        lists = 4 * self.pairs + LIST_OVERHEAD * self.n_lists + INNER_OVERHEAD * self.n_inner
        return lists + self.bloom.nbytes + self._cached_bytes

    # -- updates ---------------------------------------------------------------------------------

    def insert(self, row: int, key: int, path: tuple[int, ...]) -> None:
        """Put `row` into `key`'s shortlist on its path, opening one where the tenant has none."""
        self._forget(key)
        self.pairs += 1
        for node in path:
            rows = self.lists[node].get(key)
            if rows is not None:
                rows.append(row)
                if len(rows) > self.limit and not self.tree.is_leaf[node]:
                    self._split(node, key)
                return
            inner = self.inner[node]
            count = inner.get(key)
            if count is None:  # nothing of this tenant below: its highest node here
                self._open(node, key, array("i", (row,)))
                return
            inner[key] = count + 1
        raise RuntimeError(f"tenant key {key}: no shortlist on the path of row {row}")

    def _open(self, node: int, key: int, rows: array) -> None:
        self.lists[node][key] = rows
        self.n_lists += 1
        self._pending.append((node, key))

    def _split(self, node: int, key: int) -> None:
        """Hand an overflowing shortlist down to the children its rows descend to."""
        rows = np.frombuffer(self.lists[node].pop(key), np.int32)
        self.n_lists -= 1
        self.inner[node][key] = len(rows)
        self.n_inner += 1
        child = self.tree.ancestors[self._leaf_of(rows), self.tree.depth[node] + 1]
        order = np.argsort(child, kind="stable")
        child, rows = child[order], rows[order]
        cuts = np.flatnonzero(np.diff(child)) + 1
        for c, part in zip(child[np.r_[0, cuts]].tolist(), np.split(rows, cuts)):
            lst = array("i")
            lst.frombytes(part.tobytes())
            self._open(c, key, lst)
            if len(lst) > self.limit and not self.tree.is_leaf[c]:
                self._split(c, key)

    def unlink(self, row: int, key: int, path: tuple[int, ...]) -> None:
        """Take `row` out of `key`'s sub-tree, merging lists upward when the tenant shrank."""
        self._forget(key)
        self.pairs -= 1
        depth = next(d for d, node in enumerate(path) if key in self.lists[node])
        node = path[depth]
        rows = self.lists[node][key]
        rows.remove(row)
        if not rows:
            del self.lists[node][key]
            self.n_lists -= 1
            self.stale += 1
        above = path[:depth]
        for a in above:
            self.inner[a][key] -= 1
        for a in above:  # counts shrink downward, so the first small one is the highest
            if self.inner[a][key] <= self.merge_below:
                self._merge(a, key)
                break

    def _merge(self, node: int, key: int) -> None:
        """Gather every list of `key` below `node` into one list at `node`."""
        merged = array("i")
        stack = self.tree.children(np.array([node])).tolist()
        while stack:
            c = stack.pop()
            rows = self.lists[c].pop(key, None)
            if rows is not None:
                merged.extend(rows)
                self.n_lists -= 1
                self.stale += 1
            elif self.inner[c].pop(key, None) is not None:
                self.n_inner -= 1
                self.stale += 1
                stack.extend(self.tree.children(np.array([c])).tolist())
        del self.inner[node][key]
        self.n_inner -= 1
        if merged:
            self.lists[node][key] = merged
            self.n_lists += 1
        else:
            self.stale += 1

    def flush(self) -> None:
        """Add the keys of newly opened lists to their filters (batched: one numpy call)."""
        if self._pending:
            nodes, keys = zip(*self._pending)
            self.bloom.add(np.asarray(nodes), np.asarray(keys))
            self._pending = []

    def refresh(self) -> None:
        """Rebuild the filters from the exact maps once enough tenants have left nodes."""
        if self.stale < max(BLOOM_REFRESH_MIN, (self.n_lists + self.n_inner) // 4):
            return
        pairs = [(n, k) for n in range(self.tree.n_nodes) for d in (self.lists[n], self.inner[n]) for k in d]
        nodes, keys = (np.asarray(x) for x in zip(*pairs)) if pairs else (np.zeros(0), np.zeros(0))
        self.bloom.rebuild(nodes, keys)
        self.stale = 0

    def _forget(self, key: int) -> None:
        hit = self._cache.pop(key, None)
        if hit is not None:
            self._cached_bytes -= hit.nbytes

    # -- search ----------------------------------------------------------------------------------

    def buckets(self, key: int) -> Buckets | None:
        """Walk `key`'s sub-tree level by level from the root, entering only children whose
        filter holds the key, and collect its shortlists (cached until the tenant changes)."""
        root = self.lists[0].get(key)
        if root is not None:  # a small tenant, in one list at the root: cheaper to copy than to cache
            return Buckets.at_root(root)
        if key in self._cache:
            self._cache.move_to_end(key)  # least recently used first
            return self._cache[key]
        nodes, lists = [], []
        frontier = np.zeros(1, np.int64)
        frontier = frontier[self.bloom.contains(frontier, key)]
        while len(frontier):
            expand = []
            for node in frontier.tolist():
                rows = self.lists[node].get(key)
                if rows is None:
                    expand.append(node)
                else:
                    nodes.append(node)
                    lists.append(rows)
            kids = self.tree.children(np.asarray(expand, np.int64))
            frontier = kids[self.bloom.contains(kids, key)] if len(kids) else kids
        found = Buckets.build(self.tree, nodes, lists) if nodes else None
        self._cache[key] = found
        if found is not None:
            self._cached_bytes += found.nbytes
            # the cache may hold about as much as the lists it flattens
            while self._cached_bytes > max(1 << 20, 8 * self.pairs) and len(self._cache) > 1:
                self._forget(next(iter(self._cache)))
        return found

    # -- persistence -----------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        self.flush()
        entries = [(n, k, rows) for n, d in enumerate(self.lists) for k, rows in d.items()]
        inner = [(n, k, c) for n, d in enumerate(self.inner) for k, c in d.items()]
        return {"bloom": self.bloom.words, "list_node": np.asarray([e[0] for e in entries], np.int64),
                "list_key": np.asarray([e[1] for e in entries], np.int64),
                "list_len": np.asarray([len(e[2]) for e in entries], np.int64),
                "list_rows": np.concatenate([np.frombuffer(e[2], np.int32) for e in entries]) if entries
                else np.zeros(0, np.int32),
                "inner": np.asarray(inner, np.int64).reshape(-1, 3), "stale": np.asarray(self.stale)}

    def restore(self, a: dict[str, np.ndarray]) -> None:
        """Refill from `arrays()` output (into a fresh instance over the same tree)."""
        self.bloom.words[:] = a["bloom"]
        rows, ends = a["list_rows"].astype(np.int32, copy=False), np.cumsum(a["list_len"]).tolist()
        for node, key, start, end in zip(a["list_node"].tolist(), a["list_key"].tolist(), [0] + ends, ends):
            lst = array("i")
            lst.frombytes(rows[start:end].tobytes())
            self.lists[node][key] = lst
        for node, key, count in a["inner"].tolist():
            self.inner[node][key] = count
        self.n_lists, self.n_inner = len(a["list_node"]), len(a["inner"])
        self.pairs, self.stale = int(a["list_len"].sum()), int(a["stale"])
