from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VectorEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VECTOR_ENCODING_UNSPECIFIED: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_FLOAT32: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_FLOAT16: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_BINARY: _ClassVar[VectorEncoding]
VECTOR_ENCODING_UNSPECIFIED: VectorEncoding
VECTOR_ENCODING_FLOAT32: VectorEncoding
VECTOR_ENCODING_FLOAT16: VectorEncoding
VECTOR_ENCODING_BINARY: VectorEncoding

class Vector(_message.Message):
    __slots__ = ("data", "dim", "encoding")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dim: int
    encoding: VectorEncoding
    def __init__(self, data: _Optional[bytes] = ..., dim: _Optional[int] = ..., encoding: _Optional[_Union[VectorEncoding, str]] = ...) -> None: ...

class Passage(_message.Message):
    __slots__ = ("id", "text", "title", "source", "tenants", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    title: str
    source: str
    tenants: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., title: _Optional[str] = ..., source: _Optional[str] = ..., tenants: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("text", "vector")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    text: str
    vector: Vector
    def __init__(self, text: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class SearchParams(_message.Message):
    __slots__ = ("nprobe", "prune_epsilon", "ef_search", "oversample", "candidate_budget", "query_model")
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    PRUNE_EPSILON_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    OVERSAMPLE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_BUDGET_FIELD_NUMBER: _ClassVar[int]
    QUERY_MODEL_FIELD_NUMBER: _ClassVar[int]
    nprobe: int
    prune_epsilon: float
    ef_search: int
    oversample: float
    candidate_budget: int
    query_model: str
    def __init__(self, nprobe: _Optional[int] = ..., prune_epsilon: _Optional[float] = ..., ef_search: _Optional[int] = ..., oversample: _Optional[float] = ..., candidate_budget: _Optional[int] = ..., query_model: _Optional[str] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("queries", "k", "tenant", "metadata_filter", "params", "include_text")
    class MetadataFilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FILTER_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TEXT_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    k: int
    tenant: str
    metadata_filter: _containers.ScalarMap[str, str]
    params: SearchParams
    include_text: bool
    def __init__(self, queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., k: _Optional[int] = ..., tenant: _Optional[str] = ..., metadata_filter: _Optional[_Mapping[str, str]] = ..., params: _Optional[_Union[SearchParams, _Mapping]] = ..., include_text: _Optional[bool] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "passage")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    score: float
    passage: Passage
    def __init__(self, id: _Optional[int] = ..., score: _Optional[float] = ..., passage: _Optional[_Union[Passage, _Mapping]] = ...) -> None: ...

class QueryResult(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "missing_shards")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[QueryResult]
    missing_shards: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, results: _Optional[_Iterable[_Union[QueryResult, _Mapping]]] = ..., missing_shards: _Optional[_Iterable[int]] = ...) -> None: ...

class GetPassagesRequest(_message.Message):
    __slots__ = ("ids", "tenant")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    tenant: str
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., tenant: _Optional[str] = ...) -> None: ...

class GetPassagesResponse(_message.Message):
    __slots__ = ("passages",)
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    passages: _containers.RepeatedCompositeFieldContainer[Passage]
    def __init__(self, passages: _Optional[_Iterable[_Union[Passage, _Mapping]]] = ...) -> None: ...

class UpsertItem(_message.Message):
    __slots__ = ("passage", "vector")
    PASSAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    passage: Passage
    vector: Vector
    def __init__(self, passage: _Optional[_Union[Passage, _Mapping]] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted", "ids")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, upserted: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("with_digest",)
    WITH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    with_digest: bool
    def __init__(self, with_digest: _Optional[bool] = ...) -> None: ...

class ShardStats(_message.Message):
    __slots__ = ("shard_id", "passages", "vectors", "disk_bytes", "index_memory_bytes", "index_disk_bytes", "write_seq", "digest")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITE_SEQ_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    passages: int
    vectors: int
    disk_bytes: int
    index_memory_bytes: int
    index_disk_bytes: int
    write_seq: int
    digest: str
    def __init__(self, shard_id: _Optional[int] = ..., passages: _Optional[int] = ..., vectors: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., index_memory_bytes: _Optional[int] = ..., index_disk_bytes: _Optional[int] = ..., write_seq: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("address", "shard_ids", "healthy", "stale", "reason")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    address: str
    shard_ids: _containers.RepeatedScalarFieldContainer[int]
    healthy: bool
    stale: bool
    reason: str
    def __init__(self, address: _Optional[str] = ..., shard_ids: _Optional[_Iterable[int]] = ..., healthy: _Optional[bool] = ..., stale: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("passages", "dim", "model", "index_kind", "metric", "shards", "manifest_json", "num_shards", "replicas", "instance_id")
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    passages: int
    dim: int
    model: str
    index_kind: str
    metric: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    manifest_json: str
    num_shards: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    instance_id: str
    def __init__(self, passages: _Optional[int] = ..., dim: _Optional[int] = ..., model: _Optional[str] = ..., index_kind: _Optional[str] = ..., metric: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., manifest_json: _Optional[str] = ..., num_shards: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., instance_id: _Optional[str] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CreateTenantResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DropTenantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropTenantResponse(_message.Message):
    __slots__ = ("deleted_passages", "updated_passages")
    DELETED_PASSAGES_FIELD_NUMBER: _ClassVar[int]
    UPDATED_PASSAGES_FIELD_NUMBER: _ClassVar[int]
    deleted_passages: int
    updated_passages: int
    def __init__(self, deleted_passages: _Optional[int] = ..., updated_passages: _Optional[int] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class AccessRequest(_message.Message):
    __slots__ = ("ids", "tenant")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    tenant: str
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., tenant: _Optional[str] = ...) -> None: ...

class AccessResponse(_message.Message):
    __slots__ = ("changed",)
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    changed: int
    def __init__(self, changed: _Optional[int] = ...) -> None: ...

class ReadSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id", "shard_id", "control", "offset")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    shard_id: int
    control: bool
    offset: int
    def __init__(self, snapshot_id: _Optional[str] = ..., shard_id: _Optional[int] = ..., control: _Optional[bool] = ..., offset: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("snapshot_id", "data", "total_bytes", "sha256", "write_seq", "last")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    WRITE_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    data: bytes
    total_bytes: int
    sha256: str
    write_seq: int
    last: bool
    def __init__(self, snapshot_id: _Optional[str] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., write_seq: _Optional[int] = ..., last: _Optional[bool] = ...) -> None: ...
