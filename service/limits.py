"""Server-side guards against hostile or runaway callers, in one interceptor.

- Malformed payloads: bytes that do not parse as the method's request message answer
  INVALID_ARGUMENT (grpc itself would answer INTERNAL, which we keep for our own bugs).
- Deadlines: a call without a deadline gets the server's maximum, so nothing waits
  forever: a client stream that stalls is cut with DEADLINE_EXCEEDED, and handlers that
  forward work (the router) see the capped `context.time_remaining()`.
- Streams: the bytes of one Upsert stream are capped (the servicer buffers a whole stream
  before writing, so this caps memory per call).
- Per-key quotas: at most N calls in flight and a token-bucket rate per caller (the API
  key's id, or the peer's address without a key); excess calls fail at once with
  RESOURCE_EXHAUSTED carrying QuotaFailure and RetryInfo, so clients back off rather than
  queue. Health checking and reflection are exempt (probes must always get through).

Everything is off or generous by default; `datastore serve` flags tighten it.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.auth import OPEN_SERVICES, key_from_metadata
from service.interceptors import wrap_handler
from service.metrics import GUARD_REFUSALS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceLimits:
    """Per-call and per-caller limits of one server (0 turns a quota off)."""

    #: Calls one key (or one keyless peer) may have in flight at once.
    max_concurrent_per_key: int = 0
    #: Calls per second one key may start, sustained (token bucket).
    rate_per_key: float = 0.0
    #: Calls a key may start at once above the rate (0: max(1, rate)).
    burst: int = 0
    #: The longest any call may run: calls without a deadline get this one.
    max_deadline_seconds: float = 300.0
    #: Serialized bytes of one client stream (Upsert), summed over its items.
    max_stream_bytes: int = 256 * 1024 * 1024
    #: A client stream that sends nothing for this long is cut (DEADLINE_EXCEEDED): a slow
    #: sender cannot hold a worker thread for the whole deadline.
    max_stream_idle_seconds: float = 60.0
    #: Callers remembered for quotas; the least recently seen are forgotten beyond it.
    max_tracked_callers: int = 10_000

    def __post_init__(self) -> None:
        for name in (
            "max_concurrent_per_key",
            "rate_per_key",
            "burst",
            "max_deadline_seconds",
            "max_stream_bytes",
            "max_stream_idle_seconds",
            "max_tracked_callers",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_deadline_seconds <= 0 or self.max_stream_bytes <= 0 or self.max_stream_idle_seconds <= 0:
            raise ValueError(
                "max_deadline_seconds, max_stream_bytes and max_stream_idle_seconds must be positive"
            )


class _Malformed:
    """What a request deserializes to when its bytes are not the method's message."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001  # DecodeError, invalid UTF-8 in a string field, ...
            return _Malformed(type(e).__name__)

    return parse


