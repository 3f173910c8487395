"""Binary codes across shards and embedding model versions, with two real encoders of the
same text: the datastore's MiniLM (old) and SIF-weighted mean GloVe 6B-50d (new).

The binary datastore is rebuilt from the session's built corpus (its passages and stored
MiniLM vectors, so nothing is re-embedded with MiniLM). Queries are questions about article
titles; a question is answered when a passage of its article is in the top 10.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from datastore import compat
from datastore.cli import main as cli_main
from datastore.errors import InvalidArgument
from datastore.indexing import open_index
from datastore.manifest import Manifest
from datastore.shard import Shard
from datastore.store import Datastore, open_datastore
from index import SearchParams, create_index

GLOVE = compat.GLOVE_MODEL
BITS = {"bits": 2, "epochs": 3, "train_sample": 4000}
K = 10
#: Store support for query_model (dims and encoders of compat models), see H6's report.
STORE_READY = hasattr(Datastore, "_query_encoder")
needs_store = pytest.mark.xfail(not STORE_READY, strict=True,
                                reason="datastore/store.py must embed and size queries by params.query_model")


def _passages_and_vectors(directory):
    m = Manifest.load(directory)
    passages, vectors = [], []
    for i, d in enumerate(m.shard_dirs):
        shard = Shard(directory / d, i, m.model.dim, m.vector_dtype, readonly=True)
        try:
            ps = list(shard.iter_passages())
            passages += ps
            vectors.append(shard.get_vectors([p.id for p in ps]))
        finally:
            shard.close()
    return passages, np.concatenate(vectors)


@pytest.fixture(scope="module")
def corpus(built_dir):
    """(passages, MiniLM vectors, GloVe vectors, questions, relevant rows per question)."""
    from bench.binary_compat import _title_of
    from bench.prepare import make_questions

    passages, old = _passages_and_vectors(built_dir)
    titles = [p.title for p in passages]
    questions = make_questions(titles, 40, seed=0)
    rows: dict[str, set[int]] = {}
    for i, t in enumerate(titles):
        rows.setdefault(t, set()).add(i)
    relevant = [rows[_title_of(q, rows)] for q in questions]
    new = compat.make_encoder(GLOVE).encode([p.embedding_input() for p in passages])
    return passages, old, new, questions, relevant


@pytest.fixture(scope="module")
def binary_dir(tmp_path_factory, corpus):
    """A two-shard binary datastore of the corpus (one record per passage, its MiniLM vector)."""
    from datastore.build import BuildConfig, build
    from datastore.dedup import DedupConfig

    passages, old, _, _, _ = corpus
    root = tmp_path_factory.mktemp("binary-compat")
    (root / "p.jsonl").write_text("".join(json.dumps({"title": p.title, "text": p.text}) + "\n" for p in passages))
    np.save(root / "v.npy", old)
    out = root / "ds"
    build(BuildConfig([str(root / "p.jsonl")], out, embeddings=root / "v.npy", shards=2, vector_dtype="float32",
                      index_kind="binary", index_params=BITS, dedup=DedupConfig(exact=False, near=False),
                      progress=False))
    return out


@pytest.fixture(scope="module")
def compat_dir(tmp_path_factory, binary_dir):
    """The binary datastore after `datastore compat add-model --model glove-6b-50d-mean`."""
    out = tmp_path_factory.mktemp("compat") / "ds"
    shutil.copytree(binary_dir, out)
    assert cli_main(["compat", "add-model", str(out), "--model", GLOVE, "--sample", "5000", "--held-out", "40",
                     "--epochs", "6"]) == 0
    return out


def _hit_rate(ids: np.ndarray, relevant: list[set[int]]) -> float:
    return float(np.mean([bool(set(row.tolist()) & r) for row, r in zip(ids, relevant)]))


def _fingerprints(directory) -> list[str]:
    m = Manifest.load(directory)
    out = []
    for i, d in enumerate(m.shard_dirs):
        shard = Shard(directory / d, i, m.model.dim, m.vector_dtype)
        try:
            out.append(open_index(shard, m.index).binarizer.fingerprint())
        finally:
            shard.close()
    return out


def test_unify_gives_every_shard_the_one_binarizer_and_search_still_finds_passages(tmp_path, binary_dir, corpus):
    _, old, _, _, _ = corpus
    d = tmp_path / "ds"
    shutil.copytree(binary_dir, d)
    assert cli_main(["compat", "unify", str(d)]) == 0
    record = compat.own_record(Manifest.load(d))
    assert record is not None and (d / record["file"]).exists()
    assert _fingerprints(d) == [record["fingerprint"]] * 2  # both shards: the shared binarizer's codes
    with open_datastore(d) as ds:
        found = ds.search_vectors(old[:50], 1, params=SearchParams(oversample=8)).ids[:, 0]
        texts = [p.text for p in ds.get_passages(found.tolist())]
    passages = corpus[0]
    assert np.mean([t == p.text for t, p in zip(texts, passages[:50])]) >= 0.9  # each vector finds its passage


def test_add_model_records_a_versioned_binarizer_trained_against_the_shared_one(compat_dir):
    m = Manifest.load(compat_dir)
    own = compat.own_record(m)
    [entry] = m.compat_models
    assert entry["name"] == GLOVE and entry["dim"] == 50 and entry["trained_against"] == own["fingerprint"]
    assert entry["binarizer"].startswith(compat.BINARIZER_DIR + "/") and entry["fingerprint"] in entry["binarizer"]
    assert (compat_dir / entry["binarizer"]).exists()
    # held-out passages, new-model codes against old codes: far above chance (10 / corpus size)
    assert entry["held_out"]["cross_version"] >= 0.15, entry["held_out"]
    assert _fingerprints(compat_dir) == [own["fingerprint"]] * 2


def _index_search(directory, queries: np.ndarray, params: SearchParams):
    """Merged top-K over the shards' indexes, opened and attached as a Datastore does."""
    from datastore.sharding import merge_topk

    m = Manifest.load(directory)
    shards = [Shard(directory / d, i, m.model.dim, m.vector_dtype) for i, d in enumerate(m.shard_dirs)]
    try:
        indexes = [open_index(s, m.index) for s in shards]
        compat.attach(directory, m, shards, indexes)
        return merge_topk([ix.search(queries, K, params=params) for ix in indexes], K)
    finally:
        for s in shards:
            s.close()


