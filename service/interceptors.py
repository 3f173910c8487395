"""Running code around a gRPC method's behaviour, for the server's interceptors.

A grpc.ServerInterceptor that wants to act around a call must hand back a new
RpcMethodHandler of the same kind with the same (de)serializers; the interceptors (auth,
metrics, errors, guard) share that here instead of each rebuilding handlers.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

#: wrap(behavior, streaming) -> the behavior to run instead; streaming is True for a
#: client stream (Upsert), whose request is an iterator.
Wrapper = Callable[[Callable, bool], Callable]


def wrap_handler(handler: grpc.RpcMethodHandler | None, wrap: Wrapper,
                 deserializer: Callable[[Callable | None], Callable | None] | None = None
                 ) -> grpc.RpcMethodHandler | None:
    """`handler` with its unary-unary or stream-unary behavior replaced by `wrap`'s, and its
    request deserializer by `deserializer(old)` when given. None and server-streaming
    handlers (health Watch, reflection: open-ended by design) come back as they are."""
    if handler is None:
        return None
    if handler.unary_unary:
        make, behavior, streaming = grpc.unary_unary_rpc_method_handler, handler.unary_unary, False
    elif handler.stream_unary:
        make, behavior, streaming = grpc.stream_unary_rpc_method_handler, handler.stream_unary, True
    else:
        return handler
    parse = handler.request_deserializer if deserializer is None else deserializer(handler.request_deserializer)
    return make(wrap(behavior, streaming), parse, handler.response_serializer)
