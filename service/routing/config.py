"""The router's settings and the call-timing constants its parts share."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

#: Codes after which another replica is tried (the one called may be down or slow).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def lost_call(e: grpc.RpcError) -> bool:
    """The call failed on the way, not in the server's code: a retryable code, or INTERNAL
    raised by gRPC core itself (a connection cut mid-call, e.g. to a server being killed),
    which our servers never send (their internal errors carry their own message)."""
    return e.code() in RETRYABLE or (e.code() == grpc.StatusCode.INTERNAL
                                     and (e.details() or "").startswith(("Internal error from Core",
                                                                        "Received RST_STREAM")))
#: Share of the caller's remaining time the router keeps for merging and answering, so a
#: shard that misses the deadline is reported (or fails the call) before the caller gives up.
DEADLINE_RESERVE = 0.1
DEADLINE_RESERVE_MAX_S = 0.05


@dataclass(frozen=True)
class RouterConfig:
    #: One entry per shard server: the addresses of its replicas.
    servers: list[list[str]]
    #: When every replica of a server is down: False fails with UNAVAILABLE, True answers
    #: from the other servers and lists the missing shards in the response.
    partial_results: bool = False
    #: Seconds one replica may take before the router tries the next one.
    per_shard_timeout: float = 10.0
    #: Default deadline of a request that came without one.
    default_deadline: float = 30.0
    health_interval: float = 1.0
    max_message_bytes: int = 64 * 1024 * 1024
    #: Key for the router's own calls (discovering the servers); callers' keys are forwarded.
    api_key: str | None = None
    #: Reads only: when the first replica has not answered after this many ms, send the
    #: same call to the next replica too and take whichever answers first (None: off).
    hedge_after_ms: float | None = None
    #: Searches with the same options sent at once; requests arriving beyond that wait and
    #: go out together as one batched Search per server (0: never batch).
    batch_in_flight: int = 2

    def __post_init__(self) -> None:
        if not self.servers or any(not group for group in self.servers):
            raise ValueError("servers: give at least one server, each with at least one replica address")
        for name in ("per_shard_timeout", "default_deadline", "health_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_in_flight < 0:
            raise ValueError(f"batch_in_flight must be >= 0, got {self.batch_in_flight}")
        if self.hedge_after_ms is not None and self.hedge_after_ms <= 0:
            raise ValueError(f"hedge_after_ms must be positive, got {self.hedge_after_ms}")
