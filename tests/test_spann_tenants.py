"""Tenant-aware SPANN: isolation, recall within a tenant, lists read, grants and revokes.

Tenants follow the data's clusters (a "team" owns a topic) or are scattered at random, and
every vector is restricted (the multi-tenant case the per-list tenant map is for): exact
search restricted to the tenant's visible ids is the ground truth.
"""

import json
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from index import create_index, load_index
from index import postings as codec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_spann import clustered, recall

N, D, CENTERS = 12_000, 32, 120


@pytest.fixture(autouse=True, scope="module")
def one_omp_thread():
    """faiss on small problems spins badly when its threads share busy cores."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def centres_of(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Cluster of each vector (nearest of the generator's centres, recomputed from the data)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((CENTERS, D)).astype(np.float32) * 2
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return np.argmax(x @ c.T, axis=1)


@pytest.fixture(scope="module")
def data():
    x, q = clustered(N, d=D, centers=CENTERS)
    ids = np.arange(N, dtype=np.int64) * 7 + 3
    cluster = centres_of(x)
    rng = np.random.default_rng(2)
    tenants: list[set[str]] = [set() for _ in range(N)]
    for i in range(N):  # everyone belongs to one of three big teams...
        tenants[i].add(f"team{i % 3}")
    for i in np.flatnonzero(np.isin(cluster, [5, 17])):  # ...a small team owns two topics
        tenants[i].add("small")
    for i in rng.choice(N, 40, replace=False):  # ...and a tiny one holds a scattered few
        tenants[i].add("tiny")
    return ids, x, q, [sorted(t) for t in tenants]


def build(ids, x, tenants, **cfg):
    cfg.setdefault("sample_per_head", 10)  # trained on a quarter: keep head_ratio's head count
    ix = create_index("spann", x.shape[1], "ip", **cfg)
    ix.train(x[::4])
    ix.add(ids, x, tenants)
    ix.search(x[:1], 1)
    return ix


@pytest.fixture(scope="module")
def index(data):
    ids, x, _, tenants = data
    return build(ids, x, tenants)


def visible(ids, tenants, tenant):
    return ids[np.array([not t or tenant in t for t in tenants])]


def exact_for(ids, x, tenants, tenant, q, k=10):
    flat = create_index("flat", x.shape[1])
    flat.add(ids, x, tenants)
    return flat.search(q, k, tenant=tenant).ids


def tenant_queries(x, tenants, tenant, q, n=60, seed=3):
    """Half the queries near the tenant's own vectors, half generic ones."""
    own = np.flatnonzero([tenant in t for t in tenants])
    rng = np.random.default_rng(seed)
    near = x[rng.choice(own, n // 2)] + 0.3 * rng.standard_normal((n // 2, x.shape[1])).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    return np.concatenate([near, q[:n - n // 2]]).astype(np.float32)


@pytest.mark.parametrize("tenant", ["team1", "small", "tiny"])
def test_tenant_search_is_isolated_and_finds_the_tenants_neighbours(index, data, tenant):
    ids, x, q, tenants = data
    qs = tenant_queries(x, tenants, tenant, q)
    got = index.search(qs, 10, tenant=tenant)
    allowed = visible(ids, tenants, tenant)
    assert np.isin(got.ids[got.ids >= 0], allowed).all()  # never another tenant's vector
    truth = exact_for(ids, x, tenants, tenant, qs)
    assert recall(got.ids, truth) >= 0.9, tenant
    assert (got.ids[:, 0] >= 0).all()  # a small tenant is never answered empty
    assert (index.search(qs, 10).ids == -1).all()  # no tenant: every vector here is restricted


def test_small_tenant_reads_only_its_own_lists(index, data):
    _, x, q, tenants = data
    qs = tenant_queries(x, tenants, "small", q, n=20)

    def lists_read(tenant):
        before = index.read_stats()
        for row in qs:  # one query at a time: a batch reads the union of its lists once
            index.search(row[None], 10, tenant=tenant)
        return (index.read_stats() - before).reads / len(qs)

    small_lists = len(index.tenants.postings_for("small"))
    assert small_lists < 0.1 * index.heads.count
    untenanted, team, small = lists_read(None), lists_read("team1"), lists_read("small")
    # without the per-list map every search reads the same nearest lists, whoever asks
    assert small <= small_lists and small < 0.25 * team, (small, team, untenanted, small_lists)


def test_posting_tenants_stay_a_superset_and_are_exact_after_compaction(data):
    ids, x, _, tenants = data
    ix = build(ids[:6000], x[:6000], tenants[:6000], head_ratio=0.05, max_posting=96)
    rng = np.random.default_rng(4)
    extra = np.arange(6000, 8000)
    ix.add(ids[extra], x[extra], [tenants[i] for i in extra])  # inserts split lists
    gone = rng.choice(ids[:8000], 800, replace=False)
    ix.remove(gone)
    moved = rng.choice(np.setdiff1d(ids[:8000], gone), 300, replace=False)
    rows = (moved - 3) // 7
    ix.remove(moved)  # the datastore grants and revokes as remove + add with the new tenants
    ix.add(moved, x[rows], [["team0", "other"] if n % 2 else ["solo"] for n in range(len(moved))])

    def actual():
        out = {}
        for h, blob in ix.store.items():
            p = codec.decode(blob, ix.dim)
            live = p.ids[ix._valid(p)]
            out[h] = (frozenset().union(*(ix.tenants.of.get(int(i), frozenset()) for i in live)),
                      any(int(i) not in ix.tenants.of for i in live))
        return out

    for h, (names, public) in actual().items():  # stale flags may linger; a missing one never
        assert names <= ix.tenants.tenants_of_posting(h) and not public
        for t in names:
            assert h in ix.tenants.postings_for(t)
    ix.compact()
    for h, (names, public) in actual().items():
        assert names == ix.tenants.tenants_of_posting(h)
    solo = ix.search(x[rows[::2]], 10, tenant="solo").ids
    assert set(solo[solo >= 0].tolist()) <= set(moved[::2].tolist())
    assert (solo[:, 0] == moved[::2]).mean() >= 0.9


def test_public_vectors_are_seen_by_every_tenant(data):
    ids, x, q, tenants = data
    mixed = [t if i % 4 else [] for i, t in enumerate(tenants[:6000])]  # a quarter public
    ix = build(ids[:6000], x[:6000], mixed)
    for tenant in (None, "small", "team2"):
        got = ix.search(q[:50], 10, tenant=tenant)
        assert np.isin(got.ids[got.ids >= 0], visible(ids[:6000], mixed, tenant)).all()
        assert recall(got.ids, exact_for(ids[:6000], x[:6000], mixed, tenant, q[:50])) >= 0.9


def test_tenant_lists_survive_save_and_load(tmp_path, index, data):
    ids, x, q, tenants = data
    qs = tenant_queries(x, tenants, "small", q, n=20)
    index.save(tmp_path / "ix")
    loaded = load_index("spann", tmp_path / "ix")
    np.testing.assert_array_equal(loaded.search(qs, 10, tenant="small").ids, index.search(qs, 10, tenant="small").ids)
    np.testing.assert_array_equal(loaded.tenants.postings_for("small"), index.tenants.postings_for("small"))
    loaded.store.close()  # one LMDB environment per directory and process
    state = json.loads((tmp_path / "ix" / "spann.json").read_text())
    del state["tenant_map"]  # an index saved before per-list tenants: rebuilt from the lists at load
    state["tenants"] = {str(i): t for i, t in zip(ids.tolist(), tenants)}
    (tmp_path / "ix" / "spann.json").write_text(json.dumps(state))
    old = load_index("spann", tmp_path / "ix")
    np.testing.assert_array_equal(old.tenants.postings_for("small"), index.tenants.postings_for("small"))


def test_datastore_grants_and_revokes_reach_spann_searches(tmp_path):
    from datastore.build import BuildConfig
    from datastore.build import build as build_ds
    from datastore.store import open_datastore

    x, _ = clustered(2000, d=16, centers=40)
    np.save(tmp_path / "v.npy", x)
    lines = [{"text": f"p{i}", "tenants": ["acme" if i % 2 else "globex"]} for i in range(len(x))]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "ds"
    build_ds(BuildConfig([str(tmp_path / "p.jsonl")], out, embeddings=tmp_path / "v.npy", shards=1,
                         index_kind="spann", progress=False))
    with open_datastore(out) as ds:
        ds.create_tenant("initech")
        target = ds.search_vectors(x[:1], 1, tenant="globex").ids[0, 0]
        assert target >= 0
        vec = ds.shards[0].get_vectors([int(target)])
        assert ds.search_vectors(vec, 5, tenant="initech").ids[0, 0] == -1  # nothing visible yet
        ds.grant([int(target)], "initech")
        assert ds.search_vectors(vec, 5, tenant="initech").ids[0].tolist()[:2] == [target, -1]
        assert ds.search_vectors(vec, 1, tenant="globex").ids[0, 0] == target  # grants add, never move
        ds.revoke([int(target)], "globex")
        found = ds.search_vectors(vec, 5, tenant="globex").ids[0]
        assert target not in found.tolist() and (found >= 0).all()
        acme = ds.search_vectors(x[:30], 10, tenant="acme").ids
        assert (acme >= 0).all()
        assert all("acme" in p.tenants for p in ds.get_passages([int(i) for i in np.unique(acme)], tenant="acme"))
