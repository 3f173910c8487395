"""Binary-coded SPANN: lists of BEBR codes scanned by SDC, reranked with floats read by id.

Float and binary indexes are built with the same seed on the same data, so they choose the
same heads and the same lists: what differs is only what a list entry holds.
"""

import json

import faiss
import numpy as np
import pytest
from test_spann import clustered, exact, recall

from index import SearchParams, create_index, load_index
from index import postings as codec

CODES = {"codes": "binary", "code_epochs": 1, "code_train_sample": 2000}


@pytest.fixture(autouse=True, scope="module")
def one_omp_thread():
    """faiss on small problems spins badly when its threads share busy cores."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def build(ids, x, **cfg):
    ix = create_index("spann", x.shape[1], "ip", **cfg)
    ix.train(x[::4])
    ix.add(ids, x)
    ix.search(x[:1], 1)
    return ix


@pytest.fixture(scope="module")
def data():
    x, q = clustered(16_000, d=32, centers=160)
    ids = np.arange(len(x), dtype=np.int64) * 5 + 2
    return ids, x, q[:100], exact(ids, x, q[:100])


@pytest.fixture(scope="module")
def pair(data):
    ids, x, _, _ = data
    return build(ids, x), build(ids, x, **CODES)


def per_query_reads(ix, queries, params):
    """(posting bytes, rerank bytes, rerank vectors) read per query, one query at a time."""
    lists, floats = ix.store.read_stats(), ix.floats.store.read_stats() if ix.floats else None
    for row in queries:
        ix.search(row[None], 10, params=params)
    posting = (ix.store.read_stats() - lists).bytes / len(queries)
    if floats is None:
        return posting, 0.0, 0.0
    got = ix.floats.store.read_stats() - floats
    return posting, got.bytes / len(queries), got.reads / len(queries)


def test_lists_hold_codes_and_rerank_reaches_flat_recall(pair, data):
    _, binary = pair
    _, _, q, truth = data
    h = binary.store.keys()[0]
    p = codec.decode(binary.store.get_many([h])[0], binary._width)
    assert p.vectors.dtype == np.uint64 and p.vectors.shape[1] == binary.rows.bits * binary.rows.words
    assert recall(binary.search(q, 10).ids, truth) >= 0.95
    # without enough candidates the codes alone decide: the rerank is what lifts recall
    assert recall(binary.search(q, 10, params=SearchParams(oversample=1)).ids, truth) < \
        recall(binary.search(q, 10).ids, truth)


def test_codes_read_fewer_bytes_than_floats_at_the_same_probe(pair, data):
    flt, binary = pair
    _, _, q, _ = data
    for params in (SearchParams(nprobe=8), SearchParams(nprobe=32, prune_epsilon=1.0)):
        f_post, _, _ = per_query_reads(flt, q[:30], params)
        b_post, b_rerank, b_vectors = per_query_reads(binary, q[:30], params)
        entry_ratio = binary.stats().extra["entry_bytes"] / flt.stats().extra["entry_bytes"]
        assert abs(b_post / f_post - entry_ratio) < 0.02  # the same lists, each smaller by the code ratio
        assert b_vectors <= 10 * binary.config.oversample  # the rerank reads k x oversample vectors at most
        assert b_post + b_rerank < 0.75 * f_post  # at 32 dims; the saving grows with the dim


def test_updates_splits_and_deletes_on_codes(data):
    ids, x, q, _ = data
    ids, x = ids[:10_000], x[:10_000]
    n0 = 7_000
    ix = build(ids[:n0], x[:n0], max_posting=96, head_ratio=0.03, **CODES)
    heads = ix.heads.count
    for s in range(n0, len(x), 1000):  # splits cluster floats read back from the vectors database
        ix.add(ids[s:s + 1000], x[s:s + 1000])
    assert ix.heads.count > heads
    deleted = np.random.default_rng(1).choice(ids, len(ids) // 10, replace=False)
    ix.remove(deleted)
    keep = ~np.isin(ids, deleted)
    truth = exact(ids[keep], x[keep], q)
    got = ix.search(q, 10).ids
    assert not np.isin(got, deleted).any()
    assert recall(got, truth) >= 0.9
    ix.compact()
    got = ix.search(q, 10).ids
    assert not np.isin(got, deleted).any() and recall(got, truth) >= 0.9


def test_binary_index_roundtrips(tmp_path, pair, data):
    _, binary = pair
    _, _, q, _ = data
    binary.save(tmp_path / "ix")
    loaded = load_index("spann", tmp_path / "ix")
    np.testing.assert_array_equal(loaded.search(q, 10).ids, binary.search(q, 10).ids)
    assert loaded.stats().extra["codes"] == "binary"
    loaded.store.close()


def test_datastore_reranks_from_the_shards_vectors(tmp_path):
    from datastore.build import BuildConfig
    from datastore.build import build as build_ds
    from datastore.records import Passage
    from datastore.store import open_datastore

    x, q = clustered(3000, d=16, centers=40)
    np.save(tmp_path / "v.npy", x)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": f"p{i}"}) + "\n" for i in range(len(x))))
    out = tmp_path / "ds"
    build_ds(BuildConfig([str(tmp_path / "p.jsonl")], out, embeddings=tmp_path / "v.npy", shards=1,
                         index_kind="spann", index_params=CODES, progress=False))
    with open_datastore(out) as ds:
        ix = ds.indexes[0]
        assert ix.config.codes == "binary" and not ix._writes_floats  # the shard keeps the floats
        ids = ds.upsert([Passage(-1, f"new{j}") for j in range(5)], q[:5])
        assert ds.search_vectors(q[:5], 1).ids[:, 0].tolist() == ids
        own = ds.search_vectors(x[:50], 1).ids[:, 0]
        vecs = ds.shards[0].get_vectors(own.tolist())
        np.testing.assert_allclose((vecs * x[:50]).sum(1), 1.0, atol=2e-3)  # each finds itself
