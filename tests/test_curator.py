"""Curator against exact filtered search on seeded multi-tenant data: recall, isolation (also
under Bloom false positives), grant/revoke/delete in place, shortlist split and merge,
persistence, config checks, and a state machine of random updates with invariants."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from index import SearchParams, create_index, load_index
from index.curator import CuratorConfig, CuratorIndex, select_buckets
from index.registry import validate_params

EXACT = SearchParams(candidate_budget=10**9, prune_epsilon=float("inf"))
SMALL_TREE = {"leaf_size": 32, "branching": 8, "shortlist_limit": 32}


@pytest.fixture(autouse=True, scope="module")
def one_omp_thread():
    """faiss k-means on tiny clusters spins badly when its threads share busy cores."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def tenant_data(n: int = 6000, d: int = 16, tenants: int = 12, seed: int = 0, public: float = 0.05):
    """Clustered vectors; tenant sizes Zipf-distributed, each vector visible to 1-3 tenants,
    tenants favouring a few clusters of their own; a `public` share has no tenant."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((24, d)).astype(np.float32) * 3
    label = rng.integers(0, len(centres), n)
    x = (centres[label] + rng.standard_normal((n, d))).astype(np.float32)
    q = (centres[rng.integers(0, len(centres), 60)] + rng.standard_normal((60, d))).astype(np.float32)
    weight = 1.0 / np.arange(1, tenants + 1)
    home = rng.integers(0, len(centres), (tenants, 3))
    names = []
    for i in range(n):
        if rng.random() < public:
            names.append([])
            continue
        p = weight * (1 + 8 * (home == label[i]).any(1))
        picked = rng.choice(tenants, rng.integers(1, 4), replace=False, p=p / p.sum())
        names.append([f"t{t}" for t in picked])
    ids = np.arange(n, dtype=np.int64) * 7 + 3
    return ids, x, q, names


def build(ids, x, names, metric="l2", **cfg) -> CuratorIndex:
    index = create_index("curator", x.shape[1], metric, **{**SMALL_TREE, **cfg})
    index.train(x)
    index.add(ids, x, names)
    return index


def exact_index(ids, x, names, metric="l2"):
    flat = create_index("flat", x.shape[1], metric)
    flat.add(ids, x, names)
    return flat


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(a[a >= 0]) & set(b[b >= 0])) for a, b in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def visible_ids(ids, names, tenant):
    return {int(i) for i, ts in zip(ids, names) if not ts or (tenant is not None and tenant in ts)}


def check_structure(index: CuratorIndex, visible: dict[str | None, set[int]], vectors: dict[int, np.ndarray]):
    """Every visible id in exactly one shortlist on its own path; lists at inner tree nodes
    within the limit; inner counts exact and above the merge threshold; no filter misses."""
    tree, cfg = index.tree, index.config
    for tenant, ids in visible.items():
        lay = index.layout(tenant)
        listed = np.concatenate(list(lay.lists.values())) if lay.lists else np.zeros(0, np.int64)
        assert len(listed) == len(set(listed.tolist())), f"{tenant}: an id in two lists"
        assert set(listed.tolist()) == ids, f"{tenant}: lists differ from what it may see"
        below = {n: 0 for n in lay.inner}
        for node, members in lay.lists.items():
            leaves = tree.assign(np.stack([vectors[i] for i in members.tolist()]))
            assert (tree.ancestors[leaves, tree.depth[node]] == node).all(), "a list off its ids' paths"
            assert tree.is_leaf[node] or len(members) <= cfg.shortlist_limit
            parent = tree.parent[node]
            assert node == 0 or parent in lay.inner, "a list whose parent is not inner"
            for a in tree.ancestors[node, :tree.depth[node]].tolist():
                below[a] += len(members)
        assert below == lay.inner, f"{tenant}: inner counts are not exact"
        assert all(c > cfg.merge_below for c in lay.inner.values()), "a small inner node was not merged"
        nodes = np.asarray(list(lay.lists) + list(lay.inner), np.int64)
        assert not len(nodes) or index.trees.bloom.contains(nodes, lay.key).all(), "a filter misses a tenant"


@pytest.fixture(scope="module")
def data():
    return tenant_data()


@pytest.fixture(scope="module")
def built(data):
    ids, x, _, names = data
    return build(ids, x, names), exact_index(ids, x, names)


@pytest.mark.parametrize("tenant", ["t0", "t1", "t4", "t11", None])
def test_recall_per_tenant_against_exact_filtered_search(built, data, tenant):
    index, flat = built
    _, _, q, _ = data
    truth = flat.search(q, 10, tenant=tenant).ids
    assert recall(index.search(q, 10, tenant=tenant).ids, truth) >= 0.9
    found = index.search(q, 10, tenant=tenant, params=EXACT)
    assert recall(found.ids, truth) == 1.0
    np.testing.assert_allclose(found.scores, flat.search(q, 10, tenant=tenant).scores, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("tenant", ["t0", "t3", "t11", None])
def test_one_query_at_a_time_matches_the_batch_and_stays_visible(built, data, tenant):
    """Single queries take the heap path over the tenant's own nodes, batches `select_buckets`;
    at a budget that cuts the walk short both must pick the same buckets (the tenants here
    also see the public vectors, so their views join two sub-trees)."""
    index, _ = built
    ids, _, q, names = data
    small = SearchParams(candidate_budget=64)
    batch = index.search(q, 10, tenant=tenant, params=small).ids
    for i in range(len(q)):
        one = index.search(q[i:i + 1], 10, tenant=tenant, params=small).ids[0]
        assert set(one[one >= 0].tolist()) == set(batch[i][batch[i] >= 0].tolist())
    assert set(batch[batch >= 0].tolist()) <= visible_ids(ids, names, tenant)


def test_single_tenant_heap_path_without_public_vectors(data):
    ids, x, q, names = data
    private = [ns or ["t0"] for ns in names]  # no public vectors: a tenant's view is its own sub-tree
    index = build(ids, x, private)
    flat = exact_index(ids, x, private)
    for tenant in ("t0", "t5"):
        truth = flat.search(q, 10, tenant=tenant).ids
        for budget, floor in ((256, 0.6), (10**9, 1.0)):
            params = SearchParams(candidate_budget=budget)
            got = np.vstack([index.search(q[i:i + 1], 10, tenant=tenant, params=params).ids for i in range(len(q))])
            assert set(got[got >= 0].tolist()) <= visible_ids(ids, private, tenant)
            assert recall(got, truth) >= floor, (tenant, budget)
            np.testing.assert_array_equal(got, index.search(q, 10, tenant=tenant, params=params).ids)


def test_structure_has_split_tenants_and_exact_lists(built, data):
    index, _ = built
    ids, x, _, names = data
    tenants = [f"t{i}" for i in range(12)]
    visible = {t: {int(i) for i, ts in zip(ids, names) if t in ts} for t in tenants}
    visible[None] = visible_ids(ids, names, None)
    check_structure(index, visible, dict(zip(ids.tolist(), x)))
    assert index.layout("t0").inner, "the largest tenant should have been split below the root"
    assert len(index.layout("t11").lists) >= 1
    assert index.tenants() == {t: len(visible[t]) for t in sorted(tenants)}
    stats = index.stats()
    assert stats.count == len(ids) and stats.memory_bytes > x.nbytes


def test_no_result_outside_visibility_even_with_bloom_false_positives():
    ids, x, q, names = tenant_data(n=3000, tenants=60, seed=1)
    index = build(ids, x, names, bloom_bits=64, bloom_hashes=1)
    flat = exact_index(ids, x, names)
    tenants = [f"t{i}" for i in range(60)]
    lying = 0
    for tenant in tenants:
        lay = index.layout(tenant)
        outside = np.setdiff1d(np.arange(index.tree.n_nodes), list(lay.lists) + list(lay.inner))
        lying += int(index.trees.bloom.contains(outside, lay.key).sum())
    assert lying > 100, "64-bit filters over 61 keys must answer yes wrongly"
    for tenant in tenants[::3] + [None, "nobody"]:
        allowed = visible_ids(ids, names, tenant)
        for params in (None, EXACT, SearchParams(candidate_budget=8)):
            got = index.search(q, 10, tenant=tenant, params=params).ids
            assert set(got[got >= 0].tolist()) <= allowed, f"{tenant} saw an id it may not"
        truth = flat.search(q, 10, tenant=tenant).ids
        assert recall(index.search(q, 10, tenant=tenant, params=EXACT).ids, truth) == 1.0


def test_public_vectors_visible_to_all_and_unknown_tenant_sees_only_them(built, data):
    index, flat = built
    _, _, q, _ = data
    public = flat.search(q, 10, tenant=None).ids
    assert recall(index.search(q, 10, tenant="never-granted", params=EXACT).ids, public) == 1.0
    got = index.search(q, 10, tenant="t3").ids
    assert np.isin(public[:, 0], got).mean() > 0.5, "the nearest public vectors reach tenant searches"


def test_grant_revoke_delete_in_place(data):
    ids, x, _, names = data
    index = build(ids[:2000], x[:2000], names[:2000])
    target = int(next(i for i, ts in zip(ids[:2000], names[:2000]) if ts and "t7" not in ts))
    vec = x[np.flatnonzero(ids == target)[0]][None, :]
    assert target not in index.search(vec, 5, tenant="t7").ids
    assert index.grant([target], "t7") == 1 and index.grant([target], "t7") == 0
    assert index.search(vec, 1, tenant="t7").ids[0, 0] == target
    assert index.revoke([target], "t7") == 1
    assert target not in index.search(vec, 5, tenant="t7", params=EXACT).ids
    owner = names[int(np.flatnonzero(ids == target)[0])][0]
    assert index.search(vec, 1, tenant=owner).ids[0, 0] == target
    with pytest.raises(KeyError):
        index.grant([target, 10**12], "t7")
    assert target not in index.search(vec, 5, tenant="t7", params=EXACT).ids, "a failed grant changed things"
    assert index.remove(np.array([target])) == 1 and index.remove(np.array([target])) == 0
    for tenant in (owner, None, "t7"):
        assert target not in index.search(vec, 10, tenant=tenant, params=EXACT).ids
    assert len(index) == 1999


def test_revoking_the_last_tenant_never_makes_public(data):
    ids, x, _, _ = data
    index = build(ids[:300], x[:300], [["a"]] * 300)
    index.revoke(ids[:1], "a")
    for tenant in (None, "a", "b"):
        assert ids[0] not in index.search(x[:1], 10, tenant=tenant, params=EXACT).ids
    index.grant(ids[:1], "b")
    assert index.search(x[:1], 1, tenant="b").ids[0, 0] == ids[0]
    index.grant(ids[1:2], "b")  # granting on a public vector keeps it public
    public = build(ids[:50], x[:50], [[]] * 50)
    assert public.grant(ids[:1], "b") == 0 and public.search(x[:1], 1).ids[0, 0] == ids[0]


def test_filters_are_rebuilt_once_tenants_leave(data):
    ids, x, q, names = data
    index = build(ids, x, names)
    fill = index.trees.bloom.fill_ratio()
    kept = np.arange(len(ids)) % 10 == 0
    index.remove(ids[~kept])
    assert index.trees.stale == 0 and index.trees.bloom.fill_ratio() < fill, "the filters were not rebuilt"
    names_kept = [n for n, k in zip(names, kept) if k]
    visible = {f"t{i}": {int(j) for j, ts in zip(ids[kept], names_kept) if f"t{i}" in ts} for i in range(12)}
    visible[None] = visible_ids(ids[kept], names_kept, None)
    check_structure(index, visible, dict(zip(ids.tolist(), x)))
    flat = exact_index(ids[kept], x[kept], names_kept)
    for tenant in ("t0", "t7", None):
        truth = flat.search(q, 10, tenant=tenant).ids
        assert recall(index.search(q, 10, tenant=tenant, params=EXACT).ids, truth) == 1.0


def test_shortlist_splits_on_overflow_and_merges_when_shrinking(data):
    ids, x, _, _ = data
    index = build(ids, x, [["other"]] * len(ids), shortlist_limit=16, merge_ratio=0.5)
    solo = ids[:40]
    index.grant(solo[:16], "solo")
    assert list(index.layout("solo").lists) == [0] and not index.layout("solo").inner
    index.grant(solo[16:17], "solo")
    lay = index.layout("solo")
    assert lay.inner.get(0) == 17 and 0 not in lay.lists, "17 > 16 ids must split the root list"
    index.grant(solo[17:], "solo")
    assert index.layout("solo").inner[0] == 40
    index.revoke(solo[:32], "solo")
    lay = index.layout("solo")
    assert not lay.inner and set(lay.lists[0].tolist()) == set(solo[32:].tolist()), "8 <= 16/2 ids: one list"
    got = index.search(x[:40], 1, tenant="solo", params=EXACT).ids[:, 0]
    assert set(got.tolist()) <= set(solo[32:].tolist())


def test_pruning_keeps_buckets_near_the_nearest_of_their_level():
    walk = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    own = np.array([[9.0, 1.0, 2.0, 5.0, 1.0]])  # buckets 0-2 on one level, 3-4 on the next
    groups, sizes = np.array([0, 3]), np.array([10, 10, 10, 10, 10])
    keep = select_buckets(walk, own, groups, sizes, budget=1000, epsilon=0.5)  # ratio 2.25 on squares
    assert keep.tolist() == [[False, True, True, False, True]]
    assert select_buckets(walk, own, groups, sizes, budget=25, epsilon=float("inf")).tolist() == \
        [[True, True, True, False, False]], "the walk stops once the budget is collected"


def test_allowed_ids_filter_inside_the_scan(built, data):
    index, flat = built
    ids, _, q, _ = data
    allowed = ids[::5]
    got = index.search(q, 10, tenant="t0", params=EXACT, allowed_ids=allowed).ids
    assert np.isin(got[got >= 0], allowed).all()
    assert recall(got, flat.search(q, 10, tenant="t0", allowed_ids=allowed).ids) == 1.0


def test_more_tenants_than_a_narrow_table_holds():
    x = np.random.default_rng(3).standard_normal((33_000, 4)).astype(np.float32)
    ids = np.arange(len(x), dtype=np.int64)
    index = build(ids, x, [[f"u{i}"] for i in range(len(x))])
    for i in (0, 32_766, 32_767, 32_999):
        got = index.search(x[i:i + 1], 3, tenant=f"u{i}").ids[0]
        assert got[0] == i and (got[1:] == -1).all()
    assert len(index.tenants()) == len(x)


def test_upsert_replaces_vector_and_tenants(data):
    ids, x, _, _ = data
    index = build(ids[:500], x[:500], [["a"]] * 500)
    index.add(ids[:1], x[400:401], [["b"]])
    assert len(index) == 500
    assert index.search(x[400:401], 1, tenant="b").ids[0, 0] == ids[0]
    assert ids[0] not in index.search(x[:1], 10, tenant="a", params=EXACT).ids


def test_save_load_round_trip(tmp_path, built, data):
    index, _ = built
    _, _, q, _ = data
    index.save(tmp_path / "c")
    again = load_index("curator", tmp_path / "c")
    for tenant in ("t0", "t5", None):
        a, b = index.search(q, 10, tenant=tenant), again.search(q, 10, tenant=tenant)
        np.testing.assert_array_equal(a.ids, b.ids)
        assert index.layout(tenant).inner == again.layout(tenant).inner
    assert again.tenants() == index.tenants() and len(again) == len(index)
    assert again.stats().disk_bytes > 0 and again.config == index.config


def test_inner_product_metric(data):
    ids, x, q, names = data
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    index, flat = build(ids, xn, names, metric="ip"), exact_index(ids, xn, names, metric="ip")
    truth = flat.search(q, 10, tenant="t2").ids
    assert recall(index.search(q, 10, tenant="t2", params=EXACT).ids, truth) == 1.0


@pytest.mark.parametrize("field,value", [
    ("branching", 1), ("leaf_size", 0), ("max_depth", -1), ("shortlist_limit", 0), ("merge_ratio", 1.5),
    ("bloom_bits", 100), ("bloom_hashes", 0), ("candidate_budget", 0), ("prune_epsilon", -1.0),
    ("train_sample", 0), ("balance_slack", 0.5)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        CuratorConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        validate_params("curator", {field: value})


def test_bad_input_is_refused_and_changes_nothing(data):
    ids, x, _, _ = data
    index = build(ids[:100], x[:100], [["a"]] * 100)
    with pytest.raises(ValueError, match="not the string"):
        index.add(ids[100:101], x[100:101], ["a"])
    with pytest.raises(ValueError, match="unique"):
        index.add(np.array([1, 1]), x[:2])
    with pytest.raises(ValueError, match="shape"):
        index.add(ids[100:101], x[100:101, :3])
    with pytest.raises(ValueError, match="candidate_budget"):
        index.search(x[:1], 1, params=SearchParams(candidate_budget=0))
    assert len(index) == 100


_RNG = np.random.default_rng(7)
_CENTRES = _RNG.standard_normal((12, 8)).astype(np.float32) * 3
POOL_X = (_CENTRES[np.arange(120) % 12] + _RNG.standard_normal((120, 8))).astype(np.float32)
POOL_Q = (_CENTRES[:6] + _RNG.standard_normal((6, 8))).astype(np.float32)
NAMES = ["a", "b", "c", "d"]


class CuratorMachine(RuleBasedStateMachine):
    """Random adds, removes, grants, revokes and searches across tenants, against a model."""

    @initialize()
    def start(self):
        self.index = CuratorIndex(8, "l2", leaf_size=8, branching=4, shortlist_limit=6, merge_ratio=0.5,
                                  bloom_bits=64, bloom_hashes=2, candidate_budget=60)
        self.index.train(POOL_X)
        self.model: dict[int, set[str] | None] = {}  # None: public

    def visible(self, tenant: str | None) -> set[int]:
        return {i for i, ts in self.model.items() if ts is None or (tenant is not None and tenant in ts)}

    @rule(picks=st.lists(st.tuples(st.integers(0, len(POOL_X) - 1),
                                   st.sets(st.sampled_from(NAMES), max_size=3)),
                         min_size=1, max_size=20, unique_by=lambda p: p[0]))
    def add(self, picks):
        ids = np.array([i for i, _ in picks], np.int64)
        self.index.add(ids, POOL_X[ids], [sorted(ts) for _, ts in picks])
        for i, ts in picks:
            self.model[i] = set(ts) or None

    @rule(data=st.data())
    def remove(self, data):
        ids = data.draw(st.lists(st.integers(0, len(POOL_X) - 1), max_size=15))
        assert self.index.remove(np.array(ids, np.int64)) == len(set(ids) & set(self.model))
        for i in ids:
            self.model.pop(i, None)

    @rule(data=st.data(), tenant=st.sampled_from(NAMES), grant=st.booleans())
    def access(self, data, tenant, grant):
        if not self.model:
            return
        ids = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=15))
        changed = (self.index.grant if grant else self.index.revoke)(np.array(ids, np.int64), tenant)
        expect = 0
        for i in set(ids):
            ts = self.model[i]
            if ts is not None and (tenant in ts) != grant:
                (ts.add if grant else ts.discard)(tenant)
                expect += 1
        assert changed == expect

    @rule(tenant=st.sampled_from(NAMES + [None, "zz"]), k=st.integers(1, 12))
    def search(self, tenant, k):
        allowed = self.visible(tenant)
        ids = np.array(sorted(allowed), np.int64)
        for params in (None, EXACT):
            got = self.index.search(POOL_Q, k, tenant=tenant, params=params)
            for row in got.ids:
                row = row[row >= 0]
                assert set(row.tolist()) <= allowed and len(set(row.tolist())) == len(row)
        if not len(ids):
            return
        d = ((POOL_Q[:, None, :] - POOL_X[ids][None, :, :]) ** 2).sum(-1)
        truth = ids[np.argsort(d, axis=1, kind="stable")[:, :k]]
        exact = self.index.search(POOL_Q, k, tenant=tenant, params=EXACT)
        np.testing.assert_allclose(-exact.scores[:, :len(ids)], np.sort(d, axis=1)[:, :k], rtol=1e-4,
                                   atol=1e-4)
        assert recall(self.index.search(POOL_Q, k, tenant=tenant).ids, truth) >= 0.8

    @invariant()
    def structure(self):
        assert len(self.index) == len(self.model)
        tenants = {t: self.visible(t) - self.visible(None) for t in NAMES}
        assert self.index.tenants() == {t: len(v) for t, v in tenants.items() if v}
        check_structure(self.index, {**tenants, None: self.visible(None)}, dict(enumerate(POOL_X)))


CuratorMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestCuratorMachine = CuratorMachine.TestCase
