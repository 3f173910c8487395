"""Hypothesis-driven fuzzer over every RPC of datastore.v1.Datastore.

Each example is one call: a well-formed message with hostile values (huge batches and k,
wrong dims and encodings, NaN/inf, unicode edge cases, 1 MB strings, huge metadata,
invalid tenants, ids out of range, oversized streams), a mutated message, or raw random
bytes, sent through a generic channel with identity serializers so nothing is checked on
the client side. The invariants: every call returns within its deadline, with a status
code documented for its RPC (DESIGN.md Errors; INTERNAL, UNKNOWN and UNAVAILABLE are
failures), no error echoes the caller's key, and the server is healthy afterwards: the
health check says SERVING and a probe search answers exactly as before the fuzzing.

The fuzz never destroys the data the probe reads: ids of the original passages are not
deleted, overwritten or re-granted (a raw payload that would do so is sent corrupted
instead), and every passage the fuzz created is deleted at the end.

    python -m bench.fuzz --requests 10000 [--keys] [--seed 0]

builds a small datastore of the default corpus, serves it with `datastore serve` in a
subprocess (so a crash is a dead process, not a dead benchmark) and prints one JSON line.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from service.pb import datastore_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "/datastore.v1.Datastore/"
C = grpc.StatusCode
_COMMON = {
    C.OK,
    C.INVALID_ARGUMENT,
    C.RESOURCE_EXHAUSTED,
    C.UNAUTHENTICATED,
    C.PERMISSION_DENIED,
    C.DEADLINE_EXCEEDED,
}
_METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["Datastore"].methods}
#: The status codes each RPC may answer (DESIGN.md Errors); anything else is a failure. RPCs
#: added to the proto later are fuzzed with generic messages and this default set.
DEFAULT_ALLOWED = _COMMON | {C.NOT_FOUND, C.FAILED_PRECONDITION}
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    "Search": _COMMON | {C.NOT_FOUND},
    "GetPassages": _COMMON | {C.NOT_FOUND},
    "Upsert": _COMMON | {C.NOT_FOUND},
    "Delete": _COMMON,
    "Stats": _COMMON,
    "CreateTenant": _COMMON | {C.ALREADY_EXISTS},
    "DropTenant": _COMMON | {C.NOT_FOUND},
    "ListTenants": _COMMON,
    "Grant": _COMMON | {C.NOT_FOUND},
    "Revoke": _COMMON | {C.NOT_FOUND},
}
ALLOWED.update({name: DEFAULT_ALLOWED for name in _METHODS if name not in ALLOWED})
REQUEST_TYPES = {name: message_factory.GetMessageClass(m.input_type) for name, m in _METHODS.items()}
STREAMING = {name for name, m in _METHODS.items() if m.client_streaming}
U64 = 2**64 - 1
BOUNDARY_IDS = [2**62, 2**63 - 2, 2**63 - 1, 2**63, 2**64 - 1]


@dataclass
class Target:
    """The server under fuzz and what the fuzz must leave intact."""

    address: str
    dim: int
    #: Ids below this are the original passages the probe search reads: never mutated.
    protected_below: int
    #: Tenants that exist before the fuzz (never dropped by it).
    tenants: tuple[str, ...] = ()
    #: Keys by role ("admin", "tenant"); empty when the server has no keys.
    keys: dict[str, str] = field(default_factory=dict)
    deadline: float = 30.0
    #: Include the slow cases (65,537-item streams, 200,000-id lists): seconds each.
    heavy: bool = True


@dataclass(frozen=True)
class Case:
    method: str
    payload: bytes | tuple[bytes, ...]  # a tuple for the client-streaming Upsert
    auth: str  # which credentials travel: a role of Target.keys or a kind of bad key
    kind: str  # "message", "mutated" or "raw"


@dataclass
class Report:
    requests: int = 0
    by_code: Counter = field(default_factory=Counter)
    by_method: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    hangs: int = 0
    crashes: int = 0
    key_echoes: int = 0
    max_latency: float = 0.0
    created: set[int] = field(default_factory=set)
    seconds_by_method: Counter = field(default_factory=Counter)
    slowest: list[tuple[float, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "by_code": dict(self.by_code.most_common()),
            "by_method": dict(self.by_method.most_common()),
            "crashes": self.crashes,
            "hangs": self.hangs,
            "undocumented_codes": sum(1 for f in self.failures if f.startswith("undocumented")),
            "key_echoes": self.key_echoes,
            "max_latency_s": round(self.max_latency, 3),
            "seconds_by_method": {m: round(v, 1) for m, v in self.seconds_by_method.most_common()},
            "slowest": [f"{t:.2f}s {what}" for t, what in sorted(self.slowest, reverse=True)[:5]],
            "failures": _distinct(self.failures)[:20],
        }


def _distinct(failures: list[str]) -> list[str]:
    """The first two failures of each kind (what, method, code), so rare kinds show."""
    seen: Counter = Counter()
    out = []
    for f in failures:
        key = f.split(":")[0] + f.split(" (")[0]
        seen[key] += 1
        if seen[key] <= 2:
            out.append(f)
    return out


# -- strategies --------------------------------------------------------------------------------

_CHARS = st.characters(exclude_categories=("Cs",))  # proto strings are UTF-8: no lone surrogates
SPECIAL_TEXTS = [
    "",
    " ",
    "\t\n",
    "\x00",
    "a\x00b",
    "\u0301",
    "\u0301" * 64,
    "\u202eevil\u202c",
    "שלום עולם",
    "\u200b\u200c\u200d",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "🦄" * 16,
    "e\u0301" * 20,
    "%s%n%x",
    "'; DROP TABLE passages; --",
    "../../etc/passwd",
    "{" * 512,
    "[" * 2000 + "]" * 2000,
]


@st.composite
def texts(draw, big_percent: int = 2) -> str:
    """Mostly short arbitrary unicode, some edge cases, rarely ~1 MB (just under or over the
    1,000,000-char limit)."""
    roll = draw(st.integers(0, 99))
    if roll < big_percent:
        unit = draw(st.sampled_from(["a", "\u0301", "é", "🦄", " ", "\x00"]))
        return unit * draw(st.sampled_from([10_000, 999_999, 1_000_001]))
    if roll < 25:
        return draw(st.sampled_from(SPECIAL_TEXTS))
    return draw(st.text(_CHARS, max_size=40))


@st.composite
def tenant_names(draw, target: Target, for_drop: bool = False) -> str:
    roll = draw(st.integers(0, 9))
    if roll < 3 and target.tenants and not for_drop:
        return draw(st.sampled_from(target.tenants))
    if roll < 6:
        return "fz-" + draw(st.sampled_from(["a", "b", "c", "d"]))  # valid; may or may not exist
    if roll < 7:
        return "x" * draw(st.sampled_from([128, 129, 10_000]))
    return draw(texts(big_percent=1))


@st.composite
def vectors(draw, dim: int) -> pb.Vector:
    encoding = draw(st.sampled_from([1, 1, 1, 1, 2, 2, 0, 3, 99]))
    n = draw(st.sampled_from([dim] * 6 + [0, 1, dim - 1, dim + 1, 2**32 - 1]))
    mode = draw(st.sampled_from(["normal", "normal", "normal", "special", "zeros", "bytes"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "bytes":  # random bytes of a random length (drawn by numpy: hypothesis's buffer stays small)
        data = rng.bytes(int(draw(st.sampled_from([0, 1, 3, 2 * dim, 4 * dim, 4 * dim + 1]))))
    else:
        length = min(n, dim + 1)
        x = (
            rng.standard_normal(length).astype(np.float32)
            if mode != "zeros"
            else np.zeros(length, np.float32)
        )
        if length and mode == "normal":
            x /= max(float(np.linalg.norm(x)), 1e-6)
        if length and mode == "special":
            x[draw(st.integers(0, length - 1))] = draw(
                st.sampled_from([math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45, 0.0])
            )
        dtype = {2: np.float16, 3: np.uint8}.get(encoding, np.float32)
        with np.errstate(over="ignore"):
            data = x.astype(dtype).tobytes() if dtype is not np.uint8 else np.packbits(x > 0).tobytes()
    return pb.Vector(data=data, dim=n, encoding=encoding)


@st.composite
def ids(draw, target: Target, safe: bool, max_size: int = 5) -> list[int]:
    """Ids; with `safe`, none of the protected originals (for writes)."""
    low = target.protected_below if safe else 0
    one = st.one_of(st.integers(low, low + 2000), st.sampled_from(BOUNDARY_IDS), st.integers(low, U64))
    if target.heavy and draw(st.integers(0, 99)) < 2:  # a huge list: over the 65,536 ids of one call
        start = draw(st.integers(low, 2**40))
        return list(range(start, start + draw(st.sampled_from([65_536, 65_537, 200_000]))))
    return draw(st.lists(one, max_size=max_size))


@st.composite
def metadata(draw) -> dict[str, str]:
    if draw(st.integers(0, 99)) < 2:
        n = draw(st.sampled_from([1_025, 5_000]))
        return {f"k{i}": "v" * draw(st.sampled_from([1, 100])) for i in range(n)}
    if draw(st.integers(0, 99)) < 3:  # a deeply nested JSON document as one value
        depth = draw(st.sampled_from([100, 10_000, 100_000]))
        return {"doc": '{"a":' * depth + "1" + "}" * depth}
    return draw(st.dictionaries(texts(big_percent=0), texts(big_percent=1), max_size=4))


@st.composite
def search_params(draw) -> pb.SearchParams:
    p = pb.SearchParams()
    u32 = st.one_of(st.sampled_from([0, 1, 8, 65_536, 2**32 - 1]), st.integers(0, 2**32 - 1))
    f32 = st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 0.5, 1.0, 1e30]),
        st.floats(width=32, allow_nan=True),
    )
    for name, strat in (
        ("nprobe", u32),
        ("prune_epsilon", f32),
        ("ef_search", u32),
        ("oversample", f32),
        ("candidate_budget", u32),
        ("query_model", texts(big_percent=0)),
    ):
        if draw(st.integers(0, 3)) == 0:
            setattr(p, name, draw(strat))
    return p


@st.composite
def search_request(draw, target: Target) -> pb.SearchRequest:
    req = pb.SearchRequest()
    roll = draw(st.integers(0, 99))
    if roll < 2:  # a huge vector batch (over max_batch)
        v = vectors(target.dim)
        one = draw(v)
        req.queries.extend([pb.Query(vector=one)] * draw(st.sampled_from([4_096, 4_097, 20_000])))
    else:
        for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3, 8]))):
            q = req.queries.add()
            what = draw(st.sampled_from(["text", "vector", "vector", "unset"]))
            if what == "text":
                q.text = draw(texts())
            elif what == "vector":
                q.vector.CopyFrom(draw(vectors(target.dim)))
    req.k = draw(
        st.one_of(st.sampled_from([0, 1, 5, 10, 10_000, 10_001, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
    )
    if draw(st.booleans()):
        req.tenant = draw(tenant_names(target))
    req.metadata_filter.update(draw(metadata()))
    req.params.CopyFrom(draw(search_params()))
    req.include_text = draw(st.booleans())
    return req


@st.composite
def passage(draw, target: Target) -> pb.Passage:
    p = pb.Passage(text=draw(texts()), title=draw(texts(big_percent=0)), source=draw(texts(big_percent=0)))
    if draw(st.booleans()):
        p.id = draw(
            st.one_of(st.integers(target.protected_below + 10**9, 2**62), st.sampled_from(BOUNDARY_IDS))
        )
    p.tenants.extend(draw(st.lists(tenant_names(target), max_size=2)))
    if draw(st.integers(0, 99)) < 1:
        p.tenants.extend([f"t{i}" for i in range(2_000)])
    p.metadata.update(draw(metadata()))
    return p


@st.composite
def upsert_items(draw, target: Target) -> list[pb.UpsertItem]:
    if (
        target.heavy and draw(st.integers(0, 199)) < 1
    ):  # an oversized stream: more items than one Upsert takes
        return [pb.UpsertItem(passage=pb.Passage(text="x"))] * 65_537
    items = []
    with_vectors = draw(st.sampled_from(["all", "all", "all", "none", "mixed"]))
    for _ in range(draw(st.integers(0, 4))):
        item = pb.UpsertItem(passage=draw(passage(target)))
        if with_vectors == "all" or (with_vectors == "mixed" and draw(st.booleans())):
            item.vector.CopyFrom(draw(vectors(target.dim)))
        items.append(item)
    return items


def _mutate(data: bytes, draw) -> bytes:
    """Bit flips, truncation or garbage appended to a serialized message."""
    b = bytearray(data)
    how = draw(st.sampled_from(["flip", "truncate", "append", "varint"]))
    if how == "flip" and b:
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif how == "truncate" and b:
        del b[draw(st.integers(0, len(b) - 1)) :]
    elif how == "append":
        b += draw(st.binary(min_size=1, max_size=16))
    else:  # an overlong varint at the front: the field number of a bogus tag
        b[:0] = b"\x80" * 10 + b"\x01"
    return bytes(b)


@st.composite
def cases(draw, target: Target) -> Case:
    method = draw(st.sampled_from(sorted(ALLOWED) + ["Search", "Search", "Upsert"]))
    if method == "Search":
        msg = draw(search_request(target))
    elif method == "GetPassages":
        msg = pb.GetPassagesRequest(ids=draw(ids(target, safe=False)))
        if draw(st.booleans()):
            msg.tenant = draw(tenant_names(target))
    elif method == "Upsert":
        msg = draw(upsert_items(target))
    elif method == "Delete":
        msg = pb.DeleteRequest(ids=draw(ids(target, safe=True)))
    elif method in ("Grant", "Revoke"):
        msg = pb.AccessRequest(ids=draw(ids(target, safe=True)), tenant=draw(tenant_names(target)))
    elif method == "CreateTenant":
        msg = pb.CreateTenantRequest(name=draw(tenant_names(target)))
    elif method == "DropTenant":
        msg = pb.DropTenantRequest(name=draw(tenant_names(target, for_drop=True)))
    else:  # Stats, ListTenants, and RPCs without a strategy of their own
        msg = draw(generic_message(REQUEST_TYPES[method].DESCRIPTOR))
        if method == "ReadSnapshot" and not msg.snapshot_id:  # see _defused
            msg.snapshot_id = draw(st.sampled_from(["0" * 32, "fz", "../../../etc/passwd", "\x00"]))
    kind = draw(st.sampled_from(["message"] * 8 + ["mutated", "raw"]))
    items = msg if isinstance(msg, list) else [msg]
    if kind == "message":
        payload = [m.SerializeToString() for m in items]
    elif kind == "mutated":
        payload = [_mutate(m.SerializeToString(), draw) for m in items[:8]]
    else:
        payload = draw(st.lists(st.binary(max_size=256), min_size=1, max_size=3))
    payload = [_defused(method, p, target) for p in payload]
    auth = draw(
        st.sampled_from(
            ["admin"] * 6 + ["tenant", "tenant", "none", "malformed", "wrong-secret", "huge", "empty"]
            if target.keys
            else ["none"] * 8 + ["malformed", "huge"]
        )
    )
    return Case(method, tuple(payload) if method in STREAMING else payload[0] if payload else b"", auth, kind)


_FD = _descriptor.FieldDescriptor


@st.composite
def generic_message(draw, desc, depth: int = 0):
    """Any message type, its fields filled from the descriptor with hostile values."""
    msg = message_factory.GetMessageClass(desc)()
    for f in desc.fields:
        if draw(st.integers(0, 2)) == 0:
            continue
        repeated = f.is_repeated
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            getattr(msg, f.name).update(draw(metadata()))
            continue
        n = draw(st.integers(0, 3)) if repeated else 1
        for _ in range(n):
            if f.type == _FD.TYPE_MESSAGE:
                if depth >= 2:
                    continue
                sub = draw(generic_message(f.message_type, depth + 1))
                (getattr(msg, f.name).add().CopyFrom(sub) if repeated else getattr(msg, f.name).CopyFrom(sub))
                continue
            if f.type == _FD.TYPE_STRING:
                value = draw(texts())
            elif f.type == _FD.TYPE_BYTES:
                value = draw(st.binary(max_size=64))
            elif f.type == _FD.TYPE_BOOL:
                value = draw(st.booleans())
            elif f.type in (_FD.TYPE_FLOAT, _FD.TYPE_DOUBLE):
                value = draw(st.floats(width=32))
            elif f.type == _FD.TYPE_ENUM:
                value = draw(st.sampled_from([v.number for v in f.enum_type.values] + [99]))
            else:  # integers: boundaries of the widest unsigned and signed kinds
                unsigned = f.type in (_FD.TYPE_UINT32, _FD.TYPE_UINT64, _FD.TYPE_FIXED32, _FD.TYPE_FIXED64)
                bits = (
                    32
                    if f.type
                    in (_FD.TYPE_UINT32, _FD.TYPE_INT32, _FD.TYPE_FIXED32, _FD.TYPE_SINT32, _FD.TYPE_SFIXED32)
                    else 64
                )
                low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                value = draw(st.one_of(st.sampled_from([low, 0, 1, high]), st.integers(low, high)))
            if repeated:
                getattr(msg, f.name).append(value)
            else:
                setattr(msg, f.name, value)
    return msg


def _defused(method: str, data: bytes, target: Target) -> bytes:
    """A mutated or raw payload that would still parse into a write on the protected data is
    made unparseable (a tag of wire type 7), so the fuzz cannot wipe the probe's passages."""
    try:
        msg = REQUEST_TYPES[method].FromString(data)
    except (DecodeError, ValueError):
        return data
    bad = False
    if method in ("Delete", "Grant", "Revoke"):
        bad = any(i < target.protected_below for i in msg.ids)
    elif method == "Upsert":
        bad = msg.passage.HasField("id") and msg.passage.id < target.protected_below
    elif method == "DropTenant":
        bad = msg.name in target.tenants
    elif method == "ReadSnapshot":  # a new snapshot copies a whole shard to disk: never from the fuzz
        bad = not msg.snapshot_id
    return b"\xff\xff\xff" + data if bad else data


