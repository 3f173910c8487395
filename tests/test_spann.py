"""SPANN against exact search on seeded data: recall, replicas, pruning, updates, crashes."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from index import SearchParams, create_index, load_index
from index.spann import SpannConfig

ROOT = Path(__file__).resolve().parents[1]


def clustered(n: int, d: int = 32, centers: int = 200, seed: int = 0, q: int = 200):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32) * 2
    x = c[rng.integers(0, centers, n)] + rng.standard_normal((n, d)).astype(np.float32)
    qs = c[rng.integers(0, centers, q)] + rng.standard_normal((q, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    return x.astype(np.float32), qs.astype(np.float32)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(found, truth)]))


def exact(ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int = 10) -> np.ndarray:
    flat = create_index("flat", x.shape[1])
    flat.add(ids, x)
    return flat.search(q, k).ids


def build(ids, x, **cfg):
    ix = create_index("spann", x.shape[1], "ip", **cfg)
    ix.train(x[::4])
    for s in range(0, len(x), 5000):
        ix.add(ids[s:s + 5000], x[s:s + 5000])
    ix.search(x[:1], 1)  # the first search seals the bulk-staged lists; later adds update in place
    return ix


@pytest.fixture(scope="module")
def data():
    x, q = clustered(30_000)
    ids = np.arange(len(x), dtype=np.int64) * 3 + 1
    return ids, x, q, exact(ids, x, q)


@pytest.fixture(scope="module")
def index(data):
    ids, x, _, _ = data
    return build(ids, x)


def test_recall_against_exact_search(index, data):
    _, _, q, truth = data
    assert recall(index.search(q, 10).ids, truth) >= 0.95
    narrow = index.search(q, 10, params=SearchParams(prune_epsilon=0.0, nprobe=2)).ids
    assert recall(narrow, truth) < recall(index.search(q, 10).ids, truth) + 1e-9


def test_replicas_are_never_returned_twice(index, data):
    _, _, q, _ = data
    res = index.search(q, 50, params=SearchParams(prune_epsilon=2.0, nprobe=64))
    for row in res.ids:
        row = row[row >= 0]
        assert len(row) == len(set(row.tolist()))
    assert (np.diff(res.scores, axis=1)[res.ids[:, 1:] >= 0] <= 1e-6).all()  # sorted best first


def test_a_batch_scores_as_its_queries_one_at_a_time(index, data):
    """The list-major scan shares lists between a chunk's queries: that must not change what
    each query gets (several chunks: a small query chunk forces them)."""
    _, _, q, _ = data
    params = SearchParams(prune_epsilon=1.0, nprobe=12)
    index.QUERY_CHUNK = 37
    try:
        batch = index.search(q, 10, params=params)
    finally:
        del index.QUERY_CHUNK
    for i in range(0, len(q), 17):
        one = index.search(q[i:i + 1], 10, params=params)
        assert (one.ids[0] == batch.ids[i]).all()
        np.testing.assert_allclose(one.scores[0], batch.scores[i], rtol=1e-5, atol=1e-5)


def test_l2_scores_are_minus_squared_distances(data):
    ids, x, q, _ = data
    ix = create_index("spann", x.shape[1], "l2")
    ix.train(x[:5000:2])
    ix.add(ids[:5000], x[:5000])
    res = ix.search(q[:20], 5)
    pos = {int(i): n for n, i in enumerate(ids[:5000])}
    for row_ids, row_scores, query in zip(res.ids, res.scores, q[:20]):
        want = -((x[[pos[int(i)] for i in row_ids]] - query) ** 2).sum(1)
        np.testing.assert_allclose(row_scores, want, rtol=1e-4, atol=1e-5)


def test_closure_replication_and_the_rng_rule(data):
    ids, x, _, _ = data
    wide = build(ids[:8000], x[:8000], closure_epsilon=10.0, rng_factor=1e9)
    sizes = np.array([len(h) for h in wide._assign(x[:300])])
    assert (sizes == wide.config.replicas).all()  # rule off, closure wide: every replica taken
    strict = build(ids[:8000], x[:8000], closure_epsilon=10.0, rng_factor=1.0)
    for v, heads in zip(x[:300], strict._assign(x[:300])):
        assert 1 <= len(heads) <= strict.config.replicas
        hv = strict.heads.vectors[heads]
        to_x = ((hv - v) ** 2).sum(1)
        for j in range(1, len(heads)):  # no chosen head lies in the direction of an earlier one
            between = ((hv[:j] - hv[j]) ** 2).sum(1)
            assert (between >= to_x[j] - 1e-5).all()
    tight = build(ids[:8000], x[:8000], closure_epsilon=0.0, rng_factor=1e9)
    assert all(len(h) <= 2 for h in tight._assign(x[:300]))  # only (near-)ties with the nearest head


def test_pruning_is_monotone(index, data):
    _, _, q, _ = data
    previous = None
    for eps in [0.0, 0.1, 0.3, 0.6, 1.5]:
        lists = index.probe_lists(q, SearchParams(prune_epsilon=eps))
        if previous is not None:
            assert all(set(a.tolist()) <= set(b.tolist()) for a, b in zip(previous, lists))
        previous = lists
    capped = index.probe_lists(q, SearchParams(prune_epsilon=5.0, nprobe=3))
    assert max(len(p) for p in capped) <= 3


def test_updates_keep_recall_close_to_a_fresh_build_and_hide_deleted_ids(data):
    ids, x, q, _ = data
    n0 = int(len(x) / 1.2)  # build on 5/6, insert the rest (20% of the initial size)
    ix = build(ids[:n0], x[:n0], max_posting=64)
    heads_before = ix.heads.count
    for s in range(n0, len(x), 1000):
        ix.add(ids[s:s + 1000], x[s:s + 1000])
    assert ix.heads.count > heads_before  # lists grew past max_posting and split
    rng = np.random.default_rng(1)
    deleted = rng.choice(ids, size=len(ids) // 10, replace=False)
    ix.remove(deleted)
    keep = ~np.isin(ids, deleted)
    truth = exact(ids[keep], x[keep], q)
    updated = ix.search(q, 10)
    assert not np.isin(updated.ids, deleted).any()
    fresh = build(ids[keep], x[keep], max_posting=64)
    r_updated, r_fresh = recall(updated.ids, truth), recall(fresh.search(q, 10).ids, truth)
    assert r_updated >= r_fresh - 0.02, (r_updated, r_fresh)
    ix.compact()  # drops tombstones and stale replicas from the lists
    assert not ix._deleted
    from index import postings
    for h in ix.store.keys():
        p = postings.decode(ix.store.get_many([h])[0], ix.dim)
        assert ix._valid(p).all() and not np.isin(p.ids, deleted).any()
        assert len(p) >= ix.config.min_posting
    assert not np.isin(ix.search(q, 10).ids, deleted).any()
    assert recall(ix.search(q, 10).ids, truth) >= r_fresh - 0.02


def test_reinserted_id_moves_and_old_replicas_go_stale(data):
    ids, x, q, _ = data
    ix = build(ids[:5000], x[:5000])
    ix.add(ids[:1], q[:1])  # id 1 now holds the first query's vector
    res = ix.search(q[:1], 3)
    assert res.ids[0, 0] == ids[0]
    old = ix.search(x[:1], 10).ids[0]
    assert ids[0] not in old.tolist() or np.isclose(x[0] @ q[0], 1.0)


def test_search_while_updating_never_errors(data):
    ids, x, q, _ = data
    ix = build(ids[:10_000], x[:10_000], max_posting=120)
    errors = []

    def searcher():
        try:
            for _ in range(30):
                r = ix.search(q[:20], 10)
                assert (r.ids[:, 0] >= 0).all()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    for s in range(10_000, 16_000, 500):
        ix.add(ids[s:s + 500], x[s:s + 500])
        ix.remove(ids[s - 10_000:s - 9_900])
    for t in threads:
        t.join()
    assert not errors


def test_save_and_load_roundtrip(tmp_path, index, data):
    _, _, q, _ = data
    index.save(tmp_path / "ix")
    loaded = load_index("spann", tmp_path / "ix")
    np.testing.assert_array_equal(loaded.search(q, 10).ids, index.search(q, 10).ids)
    assert loaded.stats().memory_bytes < 0.2 * data[1].nbytes


def test_config_is_validated():
    with pytest.raises(ValueError, match="replicas"):
        SpannConfig(replicas=0)
    with pytest.raises(ValueError, match="prune_epsilon"):
        SpannConfig(prune_epsilon=-1)


def test_datastore_on_spann_replays_acknowledged_writes_after_sigkill(tmp_path, caplog):
    """Killed between saves while upserts split lists and deletes land: the reopen loads the
    saved index and replays the shard's log (no rebuild), keeping every acknowledged write."""
    import logging

    from datastore.build import BuildConfig, build as build_ds
    from datastore.store import open_datastore

    x, _ = clustered(3000, d=16)
    np.save(tmp_path / "v.npy", x)
    (tmp_path / "p.jsonl").write_text("".join(f'{{"text": "p{i}"}}\n' for i in range(len(x))))
    out = tmp_path / "ds"
    build_ds(BuildConfig([str(tmp_path / "p.jsonl")], out, embeddings=tmp_path / "v.npy", shards=2,
                         index_kind="spann", index_params={"max_posting": 64}, progress=False))
    with open_datastore(out) as ds:
        heads_built = sum(ix.stats().extra["heads"] for ix in ds.indexes)
    script = (
        "import os, sys, numpy as np\n"
        "from datastore.store import open_datastore\n"
        "from datastore.records import Passage\n"
        f"ds = open_datastore({str(out)!r})\n"
        "rng = np.random.default_rng(5)\n"
        "for n in range(40):\n"
        "    v = rng.standard_normal((5, 16)).astype(np.float32)\n"
        "    v /= np.linalg.norm(v, axis=1, keepdims=True)\n"
        "    ids = ds.upsert([Passage(-1, f'new{n}-{j}') for j in range(5)], v)\n"
        "    ds.delete([3 * n, 3 * n + 1])\n"
        "    print(' '.join(map(str, ids)), flush=True)\n"
        "    if n == 25:\n"
        "        print('heads', sum(ix.stats().extra['heads'] for ix in ds.indexes), flush=True)\n"
        "        os.kill(os.getpid(), 9)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == -9, r.stderr
    lines = r.stdout.splitlines()
    heads_at_kill = int(lines[-1].split()[1])
    assert heads_at_kill > heads_built  # the upserts split lists after the last save
    acked = [int(i) for line in lines[:-1] for i in line.split()]
    assert len(acked) == 26 * 5
    deleted = [i for n in range(26) for i in (3 * n, 3 * n + 1)]
    rng = np.random.default_rng(5)
    vectors = np.concatenate([rng.standard_normal((5, 16)).astype(np.float32) for _ in range(26)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with caplog.at_level(logging.INFO, logger="datastore.indexing"):
        ds = open_datastore(out)
    with ds:
        opened = [rec.getMessage() for rec in caplog.records]
        assert sum("replayed" in m for m in opened) == 2, opened
        assert not any("rebuilt" in m for m in opened), opened
        # the splits made before the kill are still there: the index was not rebuilt
        assert sum(ix.stats().extra["heads"] for ix in ds.indexes) >= heads_at_kill
        found = ds.search_vectors(vectors, 1, params=SearchParams(prune_epsilon=1.0)).ids[:, 0]
        assert (found == np.array(acked)).mean() >= 0.95
        assert len(ds.get_passages(acked)) == len(acked)
        hits = ds.search_vectors(x[deleted], 10, params=SearchParams(prune_epsilon=1.0)).ids
        assert not set(hits.ravel().tolist()) & set(deleted)
        survivors = [i for i in range(200) if i not in set(deleted)]
        own = ds.search_vectors(x[survivors], 1, params=SearchParams(prune_epsilon=1.0)).ids[:, 0]
        assert (own == np.array(survivors)).mean() >= 0.95


def _self_recall(ix, x: np.ndarray, ids: np.ndarray) -> float:
    found = ix.search(x, 1, params=SearchParams(prune_epsilon=1.0, nprobe=16)).ids[:, 0]
    return float((found == ids).mean())


def _private_store(d: Path):
    from index.storage import LmdbBlobStore
    return LmdbBlobStore.open(d / "postings")


def test_replay_onto_an_index_saved_empty_keeps_every_id(tmp_path):
    """An index saved before any vector (a shard empty at its save) gets the replay's
    remove-then-add: the adds are staged, and must not stay hidden by the removes'
    tombstones; an id staged twice keeps only its last vector."""
    from index.spann import SpannIndex

    x, _ = clustered(600, d=16)
    store = _private_store(tmp_path)
    SpannIndex(16, "ip", storage=store).save(tmp_path)
    ix = SpannIndex.load(tmp_path, storage=store)
    ids = np.arange(len(x))
    ix.remove(ids)
    ix.add(ids, x)
    ix.add(ids[:50], -x[:50])  # ids 0-49 move to opposite vectors before the seal
    old = ix.search(x[:50], 1, params=SearchParams(prune_epsilon=1.0, nprobe=16)).ids[:, 0]
    assert not (old == ids[:50]).any()  # their first vectors are gone
    assert _self_recall(ix, -x[:50], ids[:50]) >= 0.95
    assert _self_recall(ix, x[50:], ids[50:]) >= 0.95
    assert len(ix) == len(x) and ix.stats().extra["tombstones"] == 0
    ix.save(tmp_path)
    again = SpannIndex.load(tmp_path, storage=store)
    assert _self_recall(again, x[50:], ids[50:]) >= 0.95 and again.stats().extra["tombstones"] == 0


def test_recover_recomputes_list_summaries_for_lists_split_after_the_save(tmp_path):
    """Public vectors saved, then inserts split lists before a crash: the reopened index
    must still probe the new lists once a restricted id appears (a grant replayed)."""
    from index.spann import SpannIndex

    x, _ = clustered(4000, d=16)
    store = _private_store(tmp_path)
    ix = SpannIndex(16, "ip", storage=store, max_posting=48, replicas=1)  # one list per vector
    ix.train(x[:2000])
    ix.add(np.arange(2000), x[:2000])
    ix.save(tmp_path)
    heads_saved = ix.stats().extra["heads"]
    ix.add(np.arange(2000, 4000), x[2000:])  # splits lists; no save: the process "dies" here
    assert ix.stats().extra["heads"] > heads_saved
    reopened = SpannIndex.load(tmp_path, storage=store)
    assert reopened.stats().extra["heads"] > heads_saved  # the splits are on disk with their heads
    reopened.recover()
    reopened.add(np.array([4000]), x[:1] + 0.01, tenants=[["acme"]])
    assert _self_recall(reopened, x, np.arange(4000)) >= 0.95


def test_an_index_saved_in_the_older_file_format_keeps_its_heads_and_tombstones(tmp_path):
    """Saves that kept heads and versions in spann.npz: the first save after loading one
    writes them into LMDB before the file goes."""
    from index.spann import SpannIndex

    x, _ = clustered(3000, d=16)
    store = _private_store(tmp_path)
    ix = SpannIndex(16, "ip", storage=store, max_posting=48)
    ix.state = None  # as an older version wrote it: lists in LMDB, the rest in files
    ix.train(x)
    ix.add(np.arange(3000), x)
    ix.add(np.arange(100), x[:100])  # versions above 0
    ix.remove(np.arange(100, 200))
    ix.save(tmp_path)
    assert (tmp_path / "spann.npz").exists()
    saved = json.loads((tmp_path / "spann.json").read_text())  # with config fields since retired
    saved["config"].update(hnsw_threshold=20_000, hnsw_m=32, fetch_threads=1)
    (tmp_path / "spann.json").write_text(json.dumps(saved))
    old = SpannIndex.load(tmp_path, storage=store)
    assert not old.replayable
    old.remove(np.array([300]))
    old.save(tmp_path)
    assert not (tmp_path / "spann.npz").exists()
    new = SpannIndex.load(tmp_path, storage=store)
    assert new.replayable and new.stats().extra["heads"] == ix.stats().extra["heads"]
    assert new.stats().extra["tombstones"] == 101
    keep = np.setdiff1d(np.arange(3000), np.r_[100:200, 300])
    assert _self_recall(new, x[keep], keep) >= 0.95
    hits = new.search(x[np.r_[100:200, 300]], 10, params=SearchParams(prune_epsilon=1.0, nprobe=16)).ids
    assert not set(hits.ravel().tolist()) & (set(range(100, 200)) | {300})


def test_heads_are_capped_by_the_training_sample():
    """head_ratio x N heads from too small a sample would be placed on noise: at most
    train_sample / sample_per_head heads are chosen."""
    x, _ = clustered(6000, d=16)
    ix = create_index("spann", 16, "ip", head_ratio=0.2, train_sample=1000, sample_per_head=20)
    ix.train(x)
    ix.add(np.arange(len(x)), x)
    ix.search(x[:1], 1)  # seals
    assert 25 <= ix.stats().extra["heads"] <= 75  # 1000 / 20 = 50 wanted, not 0.2 x 6000
    assert _self_recall(ix, x[:500], np.arange(500)) >= 0.95


def test_the_bulk_build_caps_every_list_and_keeps_each_vector_in_its_nearest_list():
    """With replication unbounded (every vector to its 8 nearest heads, no RNG pruning),
    lists are cut to max_posting as the seal folds them in spill by spill, but never below
    their primary entries: each vector stays in its nearest head's list."""
    from index import postings
    x, _ = clustered(8000, d=16, centers=40)
    ids = np.arange(len(x), dtype=np.int64)
    ix = create_index("spann", 16, "ip", head_ratio=0.01, max_posting=300, closure_epsilon=50.0,
                      rng_factor=1e9, stage_bytes=40_000)  # many spills: each list arrives in parts
    ix.train(x)
    ix.add(ids, x)
    ix.search(x[:1], 1)  # seals
    _, nearest = ix.heads.search(x, 1)
    lists = {h: postings.decode(ix.store.get_many([h])[0], ix.dim) for h in ix.store.keys()}
    longest = max(len(p) for p in lists.values())
    assert longest <= max(300, int(np.bincount(nearest[:, 0]).max()))
    for h, p in lists.items():
        own = ids[nearest[:, 0] == h]
        assert np.isin(own, p.ids).all(), h
    assert sum(len(p) for p in lists.values()) > 1.5 * len(x)  # replicas were kept where room was left
