"""SPANN's head index: the inverted file that takes over from flat search past head_flat_max
must find the heads exact search finds, follow adds and removes, and keep SPANN's recall."""

import numpy as np
import pytest

from index.spann_heads import HeadIndex
from index import load_index
from tests.test_spann import build, clustered, exact, recall


def _mixture(n: int, d: int = 48, clusters: int = 400, seed: int = 0) -> np.ndarray:
    """Heads the way a clustered corpus yields them: a few per natural cluster, the clusters
    far apart and about equidistant (the case that defeated an HNSW head graph)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((clusters, d)).astype(np.float32) * 3
    return (c[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)


def _coverage(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of each query's true nearest head found among its n results."""
    return float(np.mean([t in f for f, t in zip(found, truth)]))


def _unit_mixture(n: int, d: int = 48, clusters: int = 400, seed: int = 0) -> np.ndarray:
    """Heads of unit-norm data: means of normalized vectors, so a little shorter than 1."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((clusters, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, clusters, n)] + 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    return (0.8 * x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("spherical", [False, True])
def test_inverted_file_over_heads_finds_what_exact_search_finds(spherical):
    heads = _unit_mixture(3000) if spherical else _mixture(3000)
    noise = 0.2 * np.random.default_rng(1).standard_normal(heads[:300].shape).astype(np.float32)
    queries = heads[:300] + (noise / 8 if spherical else noise)
    exact_index = HeadIndex(heads.shape[1], flat_max=10**9, nprobe=8)
    exact_index.reset(heads)
    ivf = HeadIndex(heads.shape[1], flat_max=500, nprobe=8, spherical=spherical)
    ivf.reset(heads)
    sizes = np.array([ivf._ivf.invlists.list_size(c) for c in range(ivf._ivf.nlist)])
    assert sizes.max() <= 6 * sizes.mean()  # even cells: no hub cell that every query reads
    assert ivf._ivf is not None and exact_index._ivf is None
    _, nearest = exact_index.search(queries, 1)
    _, found = ivf.search(queries, 8)
    assert _coverage(found, nearest[:, 0]) >= 0.97
    assert ivf._scanned() < len(heads) / 2  # it reads a fraction of the heads


def test_inverted_file_follows_adds_and_removes_and_regrows():
    heads = _mixture(1200, seed=2)
    ix = HeadIndex(heads.shape[1], flat_max=400, nprobe=8)
    ix.reset(heads[:500])
    assert ix._ivf is not None
    removed = np.arange(0, 500, 7)
    for h in removed:
        ix.remove(int(h))
    _, got = ix.search(heads[:500], 5)
    assert not np.isin(got, removed).any()
    assert ix.count == 500 - len(removed)
    new = ix.add(heads[500:])  # grows past twice what the cells were trained on: retrained
    assert ix._built_for == ix.count
    _, got = ix.search(heads[500:], 1)
    assert (got[:, 0] == new).mean() >= 0.98
    _, got = ix.search(heads[:500], 5)
    assert not np.isin(got, removed).any()  # a retrain leaves removed heads out


def test_a_flat_head_index_switches_to_the_inverted_file_when_it_grows_past_the_limit():
    heads = _mixture(900, seed=3)
    ix = HeadIndex(heads.shape[1], flat_max=500, nprobe=8)
    ix.reset(heads[:400])
    assert ix._ivf is None
    ix.add(heads[400:])
    assert ix._ivf is not None
    _, got = ix.search(heads, 1)
    assert (got[:, 0] == np.arange(len(heads))).mean() >= 0.98


def test_spann_over_an_inverted_file_of_heads_keeps_recall_through_splits():
    x, q = clustered(20_000, seed=5)
    ids = np.arange(len(x), dtype=np.int64)
    n0 = 16_000
    ix = build(ids[:n0], x[:n0], head_flat_max=32, max_posting=96)
    assert ix.heads._ivf is not None
    before = ix.heads.count
    for s in range(n0, len(x), 1000):
        ix.add(ids[s:s + 1000], x[s:s + 1000])
    assert ix.heads.count > before  # lists split: new heads went into the inverted file
    truth = exact(ids, x, q)
    flat = build(ids, x, max_posting=96)
    r_ivf, r_flat = recall(ix.search(q, 10).ids, truth), recall(flat.search(q, 10).ids, truth)
    assert r_ivf >= 0.93 and r_ivf >= r_flat - 0.02, (r_ivf, r_flat)


def test_a_saved_index_reopens_with_its_head_cells_and_answers_the_same(tmp_path):
    x, q = clustered(12_000, seed=7)
    ids = np.arange(len(x), dtype=np.int64)
    ix = build(ids, x, head_flat_max=32)
    assert ix.heads._ivf is not None
    before = ix.search(q, 10)
    ix.save(tmp_path / "ix")
    assert (tmp_path / "ix" / "spann.cells.npy").is_file()
    again = load_index("spann", tmp_path / "ix")
    np.testing.assert_array_equal(again.heads.cells, ix.heads.cells)  # reused, not clustered anew
    after = again.search(q, 10)
    assert (after.ids == before.ids).all()