# -- sending -----------------------------------------------------------------------------------


def _metadata(case: Case, target: Target) -> tuple[tuple[tuple[str, str], ...] | None, str | None]:
    """(call metadata, the secret part that must never be echoed)."""
    if case.auth in target.keys:
        key = target.keys[case.auth]
        return (("authorization", f"Bearer {key}"),), key.split("_", 2)[-1]
    if case.auth == "malformed":
        return (("authorization", "Bearer not-a-key"), ("x-api-key", "ds_zz_" + "?" * 43)), None
    if case.auth == "wrong-secret" and target.keys:
        admin = target.keys["admin"]
        wrong = admin[:-6] + ("AAAAAA" if not admin.endswith("AAAAAA") else "BBBBBB")
        return (("authorization", f"Bearer {wrong}"),), wrong.split("_", 2)[-1]
    if case.auth == "huge":
        return (("authorization", "Bearer ds_" + "0" * 16 + "_" + "s" * 4000),), "s" * 4000
    if case.auth == "empty":
        return (("authorization", ""),), None
    return None, None


def _identity(b: bytes) -> bytes:
    return b


class Sender:
    """One channel and a generic stub per RPC: payloads go out as bytes, unchecked."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(
            target.address,
            options=[
                ("grpc.max_send_message_length", 256 << 20),
                ("grpc.max_receive_message_length", 256 << 20),
            ],
        )
        self.calls = {
            m: (self.channel.stream_unary if m in STREAMING else self.channel.unary_unary)(
                SERVICE + m, request_serializer=_identity, response_deserializer=_identity
            )
            for m in ALLOWED
        }

    def close(self) -> None:
        self.channel.close()

    def send(self, case: Case, report: Report) -> str | None:
        """Send one case, record it; the failure it shows, or None."""
        md, secret = _metadata(case, self.target)
        payload = iter(case.payload) if case.method in STREAMING else case.payload
        t = time.monotonic()
        details = ""
        try:
            response = self.calls[case.method](payload, timeout=self.target.deadline, metadata=md)
            code = C.OK
            if case.method == "Upsert":
                report.created.update(pb.UpsertResponse.FromString(response).ids)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
            trailing = "".join(str(v) for _, v in (e.trailing_metadata() or ()))
            details += trailing
        latency = time.monotonic() - t
        report.requests += 1
        report.by_code[code.name] += 1
        report.by_method[case.method] += 1
        report.max_latency = max(report.max_latency, latency)
        report.seconds_by_method[case.method] += latency
        size = sum(map(len, case.payload)) if case.method in STREAMING else len(case.payload)
        report.slowest.append((latency, f"{case.method} {case.kind} {size}B -> {code.name}"))
        report.slowest = sorted(report.slowest, reverse=True)[:5]
        failure = None
        if code == C.DEADLINE_EXCEEDED or latency >= self.target.deadline:
            report.hangs += 1
            failure = f"hang: {case.method} ({case.kind}) took {latency:.1f} s"
        elif code == C.UNAVAILABLE and re.search(r"connect|refused|reset|Socket closed|EOF", details):
            report.crashes += 1  # the server went away
            failure = f"crash: {case.method} ({case.kind}) got UNAVAILABLE: {details[:200]}"
        elif code not in ALLOWED[case.method]:
            failure = f"undocumented {code.name} from {case.method} ({case.kind}): {details[:200]}"
        if secret and len(secret) >= 8 and secret in details:
            report.key_echoes += 1
            failure = f"key echoed by {case.method}: {details[:100]}"
        if failure:
            report.failures.append(failure)
        return failure


def fuzz(target: Target, requests: int, rng_seed: int = 0, stop_on_failure: bool = False) -> Report:
    """Send `requests` hypothesis-drawn cases; with stop_on_failure, the first failure raises
    (after hypothesis shrinks it to a minimal case)."""
    report = Report()
    sender = Sender(target)

    @seed(rng_seed)
    @settings(
        max_examples=requests,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink] if stop_on_failure else [Phase.generate],
    )
    @given(cases(target))
    def one(case: Case) -> None:
        failure = sender.send(case, report)
        if stop_on_failure:
            assert failure is None, failure

    try:
        one()
    finally:
        sender.close()
    return report


# -- the health check after ---------------------------------------------------------------------


def probe(address: str, dim: int, key: str | None = None) -> list[tuple[int, float]]:
    """A normal search: one text and one vector query (ids and scores)."""
    from service.client import DatastoreClient

    v = np.random.default_rng(7).standard_normal(dim).astype(np.float32)
    with DatastoreClient(address, api_key=key, timeout=600) as c:  # the first call loads the model
        rows = c.search(["history of painting", v / np.linalg.norm(v)], k=10, include_text=True)
    return [(h.id, round(h.score, 4)) for row in rows for h in row]


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def clean_up(target: Target, report: Report) -> None:
    """Delete every passage the fuzz created (the probe must see the original data)."""
    from service.client import DatastoreClient

    created = sorted(i for i in report.created if i >= target.protected_below)
    with DatastoreClient(target.address, api_key=target.keys.get("admin"), timeout=120) as c:
        for start in range(0, len(created), 10_000):
            c.delete(created[start : start + 10_000])


def fuzz_and_check(target: Target, requests: int, rng_seed: int = 0, stop_on_failure: bool = False) -> dict:
    """Baseline probe, fuzz, clean up, probe again: the report plus the health verdict."""
    before = probe(target.address, target.dim, target.keys.get("admin"))
    t = time.monotonic()
    report = fuzz(target, requests, rng_seed, stop_on_failure)
    seconds = time.monotonic() - t
    clean_up(target, report)
    after = probe(target.address, target.dim, target.keys.get("admin"))
    out = report.as_dict()
    out.update(
        seconds=round(seconds, 1),
        serving_after=serving(target.address),
        probe_same=before == after,
        created_and_deleted=len(report.created),
    )
    return out


# -- the command -------------------------------------------------------------------------------


def _build(directory: Path) -> Path:
    from datastore.build import BuildConfig, build
    from datastore.chunking import ChunkConfig
    from datastore.corpus import iter_default_corpus

    docs = [
        {"id": a.doc_id, "title": a.title, "text": a.text, "source": a.source, "metadata": a.metadata}
        for a in iter_default_corpus(60)
    ]
    (directory / "wiki.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    build(
        BuildConfig(
            [str(directory / "wiki.jsonl")],
            directory / "ds",
            shards=2,
            progress=False,
            chunk=ChunkConfig(64, 0),
        )
    )
    return directory / "ds"


def _serve(directory: Path | None, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`datastore serve` with its log in a file (a pipe nobody reads would block it)."""
    where = [str(directory)] if directory is not None else []
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "datastore.cli", "serve", *where, "--port", "0", *extra],
            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
            stderr=f,
            text=True,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = re.search(r"serving .* on ([\d.]+:\d+)", log.read_text())
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError("the server did not start: " + log.read_text()[-2000:])


