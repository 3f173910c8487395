import numpy as np
import pytest

from datastore.sharding import merge_topk, shard_of
from index import SearchResult, create_index, load_index


def _data(n=2000, d=32, q=50, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((q, d)).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_equals_numpy_brute_force(metric):
    base, queries = _data()
    ids = np.arange(len(base), dtype=np.int64) * 7 + 3
    index = create_index("flat", base.shape[1], metric)
    index.add(ids, base)
    res = index.search(queries, 10)
    if metric == "ip":
        scores = queries @ base.T
    else:
        scores = -((queries[:, None, :] - base[None, :, :]) ** 2).sum(-1)
    expected = ids[np.argsort(-scores, axis=1)[:, :10]]
    assert (res.ids == expected).mean() > 0.999  # ties aside
    np.testing.assert_allclose(res.scores, np.take_along_axis(scores, np.argsort(-scores, 1)[:, :10], 1),
                               rtol=1e-4, atol=1e-3)


def test_tenant_and_allowed_ids_filter_inside_the_search():
    base, queries = _data(500)
    index = create_index("flat", base.shape[1])
    tenants = [("a",) if i % 3 == 0 else ("b",) if i % 3 == 1 else () for i in range(500)]
    index.add(np.arange(500), base, tenants)
    res = index.search(queries, 20, tenant="a")
    assert (res.ids >= 0).all()
    assert set((res.ids % 3).ravel().tolist()) <= {0, 2}
    # exact top-k of what tenant a may see
    visible = np.array([i for i in range(500) if i % 3 != 1])
    expected = visible[np.argsort(-(queries @ base[visible].T), axis=1)[:, :20]]
    assert (res.ids == expected).mean() > 0.999
    no_tenant = index.search(queries, 20)
    assert set((no_tenant.ids % 3).ravel().tolist()) == {2}
    allowed = index.search(queries, 5, allowed_ids=np.array([2, 5, 8]))
    assert set(allowed.ids.ravel().tolist()) <= {2, 5, 8, -1}


def test_remove_readd_save_load(tmp_path):
    base, queries = _data(300)
    index = create_index("flat", base.shape[1])
    index.add(np.arange(300), base, [("t",)] * 300)
    assert index.remove(np.array([0, 1, 999])) == 2
    assert len(index) == 298
    index.add(np.array([5]), base[:1])  # replaces id 5, now public
    assert len(index) == 298
    index.save(tmp_path)
    loaded = load_index("flat", tmp_path)
    assert len(loaded) == 298
    a, b = index.search(queries, 10, tenant="t"), loaded.search(queries, 10, tenant="t")
    np.testing.assert_array_equal(a.ids, b.ids)
    assert 5 in loaded.search(base[:1], 1).ids  # public after the re-add
    assert loaded.stats().disk_bytes > 0 and loaded.stats().count == 298


def test_bad_shapes_raise():
    index = create_index("flat", 8)
    with pytest.raises(ValueError):
        index.add(np.arange(3), np.zeros((3, 9), np.float32))
    with pytest.raises(ValueError):
        index.search(np.zeros((1, 8), np.float32), 0)
    with pytest.raises(ValueError, match="unknown index kind"):
        create_index("nope", 8)


def test_merge_topk_equals_global_top_k():
    base, queries = _data(1000)
    ids = np.arange(1000)
    shard = shard_of(ids, 3)
    assert set(shard.tolist()) == {0, 1, 2}
    parts = []
    for s in range(3):
        ix = create_index("flat", base.shape[1])
        ix.add(ids[shard == s], base[shard == s])
        parts.append(ix.search(queries, 10))
    merged = merge_topk(parts, 10)
    whole = create_index("flat", base.shape[1])
    whole.add(ids, base)
    np.testing.assert_array_equal(merged.ids, whole.search(queries, 10).ids)
    short = merge_topk([SearchResult.empty(2, 3)], 5)
    assert short.ids.shape == (2, 5) and (short.ids == -1).all()


def test_shard_assignment_is_stable_and_balanced():
    ids = np.arange(100_000)
    a, b = shard_of(ids, 8), shard_of(ids, 8)
    np.testing.assert_array_equal(a, b)
    counts = np.bincount(a, minlength=8)
    assert counts.min() > 0.9 * counts.mean()