def quota_status(subject: str, description: str, retry_after: float) -> grpc.Status:
    """RESOURCE_EXHAUSTED with QuotaFailure, RetryInfo and a hint, as google.rpc details."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(retry_after, 0.001) * 1e9))
    details = [
        error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)]
        ),
        error_details_pb2.RetryInfo(retry_delay=delay),
        error_details_pb2.Help(
            links=[
                error_details_pb2.Help.Link(
                    description=f"retry after {retry_after:.3f} s, or send fewer calls at once"
                )
            ]
        ),
    ]
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.RESOURCE_EXHAUSTED,
            message=f"{description}; retry after {retry_after:.3f} s",
            details=packed,
        )
    )


class _Caller:
    """Quota state of one caller: calls in flight and a token bucket."""

    __slots__ = ("in_flight", "stamp", "tokens")

    def __init__(self, burst: float) -> None:
        self.in_flight = 0
        self.tokens = burst
        self.stamp = time.monotonic()


class _Quotas:
    def __init__(self, limits: ServiceLimits) -> None:
        self.limits = limits
        self.burst = float(limits.burst or max(1.0, limits.rate_per_key))
        self._callers: OrderedDict[str, _Caller] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return bool(self.limits.max_concurrent_per_key or self.limits.rate_per_key)

    def enter(self, who: str) -> tuple[str, str, float] | None:
        """None when the call may start (counted in flight), else (subject, why, retry after)."""
        lim = self.limits
        with self._lock:
            c = self._callers.get(who)
            if c is None:
                c = self._callers[who] = _Caller(self.burst)
                while len(self._callers) > lim.max_tracked_callers:
                    old, state = next(iter(self._callers.items()))
                    if state.in_flight:  # never forget a caller with calls running
                        self._callers.move_to_end(old)
                        break
                    self._callers.popitem(last=False)
            else:
                self._callers.move_to_end(who)
            if lim.max_concurrent_per_key and c.in_flight >= lim.max_concurrent_per_key:
                return (
                    "concurrent calls per key",
                    f"{c.in_flight} calls of this caller are running, at most {lim.max_concurrent_per_key}",
                    0.05,
                )
            if lim.rate_per_key:
                now = time.monotonic()
                c.tokens = min(self.burst, c.tokens + (now - c.stamp) * lim.rate_per_key)
                c.stamp = now
                if c.tokens < 1.0:
                    return (
                        "calls per second per key",
                        f"more than {lim.rate_per_key:g} calls per second from this caller",
                        (1.0 - c.tokens) / lim.rate_per_key,
                    )
                c.tokens -= 1.0
            c.in_flight += 1
            return None

    def leave(self, who: str) -> None:
        with self._lock:
            c = self._callers.get(who)
            if c is not None:
                c.in_flight -= 1


def caller_identity(metadata, peer: str) -> str:
    """The key's id (never the secret) or, without a well-formed key, the peer's host."""
    key = key_from_metadata(metadata)
    if key and key.startswith("ds_") and key.count("_") >= 2:
        return "key:" + key.split("_", 2)[1][:32]
    host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
    return "peer:" + host


class _CappedContext:
    """The servicer context with time_remaining() capped at the call's server deadline."""

    def __init__(self, context: grpc.ServicerContext, deadline: float) -> None:
        self._context = context
        self._deadline = deadline

    def time_remaining(self) -> float:
        return max(0.0, min(self._context.time_remaining(), self._deadline - time.monotonic()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _StreamReader:
    """Reads a client stream in its own thread so the handler can give up on a stalled
    client at the deadline; also sums the bytes and refuses malformed items."""

    _END = object()

    def __init__(self, source, context, deadline: float, max_bytes: int, idle: float) -> None:
        self._source, self._context = source, context
        self._deadline, self._max_bytes, self._idle = deadline, max_bytes, idle
        self._queue: queue.Queue = queue.Queue(maxsize=1024)
        self._stop = threading.Event()
        threading.Thread(target=self._pump, name="stream-reader", daemon=True).start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(self._END)
        except Exception as e:  # noqa: BLE001  # the call ended under us (cancelled, aborted)
            self._put(e)

    def close(self) -> None:
        self._stop.set()

    def __iter__(self):
        total = 0
        try:
            while True:
                left = self._deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=max(min(left, self._idle), 0.0))
                except queue.Empty:
                    GUARD_REFUSALS.labels("stream deadline" if left <= self._idle else "stream idle").inc()
                    self._context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "the request stream did not finish within the call's deadline"
                        if left <= self._idle
                        else f"the request stream sent nothing for {self._idle:g} s",
                    )
                if item is self._END:
                    return
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, _Malformed):
                    GUARD_REFUSALS.labels("malformed payload").inc()
                    self._context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"a stream item is not a valid request message ({item.error})",
                    )
                total += item.ByteSize()
                if total > self._max_bytes:
                    GUARD_REFUSALS.labels("stream bytes").inc()
                    self._context.abort_with_status(
                        quota_status(
                            "stream bytes", f"the request stream passed {self._max_bytes} bytes", 1.0
                        )
                    )
                yield item
        finally:
            self.close()


class GuardInterceptor(grpc.ServerInterceptor):
    """Applies ServiceLimits to every call (see the module docstring)."""

    def __init__(self, limits: ServiceLimits = ServiceLimits()) -> None:
        self.limits = limits
        self.quotas = _Quotas(limits)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        limited = self.quotas.active and not method.startswith(OPEN_SERVICES)

        def wrap(behavior: Callable, streaming: bool) -> Callable:
            def run(request, context):
                start = time.monotonic()
                deadline = start + min(context.time_remaining(), self.limits.max_deadline_seconds)
                if not streaming and isinstance(request, _Malformed):
                    GUARD_REFUSALS.labels("malformed payload").inc()
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request is not a valid {method} message ({request.error})",
                    )
                debug = log.isEnabledFor(logging.DEBUG)
                who = caller_identity(metadata, context.peer()) if limited or debug else ""
                if limited:
                    refused = self.quotas.enter(who)
                    if refused is not None:
                        log.info("%s refused for %s: %s", method, who, refused[1])
                        GUARD_REFUSALS.labels(refused[0]).inc()
                        context.abort_with_status(quota_status(*refused))
                reader = None
                try:
                    if streaming:
                        reader = _StreamReader(
                            request,
                            context,
                            deadline,
                            self.limits.max_stream_bytes,
                            self.limits.max_stream_idle_seconds,
                        )
                        request = iter(reader)
                    return behavior(request, _CappedContext(context, deadline))
                finally:
                    if reader is not None:
                        reader.close()
                    if limited:
                        self.quotas.leave(who)
                    if debug:  # the caller by key id only: the secret never reaches a log
                        log.debug(
                            "%s by %s: %s in %.3f s",
                            method,
                            who,
                            context.code() or "OK",
                            time.monotonic() - start,
                        )

            return run

        return wrap_handler(handler, wrap, _safe)  # server-streaming ones pass as they are
