"""Limits of a real server: malformed payloads, per-key concurrency and rate quotas with a
retry hint, the server's maximum deadline against stalled streams, stream and search sizes,
liveness apart from readiness, keys stored hashed, and no secret in logs or errors."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from datastore.errors import InvalidArgument, ResourceExhausted
from datastore.records import Passage
from service.client import DatastoreClient
from service.limits import ServiceLimits
from service.metrics import REGISTRY
from service.pb import datastore_pb2 as pb
from service.server import LIVENESS_NAME, ServerConfig, create_server, set_serving, stop_server

DIM = 384
ROOT = Path(__file__).resolve().parents[1]
SEARCH = "/datastore.v1.Datastore/Search"
UPSERT = "/datastore.v1.Datastore/Upsert"


def _ident(b: bytes) -> bytes:
    return b


def _vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _search_bytes(k: int = 3) -> bytes:
    return pb.SearchRequest(
        queries=[pb.Query(vector=pb.Vector(data=_vec(0).tobytes(), dim=DIM, encoding=1))], k=k
    ).SerializeToString()


@pytest.fixture
def serve(open_store):
    """serve(limits, **config) -> (address, channel) of a fresh server over the store."""
    started = []

    def start(limits: ServiceLimits | None = None, **kw):
        config = ServerConfig(
            max_workers=kw.pop("max_workers", 4), grace_seconds=0.2, limits=limits or ServiceLimits(), **kw
        )
        server, port = create_server(open_store, "127.0.0.1:0", config)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, config, channel))
        return f"127.0.0.1:{port}", channel, server

    yield start
    for server, config, channel in started:
        channel.close()
        stop_server(server, config)


def _stalled_upsert(channel, release: threading.Event, md=None, timeout=None):
    """An Upsert whose stream sends one item, then waits for `release`: a call in flight."""

    def items():
        yield pb.UpsertItem(
            passage=pb.Passage(text="held"), vector=pb.Vector(data=_vec(1).tobytes(), dim=DIM, encoding=1)
        ).SerializeToString()
        release.wait(30)

    return channel.stream_unary(UPSERT, _ident, _ident).future(items(), metadata=md, timeout=timeout)


def _refused_while_held(call) -> grpc.RpcError:
    """The error `call` gets once the held call is running on the server (it may take a
    moment to arrive there on a loaded machine); fails if calls keep succeeding for 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            call()
        except grpc.RpcError as e:
            return e
        time.sleep(0.1)
    raise AssertionError("calls were never refused while another call was held")


def _details(e: grpc.RpcError) -> dict[str, object]:
    out = {}
    for d in rpc_status.from_call(e).details:
        for cls in (error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo, error_details_pb2.Help):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out[cls.__name__] = msg
    return out


