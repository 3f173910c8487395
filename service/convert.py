"""Every proto <-> domain mapping, in one pure module, so servicers stay thin."""

from __future__ import annotations

import numpy as np

from datastore.errors import InvalidArgument
from datastore.records import Hit, Passage
from index import SearchParams
from service.pb import datastore_pb2 as pb

_DTYPES = {pb.VECTOR_ENCODING_FLOAT32: np.dtype("<f4"), pb.VECTOR_ENCODING_FLOAT16: np.dtype("<f2")}


def vector_from_pb(v: pb.Vector, field: str) -> np.ndarray:
    """A float32 (dim,) array from bytes + dim + encoding; InvalidArgument when they disagree."""
    if v.encoding == pb.VECTOR_ENCODING_BINARY:
        raise InvalidArgument.field(f"{field}.encoding", "binary queries need a binary index")
    dtype = _DTYPES.get(v.encoding)
    if dtype is None:
        raise InvalidArgument.field(f"{field}.encoding", "must be FLOAT32 or FLOAT16")
    if v.dim == 0 or len(v.data) != v.dim * dtype.itemsize:
        raise InvalidArgument.field(f"{field}.data", f"{len(v.data)} bytes do not hold {v.dim} {dtype.name} values")
    return np.frombuffer(v.data, dtype=dtype).astype(np.float32)


def vector_to_pb(v: np.ndarray, encoding: int = pb.VECTOR_ENCODING_FLOAT32) -> pb.Vector:
    v = np.asarray(v).ravel()
    return pb.Vector(data=v.astype(_DTYPES[encoding]).tobytes(), dim=len(v), encoding=encoding)


def queries_from_pb(queries) -> list[str | np.ndarray]:
    out: list[str | np.ndarray] = []
    for i, q in enumerate(queries):
        kind = q.WhichOneof("query")
        if kind == "text":
            out.append(q.text)
        elif kind == "vector":
            out.append(vector_from_pb(q.vector, f"queries[{i}].vector"))
        else:
            raise InvalidArgument.field(f"queries[{i}]", "set text or vector")
    return out


def query_to_pb(q: str | np.ndarray) -> pb.Query:
    return pb.Query(text=q) if isinstance(q, str) else pb.Query(vector=vector_to_pb(q))


def params_from_pb(p: pb.SearchParams) -> SearchParams:
    return SearchParams(
        nprobe=p.nprobe if p.HasField("nprobe") else None,
        prune_epsilon=p.prune_epsilon if p.HasField("prune_epsilon") else None,
        ef_search=p.ef_search if p.HasField("ef_search") else None,
        oversample=p.oversample if p.HasField("oversample") else None,
        candidate_budget=p.candidate_budget if p.HasField("candidate_budget") else None,
        query_model=p.query_model if p.HasField("query_model") else None,
    )


def params_to_pb(p: SearchParams | None) -> pb.SearchParams:
    if p is None:
        return pb.SearchParams()
    return pb.SearchParams(**{k: v for k, v in vars(p).items() if v is not None})


def passage_to_pb(p: Passage, include_text: bool = True) -> pb.Passage:
    return pb.Passage(id=p.id if p.id >= 0 else None, text=p.text if include_text else "", title=p.title,
                      source=p.source, tenants=list(p.tenants), metadata=p.metadata)


def passage_from_pb(p: pb.Passage) -> Passage:
    return Passage(id=p.id if p.HasField("id") else -1, text=p.text, title=p.title, source=p.source,
                   tenants=tuple(sorted(set(p.tenants))), metadata=dict(p.metadata))


def hits_to_pb(rows: list[list[Hit]], include_text: bool) -> pb.SearchResponse:
    return pb.SearchResponse(results=[
        pb.QueryResult(hits=[pb.Hit(id=h.id, score=h.score,
                                    passage=passage_to_pb(h.passage, include_text) if h.passage else None)
                             for h in row])
        for row in rows])


def hits_from_pb(resp: pb.SearchResponse) -> list[list[Hit]]:
    return [[Hit(h.id, h.score, passage_from_pb(h.passage) if h.HasField("passage") else None) for h in r.hits]
            for r in resp.results]
