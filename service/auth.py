"""API-key authentication for the gRPC service.

Keys travel as `authorization: Bearer ds_...` metadata. The interceptor resolves the
caller's Principal before the servicer runs and keeps it (and the raw key, which a router
forwards to its shard servers) in context variables for that call. Health checking and
reflection stay open, as probes need them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import grpc

from datastore.control import Principal
from datastore.errors import PermissionDenied
from service.interceptors import wrap_handler

PRINCIPAL: ContextVar[Principal | None] = ContextVar("principal", default=None)
API_KEY: ContextVar[str | None] = ContextVar("api_key", default=None)
OPEN_SERVICES = ("/grpc.health.", "/grpc.reflection.")


def key_from_metadata(metadata) -> str | None:
    for k, v in metadata or ():
        if k == "authorization" and v.startswith("Bearer "):
            return v[len("Bearer "):].strip()
        if k == "x-api-key":
            return v.strip()
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """With `authenticate` set, every RPC but health/reflection needs a valid key."""

    def __init__(self, authenticate: Callable[[str | None], Principal] | None) -> None:
        self.authenticate = authenticate

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        key = key_from_metadata(handler_call_details.invocation_metadata)

        def wrap(behavior: Callable, _streaming: bool) -> Callable:
            def run(request_or_iterator, context):
                principal = self.authenticate(key) if self.authenticate is not None else None
                t1, t2 = PRINCIPAL.set(principal), API_KEY.set(key)
                try:
                    return behavior(request_or_iterator, context)
                finally:
                    PRINCIPAL.reset(t1)
                    API_KEY.reset(t2)
            return run

        return wrap_handler(handler, wrap)


def require_admin(action: str) -> None:
    p = PRINCIPAL.get()
    if p is not None and not p.admin:
        raise PermissionDenied(f"{action} needs an admin key; this key belongs to tenant {p.tenant}")


def effective_tenant(requested: str | None) -> str | None:
    """The tenant a read runs as: a tenant key is confined to its own tenant."""
    p = PRINCIPAL.get()
    if p is None or p.admin:
        return requested
    if requested is not None and requested != p.tenant:
        raise PermissionDenied(f"this key may only read tenant {p.tenant}")
    return p.tenant