@pytest.mark.parametrize(
    "method,payload",
    [
        ("Search", b"\xff\xff\xff"),
        ("Delete", b"\x0a\x05\x80\x80"),
        ("CreateTenant", b"\x0a\x02\xc3\x28"),
        ("Stats", b"\x08"),
    ],
)
def test_malformed_payloads_are_invalid_argument_not_internal(serve, method, payload):
    _, channel, _ = serve()
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(f"/datastore.v1.Datastore/{method}", _ident, _ident)(payload, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert REGISTRY.get_sample_value("datastore_guard_refusals_total", {"reason": "malformed payload"}) >= 1
    with pytest.raises(grpc.RpcError) as e:  # one bad item in a stream
        channel.stream_unary(UPSERT, _ident, _ident)(iter([b"\x0a\x00", b"\xff\xff"]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_per_key_concurrency_refuses_the_extra_call_with_a_retry_hint(serve, open_store):
    open_store.create_tenant("acme")
    admin, _ = open_store.control.create_key(None)
    other, _ = open_store.control.create_key(None)
    _, channel, _ = serve(ServiceLimits(max_concurrent_per_key=1))
    md = (("authorization", f"Bearer {admin}"),)
    release = threading.Event()
    held = _stalled_upsert(channel, release, md)
    search = channel.unary_unary(SEARCH, _ident, _ident)
    e = _refused_while_held(lambda: search(_search_bytes(), metadata=md, timeout=10))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = _details(e)
    assert details["QuotaFailure"].violations[0].subject == "concurrent calls per key"
    assert details["RetryInfo"].retry_delay.ToNanoseconds() > 0
    assert admin.split("_")[2] not in e.details()
    search(_search_bytes(), metadata=(("authorization", f"Bearer {other}"),), timeout=10)  # another key: fine
    release.set()
    assert pb.UpsertResponse.FromString(held.result(timeout=30)).upserted == 1
    search(_search_bytes(), metadata=md, timeout=10)  # the slot is free again


def test_max_concurrent_rpcs_refuses_calls_beyond_it_at_once(serve):
    _, channel, _ = serve(max_concurrent_rpcs=1)
    release = threading.Event()
    held = _stalled_upsert(channel, release)

    def search() -> None:
        nonlocal held
        if held.done():  # a probe took the one slot first and the held call was refused: hold again
            held = _stalled_upsert(channel, release)
            time.sleep(0.2)
        channel.unary_unary(SEARCH, _ident, _ident)(_search_bytes(), timeout=10)

    t = time.monotonic()
    e = _refused_while_held(search)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t < 10
    release.set()
    held.result(timeout=30)
    assert channel.unary_unary(SEARCH, _ident, _ident)(_search_bytes(), timeout=10)


def test_per_key_rate_refuses_beyond_the_burst_then_recovers_after_the_hinted_delay(serve):
    address, _, _ = serve(ServiceLimits(rate_per_key=0.5, burst=2))
    with DatastoreClient(address) as c:  # keyless callers are limited per peer address
        c.search([_vec(0)], k=1)
        c.search([_vec(0)], k=1)
        with pytest.raises(ResourceExhausted) as e:
            c.search([_vec(0)], k=1)
        assert e.value.subject == "calls per second per key" and "retry after" in e.value.hint
        delay = float(re.search(r"retry after ([\d.]+) s", e.value.message).group(1))
        assert 0 < delay <= 2.0
        time.sleep(delay + 0.05)
        assert c.search([_vec(0)], k=1)


def test_health_checks_are_never_rate_limited(serve):
    _, channel, _ = serve(ServiceLimits(rate_per_key=1.0, burst=1))
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(20):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )


@pytest.mark.parametrize(
    "limits,says",
    [
        (ServiceLimits(max_deadline_seconds=1.0), "within the call's deadline"),
        (ServiceLimits(max_stream_idle_seconds=1.0), "sent nothing for 1 s"),
    ],
)
def test_a_stalled_stream_without_deadline_is_cut_by_the_server(serve, limits, says):
    # two workers: if stalled calls held them, the next calls could not run at all
    _, channel, _ = serve(limits, max_workers=2)
    release = threading.Event()
    t = time.monotonic()
    held = _stalled_upsert(channel, release)  # no client deadline
    with pytest.raises(grpc.RpcError) as e:
        held.result(timeout=20)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and says in e.value.details()
    assert time.monotonic() - t < 5
    release.set()
    search = channel.unary_unary(SEARCH, _ident, _ident)
    for _ in range(3):  # the worker threads are free again
        assert pb.SearchResponse.FromString(search(_search_bytes(), timeout=10)).results


def test_stream_bytes_above_the_limit_are_resource_exhausted_and_write_nothing(serve, open_store):
    address, _, _ = serve(ServiceLimits(max_stream_bytes=20_000))
    before = open_store.stats().passages
    with DatastoreClient(address) as c:
        with pytest.raises(ResourceExhausted) as e:
            c.upsert([Passage(-1, f"passage {i}") for i in range(20)], np.stack([_vec(i) for i in range(20)]))
        assert e.value.subject == "stream bytes"
        assert len(c.upsert([Passage(-1, "small")], _vec(3)[None])) == 1
    assert open_store.stats().passages == before + 1


def test_search_and_passage_size_limits(server):
    client, _, _ = server
    with pytest.raises(ResourceExhausted, match="results"):  # 200 queries x k 10,000 > 1,000,000
        client.search([_vec(0)] * 200, k=10_000)
    with pytest.raises(ResourceExhausted, match="nprobe"):
        from index import SearchParams

        client.search([_vec(0)] * 20, k=5, params=SearchParams(nprobe=2**31))
    with pytest.raises(ResourceExhausted, match="metadata"):
        client.upsert([Passage(-1, "x", metadata={f"k{i}": "v" for i in range(2_000)})], _vec(0)[None])
    with pytest.raises(ResourceExhausted, match="title"):
        client.upsert([Passage(-1, "x", "t" * 1_000_001)], _vec(0)[None])
    with pytest.raises(InvalidArgument, match="largest id a caller may choose"):
        client.upsert([Passage(2**63 - 1, "at the top")], _vec(0)[None])
    assert len(client.upsert([Passage(-1, "still room for new ids")], _vec(1)[None])) == 1


def test_liveness_stays_serving_while_readiness_flips(serve):
    _, channel, server = serve()
    health = health_pb2_grpc.HealthStub(channel)

    def status(name: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status

    set_serving(server, False)
    assert status("") == status("datastore.v1.Datastore") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert status(LIVENESS_NAME) == health_pb2.HealthCheckResponse.SERVING
    set_serving(server, True)
    assert status("") == health_pb2.HealthCheckResponse.SERVING


def test_keys_are_stored_hashed(open_store):
    key, info = open_store.control.create_key(None)
    secret = key.split("_", 2)[2]
    with open_store.control.env.begin() as txn:
        raw = b"".join(
            k + v
            for db in (open_store.control._keys, open_store.control._tenants)
            for k, v in txn.cursor(db=db)
        )
    assert secret.encode() not in raw and info.key_id.encode() in raw
    assert open_store.control.authenticate(key).key_id == info.key_id


def test_no_secret_in_logs_or_errors(serve, open_store, caplog):
    open_store.create_tenant("acme")
    admin, _ = open_store.control.create_key(None)
    acme, _ = open_store.control.create_key("acme")
    wrong = admin[:-4] + ("AAAA" if not admin.endswith("AAAA") else "BBBB")
    address, _, _ = serve(ServiceLimits(rate_per_key=50.0, burst=50))
    secrets = [k.split("_", 2)[2] for k in (admin, acme, wrong)]
    messages = []
    with caplog.at_level(logging.DEBUG):
        logging.getLogger().setLevel(logging.DEBUG)
        for key in (admin, acme, wrong, admin + "x"):
            with DatastoreClient(address, api_key=key) as c:
                for call in (
                    lambda: c.search([_vec(0)], k=3),
                    lambda: c.search([_vec(0)], k=0),
                    lambda: c.search(["x"], k=3, tenant="nobody"),
                    lambda: c.get_passages([10**12]),
                    lambda: c.upsert([Passage(-1, "x")], np.ones((1, 5), np.float32)),
                    lambda: c.create_tenant("bad name!"),
                    lambda: c.list_tenants(),
                ):
                    try:
                        call()
                    except Exception as e:  # noqa: BLE001  # every error the server sends back, as text
                        messages.append(f"{e!r} {getattr(e, 'hint', '')} {getattr(e, 'violations', '')}")
    text = caplog.text + "\n".join(messages)
    assert len(messages) >= 20  # errors came back
    assert any(
        "key:" + admin.split("_")[1] in r.getMessage() for r in caplog.records
    )  # calls logged by key id
    for secret in secrets:
        assert secret not in text


def test_serve_flags_set_the_limits(store_copy):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "datastore.cli",
            "serve",
            str(store_copy),
            "--port",
            "0",
            "--max-k",
            "5",
            "--key-rate",
            "0.2",
            "--key-burst",
            "2",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, proc.stderr.read()
        address = re.search(r"on ([\d.]+:\d+)", line).group(1)
        with DatastoreClient(address) as c:
            with pytest.raises(InvalidArgument, match="between 1 and 5"):
                c.search([_vec(0)], k=6)
            c.search([_vec(0)], k=5)
            with pytest.raises(ResourceExhausted):
                c.search([_vec(0)], k=5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
