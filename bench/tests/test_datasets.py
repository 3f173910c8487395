import json

import numpy as np
import pytest

from bench import datasets
from bench.datasets import DatasetError, exact_knn, load_dataset
from bench.prepare import SyntheticConfig, make_questions, prepare_synthetic

from .conftest import write_dataset


def _brute(base, queries, k, metric):
    s = queries @ base.T if metric == "ip" else -((queries[:, None, :] - base[None]) ** 2).sum(-1)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_gt_is_computed_cached_and_reused(tmp_path):
    rng = np.random.default_rng(0)
    d = write_dataset(tmp_path / "d", rng.normal(size=(300, 8)), rng.normal(size=(12, 8)))
    ds = load_dataset(d)
    assert (d / "gt.npy").exists()
    assert ds.gt.dtype == np.int64 and ds.gt.shape == (12, 100)
    assert np.array_equal(ds.gt[:, :10], _brute(ds.base, ds.queries, 10, "l2"))
    marker = ds.gt.copy()
    marker[0, 0] = 299 if marker[0, 0] != 299 else 298
    np.save(d / "gt.npy", marker)  # a cached file is read, not recomputed
    assert load_dataset(d).gt[0, 0] == marker[0, 0]


def test_chunked_exact_search_matches_brute_force(monkeypatch):
    rng = np.random.default_rng(1)
    base, queries = rng.normal(size=(500, 6)).astype(np.float32), rng.normal(size=(9, 6)).astype(np.float32)
    monkeypatch.setattr(datasets, "_GT_CHUNK", 64)
    for metric in ("ip", "l2"):
        assert np.array_equal(exact_knn(base, queries, 20, metric), _brute(base, queries, 20, metric))


def test_cosine_is_normalised_and_searched_with_inner_product(tmp_path):
    rng = np.random.default_rng(2)
    d = write_dataset(tmp_path / "c", rng.normal(size=(200, 5)) * 7, rng.normal(size=(4, 5)), metric="cos")
    ds = load_dataset(d)
    assert ds.metric == "ip" and ds.source_metric == "cos"
    assert np.allclose(np.linalg.norm(ds.base, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(ds.gt[:, :10], _brute(ds.base, ds.queries, 10, "ip"))


def test_tenant_ground_truth_only_holds_visible_vectors(tmp_path):
    rng = np.random.default_rng(3)
    n = 60
    owners = np.arange(n) % 3  # tenant 0, 1 or 2; every tenth vector public
    rows = [[] if i % 10 == 0 else [int(owners[i])] for i in range(n)]
    indptr = np.cumsum([0] + [len(r) for r in rows])
    d = write_dataset(tmp_path / "t", rng.normal(size=(n, 4)), rng.normal(size=(6, 4)),
                      query_tenants=np.array([0, 1, 2, 0, 1, 2]))
    np.savez(d / "base_tenants.npz", indptr=indptr, indices=np.array([t for r in rows for t in r]))
    ds = load_dataset(d)
    for qi, t in enumerate(ds.query_tenants):
        visible = {i for i in range(n) if not rows[i] or t in rows[i]}
        got = [i for i in ds.gt[qi] if i >= 0]
        assert set(got) <= visible and len(got) == len(visible)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: (d / "dataset.json").unlink(), "dataset.json"),
    (lambda d: (d / "dataset.json").write_text('{"metric": "hamming"}'), "metric"),
    (lambda d: np.save(d / "queries.npy", np.zeros((3, 5), np.float32)), "5-d"),
    (lambda d: np.save(d / "gt.npy", np.zeros((2, 10), np.int64)), "gt.npy"),
    (lambda d: (d / "base.npy").write_text("not numpy"), "readable"),
    (lambda d: (d / "query_tenants.npy").write_bytes(b""), "together"),
])
def test_bad_directories_get_clear_errors(tmp_path, mutate, message):
    rng = np.random.default_rng(4)
    d = write_dataset(tmp_path / "bad", rng.normal(size=(50, 4)), rng.normal(size=(5, 4)))
    mutate(d)
    with pytest.raises(DatasetError, match=message):
        load_dataset(d)


def test_missing_directory(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_synthetic_is_deterministic_and_sized(tmp_path):
    a = prepare_synthetic(SyntheticConfig(out=tmp_path / "a", n=1000, dim=12, queries=20, seed=5))
    b = prepare_synthetic(SyntheticConfig(out=tmp_path / "b", n=1000, dim=12, queries=20, seed=5))
    base = np.load(a / "base.npy")
    assert base.shape == (1000, 12) and base.dtype == np.float32
    assert np.array_equal(base, np.load(b / "base.npy"))
    assert json.loads((a / "dataset.json").read_text())["metric"] == "l2"
    with pytest.raises(DatasetError, match="n"):
        SyntheticConfig(out=tmp_path / "c", n=0)


def test_cosine_synthetic_is_unit_rows_and_memory_mapped(tmp_path):
    big = prepare_synthetic(SyntheticConfig(out=tmp_path / "b", n=70_000, dim=16, queries=10, clusters=9,
                                            metric="cos", seed=3))
    stored = np.load(big / "base.npy")
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    ds = load_dataset(big)
    assert isinstance(ds.base, np.memmap) or isinstance(ds.base.base, np.memmap)  # not a private copy
    assert ds.metric == "ip" and np.array_equal(np.asarray(ds.base), stored)
    assert np.array_equal(ds.gt[:, :10], _brute(stored, ds.queries, 10, "ip"))


def test_questions_are_seeded_and_distinct():
    titles = [f"Topic {i}" for i in range(50)]
    q1, q2 = make_questions(titles, 20, seed=1), make_questions(titles, 20, seed=1)
    assert q1 == q2 and len(set(q1)) == 20
    assert make_questions(titles, 20, seed=2) != q1