def _open_indexes(directory):
    """Shard 0's index and its binarizer over ALL passages' old codes: one index, re-filled."""
    m = Manifest.load(directory)
    own = compat.shared_binarizer(directory, m)
    passages, old = _passages_and_vectors(directory)
    ix = create_index("binary", m.model.dim, "ip", **BITS)
    ix.use_binarizer(own)
    ix.add(np.array([p.id for p in passages]), old)
    return ix


def test_new_model_queries_search_old_codes_about_as_well_as_same_version_codes(compat_dir, corpus):
    _, _, new, questions, relevant = corpus
    q_new = compat.make_encoder(GLOVE).encode(questions)
    # ids are assigned in passage order by the build: row i is id i
    cross = _hit_rate(_index_search(compat_dir, q_new, SearchParams(query_model=GLOVE)).ids, relevant)
    # same version: new-model queries on new-model codes of the same passages, trained the normal way
    same_ix = create_index("binary", 50, "ip", **BITS, code_dims=384)
    same_ix.train(new)
    same_ix.add(np.arange(len(new)), new)
    same = _hit_rate(same_ix.search(q_new, K).ids, relevant)
    # that normally trained new binarizer's codes of the queries, on the old codes: no alignment
    old_ix = _open_indexes(compat_dir)
    unaligned = _hit_rate(old_ix.search_codes(same_ix.binarizer.encode(q_new), K).ids, relevant)
    # A 100-passage corpus teaches the translator little: the gap to same-version is large here
    # (0.68 vs 0.90 measured); bench.binary_compat measures it on thousands of passages.
    assert cross >= 0.5 and cross >= unaligned + 0.3 and cross >= same - 0.35, (cross, same, unaligned)


def test_an_unknown_query_model_is_invalid_argument(compat_dir, corpus, encoder):
    with open_datastore(compat_dir, encoder_factory=lambda name: encoder) as ds, \
            pytest.raises(InvalidArgument, match="query_model"):
        ds.search_vectors(corpus[1][:1], K, params=SearchParams(query_model="no-such-model"))


@needs_store
def test_datastore_answers_text_and_vector_queries_of_the_new_model(compat_dir, corpus, encoder):
    _, _, _, questions, relevant = corpus
    params = SearchParams(query_model=GLOVE)
    with open_datastore(compat_dir, encoder_factory=lambda name: encoder) as ds:
        hits = ds.search(questions, K, params=params)
        vectors = ds.search_vectors(compat.make_encoder(GLOVE).encode(questions), K, params=params)
        own = ds.search(questions, K)  # the own model still answers as before
    ids = np.array([[h.id for h in row] + [-1] * (K - len(row)) for row in hits])
    np.testing.assert_array_equal(ids, vectors.ids)
    assert _hit_rate(ids, relevant) >= 0.3
    assert _hit_rate(np.array([[h.id for h in row] for row in own]), relevant) >= 0.8


@needs_store
def test_grpc_search_with_query_model(compat_dir, corpus, encoder):
    import grpc

    from service.client import DatastoreClient
    from service.pb import datastore_pb2 as pb
    from service.pb import datastore_pb2_grpc as pb_grpc
    from service.server import ServerConfig, create_server, stop_server

    _, _, _, questions, relevant = corpus
    with open_datastore(compat_dir, encoder_factory=lambda name: encoder) as ds:
        config = ServerConfig(max_workers=2, grace_seconds=0.5)
        srv, port = create_server(ds, "127.0.0.1:0", config)
        client = DatastoreClient(f"127.0.0.1:{port}", timeout=60)
        try:
            hits = client.search(questions[:20], K, params=SearchParams(query_model=GLOVE), include_text=False)
            ids = np.array([[h.id for h in row] + [-1] * (K - len(row)) for row in hits])
            assert _hit_rate(ids, relevant[:20]) >= 0.25
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as err:
                pb_grpc.DatastoreStub(channel).Search(pb.SearchRequest(  # on the wire: INVALID_ARGUMENT
                    queries=[pb.Query(text=questions[0])], k=K, params=pb.SearchParams(query_model="no-such-model")))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(InvalidArgument, match="query_model"):  # the client raises it as such
                client.search(questions[:1], K, params=SearchParams(query_model="no-such-model"))
            # a router embeds text queries once, with the model the query names
            from service.router import Router, RouterConfig

            router = Router(RouterConfig([[f"127.0.0.1:{port}"]]))
            try:
                routed = router.search(questions[:20], K, params=SearchParams(query_model=GLOVE), include_text=False)
                assert [[h.id for h in row] for row in routed] == [[h.id for h in row] for row in hits]
                with pytest.raises(InvalidArgument, match="query_model"):
                    router.search(questions[:1], K, params=SearchParams(query_model="no-such-model"))
            finally:
                router.close()
        finally:
            client.close()
            stop_server(srv, config)
