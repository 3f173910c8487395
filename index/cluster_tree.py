"""A static hierarchical k-means tree over a sample: Curator's shared clustering tree.

Built once with balanced k-means (index/kmeans.py) so that leaves hold similar numbers of
vectors; vectors added later descend greedily to the nearest child at each level. Nodes
are numbered in breadth-first order, so a node's children are one contiguous range and
every array here is indexed by node id.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from index.kmeans import balanced_kmeans

#: Rows descended together by `assign`: bounds the (rows, branching, dim) gather.
ASSIGN_CHUNK = 8192


@dataclass
class ClusterTree:
    """Node 0 is the root; `ancestors[n]` is the path root..n padded with -1, `paths[n]` the same
    as a tuple (what per-vector updates walk)."""

    centroids: np.ndarray  # (nodes, dim) float32
    parent: np.ndarray  # (nodes,) int32, -1 at the root
    first_child: np.ndarray  # (nodes,) int32
    n_children: np.ndarray  # (nodes,) int32, 0 at leaves
    depth: np.ndarray  # (nodes,) int32

    def __post_init__(self) -> None:
        n = len(self.parent)
        if not (len(self.centroids) == len(self.first_child) == len(self.n_children) == len(self.depth) == n):
            raise ValueError("tree arrays must all have one entry per node")
        levels = int(self.depth.max()) + 1 if n else 1
        self.ancestors = np.full((n, levels), -1, np.int32)
        for node in range(n):  # breadth-first: a parent's row is filled before its children's
            p = int(self.parent[node])
            if p >= 0:
                self.ancestors[node] = self.ancestors[p]
            self.ancestors[node, self.depth[node]] = node
        self.is_leaf = self.n_children == 0
        self.sq_norms = np.einsum("ij,ij->i", self.centroids, self.centroids)
        self.paths = [tuple(self.ancestors[n, :self.depth[n] + 1].tolist()) for n in range(n)]

    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    @property
    def levels(self) -> int:
        return self.ancestors.shape[1]

    @property
    def nbytes(self) -> int:
        arrays = (self.centroids, self.parent, self.first_child, self.n_children, self.depth, self.ancestors,
                  self.is_leaf, self.sq_norms)
        return sum(a.nbytes for a in arrays)

    def arrays(self) -> dict[str, np.ndarray]:
        """What `from_arrays` needs (the derived tables are rebuilt)."""
        return {"centroids": self.centroids, "parent": self.parent, "first_child": self.first_child,
                "n_children": self.n_children, "depth": self.depth}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ClusterTree":
        return cls(**{k: np.asarray(arrays[k]) for k in ("centroids", "parent", "first_child", "n_children",
                                                          "depth")})

    @classmethod
    def build(cls, sample: np.ndarray, *, branching: int, leaf_size: int, max_depth: int,
              slack: float = 1.3, seed: int = 0) -> "ClusterTree":
        """Split every node holding more than `leaf_size` sample points into
        min(branching, ceil(points / leaf_size)) balanced clusters, down to `max_depth`."""
        sample = np.ascontiguousarray(sample, np.float32)
        if not len(sample):
            raise ValueError("cannot build a clustering tree from an empty sample")
        centroids, parent, depth, members = [sample.mean(0)], [-1], [0], [np.arange(len(sample))]
        first_child, n_children = [0], [0]
        queue = deque([0])
        while queue:
            node = queue.popleft()
            idx = members[node]
            if len(idx) <= leaf_size or depth[node] >= max_depth:
                continue
            k = max(2, min(branching, math.ceil(len(idx) / leaf_size)))
            cents, assign = balanced_kmeans(sample[idx], k, slack=slack, seed=seed + node)
            parts = [(cents[c], idx[assign == c]) for c in range(k) if (assign == c).any()]
            if len(parts) < 2:  # identical points: nothing to split
                continue
            first_child[node], n_children[node] = len(parent), len(parts)
            for cent, part in parts:
                queue.append(len(parent))
                centroids.append(cent)
                parent.append(node)
                depth.append(depth[node] + 1)
                members.append(part)
                first_child.append(0)
                n_children.append(0)
        return cls(np.ascontiguousarray(np.stack(centroids), np.float32), *(
            np.asarray(a, np.int32) for a in (parent, first_child, n_children, depth)))

    def distances(self, queries: np.ndarray) -> np.ndarray:
        """(Q, nodes) squared L2 distances from each query to every node's centroid: one
        product, cheaper than walking level by level for trees of a few thousand nodes."""
        d = queries @ self.centroids.T
        d *= -2.0
        d += self.sq_norms[None, :]
        d += np.einsum("ij,ij->i", queries, queries)[:, None]
        return np.maximum(d, 0.0, out=d)

    def children(self, nodes: np.ndarray) -> np.ndarray:
        """The children of `nodes`, concatenated (leaves contribute none)."""
        nodes = np.asarray(nodes, np.int64)
        counts = self.n_children[nodes]
        if not counts.sum():
            return np.zeros(0, np.int64)
        starts = np.repeat(self.first_child[nodes].astype(np.int64), counts)
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return starts + offsets

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """The leaf of each vector: the nearest child at every level, from the root."""
        out = np.empty(len(vectors), np.int32)
        width = max(1, int(self.n_children.max()))
        for start in range(0, len(vectors), ASSIGN_CHUNK):
            x = vectors[start:start + ASSIGN_CHUNK]
            node = np.zeros(len(x), np.int64)
            for _ in range(self.levels - 1):
                inner = np.flatnonzero(self.n_children[node] > 0)
                if not len(inner):
                    break
                cand = self.first_child[node[inner]][:, None] + np.arange(width)[None, :]
                valid = np.arange(width)[None, :] < self.n_children[node[inner]][:, None]
                cand = np.where(valid, cand, 0)
                diff = self.centroids[cand] - x[inner][:, None, :]
                dist = np.where(valid, np.einsum("ijk,ijk->ij", diff, diff), np.inf)
                node[inner] = cand[np.arange(len(inner)), dist.argmin(1)]
            out[start:start + len(x)] = node
        return out