def internal_errors(log: Path) -> list[str]:
    """The distinct exceptions (last traceback line and the frame above it) a server logged."""
    lines = log.read_text(errors="replace").splitlines()
    found = []
    for i, line in enumerate(lines):
        if re.match(r"^\w[\w.]*(Error|Exception|Exit)\b", line):
            frame = next(
                (
                    lines[j].strip()
                    for j in range(i - 1, max(i - 6, -1), -1)
                    if lines[j].strip().startswith("File ")
                ),
                "",
            )
            found.append(f"{line[:160]} at {frame[:160]}")
    return sorted(set(found))


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keys", action="store_true", help="serve with API keys (admin and tenant keys)")
    ap.add_argument("--router", action="store_true", help="fuzz a router in front of the shard server")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        ds = _build(Path(tmp))
        from datastore.store import open_datastore

        with open_datastore(ds) as store:
            protected = store._next_id  # every original id is below it
            keys = {}
            if args.keys:
                store.create_tenant("acme")
                keys = {
                    "admin": store.control.create_key(None)[0],
                    "tenant": store.control.create_key("acme")[0],
                }
            dim = store.dim
        logs = [Path(tmp) / "server.log", Path(tmp) / "router.log"]
        procs = [_serve(ds, ["--workers", "8", "--flush-seconds", "5"], logs[0])]
        if args.router:
            procs.append(
                _serve(
                    None,
                    [
                        "--router",
                        "--shard",
                        procs[0][1],
                        "--workers",
                        "8",
                        *(["--api-key", keys["admin"]] if keys else []),
                    ],
                    logs[1],
                )
            )
        try:
            target = Target(procs[-1][1], dim, protected, ("acme",) if args.keys else (), keys)
            out = fuzz_and_check(target, args.requests, args.seed)
            out["server_alive"] = all(p.poll() is None for p, _ in procs)
            out["keys"] = bool(args.keys)
            out["router"] = bool(args.router)
            out["internal_errors_logged"] = [e for log in logs[: len(procs)] for e in internal_errors(log)][
                :20
            ]
            out["load_average"] = os.getloadavg()
            print(json.dumps(out))
        finally:
            for proc, _ in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
