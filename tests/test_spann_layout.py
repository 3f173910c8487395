"""Posting rows decode aligned (BLAS speed), old unpadded blobs still decode, and the Lloyd
refinement of SPANN's heads beats the balanced tree's leaves on clustered data."""

from __future__ import annotations

import struct

import faiss
import numpy as np
import pytest

from index import postings
from index.kmeans import hierarchical_heads
from index.postings import Posting
from index.spann_heads import refine_heads


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_start_aligned_and_round_trip(n, dtype):
    rng = np.random.default_rng(n)
    p = Posting(rng.integers(0, 1 << 40, n), rng.integers(0, 9, n).astype(np.uint16),
                rng.standard_normal((n, 6)).astype(dtype))
    blob = postings.encode(p)
    # an 8-aligned buffer holding the blob, as LMDB's overflow pages are
    buf = np.zeros(len(blob) + 8, np.uint8)
    buf[:len(blob)] = np.frombuffer(blob, np.uint8)
    got = postings.decode(memoryview(buf)[:len(blob)], 6)
    assert got.vectors.flags.aligned and got.ids.flags.aligned
    np.testing.assert_array_equal(got.ids, p.ids)
    np.testing.assert_array_equal(got.versions, p.versions)
    np.testing.assert_array_equal(got.vectors, p.vectors)


def test_unpadded_blob_from_before_the_flag_still_decodes():
    rng = np.random.default_rng(0)
    ids, vers, vecs = np.arange(3, dtype=np.int64), np.ones(3, np.uint16), rng.standard_normal((3, 4)).astype(np.float32)
    legacy = struct.pack("<2sBBI", b"PL", 1, 0, 3) + ids.tobytes() + vers.tobytes() + vecs.tobytes()
    got = postings.decode(legacy, 4)
    np.testing.assert_array_equal(got.vectors, vecs)
    rows = postings.aligned(got.vectors)
    assert rows.flags.aligned
    np.testing.assert_array_equal(rows, vecs)


def test_refined_heads_route_neighbours_better_than_balanced_leaves():
    # like syn384: several natural clusters per head, which a balanced split cuts
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((600, 64)).astype(np.float32)
    x = (centres[rng.integers(0, 600, 8000)] + 0.5 * rng.standard_normal((8000, 64))).astype(np.float32)
    q = (centres[rng.integers(0, 600, 200)] + 0.5 * rng.standard_normal((200, 64))).astype(np.float32)
    truth = faiss.knn(q, x, 10)[1]

    def recall_one_list(heads: np.ndarray) -> float:
        home = faiss.knn(x, heads, 1)[1][:, 0]
        qh = faiss.knn(q, heads, 1)[1][:, 0]
        return float(np.mean([np.mean(home[t] == h) for t, h in zip(truth, qh)]))

    tree = hierarchical_heads(x, 60, branching=16, slack=1.3, seed=0)
    refined = refine_heads(x, tree, 5, seed=0)
    assert refined.shape == tree.shape
    assert recall_one_list(refined) > recall_one_list(tree) + 0.05
