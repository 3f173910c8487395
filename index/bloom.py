"""One Bloom filter per tree node, all in one bit matrix, holding small integer keys (tenants).

Curator's per-node filters say which tenants may have vectors below a node, in a fixed
number of bits whatever the number of tenants. A filter may answer yes wrongly (the walk
then enters a node in vain) but never no wrongly, so nothing visible is missed. Filters
cannot forget: keys that left a node stay until `rebuild`.

Keeping every node's filter as one row of a uint64 matrix lets a walk test a key against
all the children of a level in one vectorised step.
"""

from __future__ import annotations

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: well spread 64-bit hashes of small integers."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return x ^ (x >> np.uint64(31))


class NodeBloomFilters:
    """`bits` per node (a multiple of 64), `hashes` positions per key (double hashing)."""

    def __init__(self, n_nodes: int, bits: int, hashes: int) -> None:
        if bits < 64 or bits % 64:
            raise ValueError(f"bits must be a positive multiple of 64, got {bits}")
        if hashes < 1:
            raise ValueError(f"hashes must be >= 1, got {hashes}")
        self.bits, self.hashes = bits, hashes
        self.words = np.zeros((n_nodes, bits // 64), np.uint64)

    @property
    def nbytes(self) -> int:
        return self.words.nbytes

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """(len(keys), hashes) bit positions of each key."""
        with np.errstate(over="ignore"):
            h = _mix(np.asarray(keys, np.uint64).reshape(-1))
            h1, h2 = h & np.uint64(0xFFFFFFFF), (h >> np.uint64(32)) | np.uint64(1)
            steps = np.arange(self.hashes, dtype=np.uint64)
            return ((h1[:, None] + steps[None, :] * h2[:, None]) % np.uint64(self.bits)).astype(np.int64)

    def add(self, nodes: np.ndarray, keys: np.ndarray) -> None:
        """Insert keys[i] into the filter of nodes[i] (or one key into all `nodes`)."""
        nodes = np.asarray(nodes, np.int64).reshape(-1)
        pos = self.positions(keys)
        if len(pos) == 1 and len(nodes) != 1:
            pos = np.broadcast_to(pos, (len(nodes), self.hashes))
        rows = np.repeat(nodes, self.hashes)
        flat = pos.reshape(-1)
        np.bitwise_or.at(self.words, (rows, flat >> 6), np.uint64(1) << (flat & 63).astype(np.uint64))

    def contains(self, nodes: np.ndarray, key: int) -> np.ndarray:
        """Bool per node: may `key` be in its filter (no false negatives)."""
        pos = self.positions(np.array([key]))[0]
        got = self.words[np.asarray(nodes, np.int64)[:, None], pos >> 6]
        return ((got >> (pos & 63).astype(np.uint64)) & np.uint64(1)).all(axis=1)

    def rebuild(self, nodes: np.ndarray, keys: np.ndarray) -> None:
        """Forget everything and hold exactly keys[i] at nodes[i] (drops keys that left)."""
        self.words[:] = 0
        if len(nodes):
            self.add(nodes, keys)

    def fill_ratio(self) -> float:
        """Share of bits set: the false-positive rate is about fill_ratio ** hashes."""
        return float(np.unpackbits(self.words.view(np.uint8)).mean()) if self.words.size else 0.0
