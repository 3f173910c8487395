"""`datastore plan`: what a datastore of N tokens needs, from per-passage costs measured
on this build (or on a datastore you point it at).

Every constant below names where it was measured; the ones that could not be measured on
this machine (GPU throughput, network hop) are marked as assumptions and can be overridden.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from datastore.manifest import Manifest
from datastore.shard import Shard


@dataclass(frozen=True)
class Costs:
    """Per-passage and per-query costs; defaults measured on data/wiki-2000 (MiniLM, 384-d)."""

    #: LMDB bytes of passage records per word of text (data/wiki-2000: 923 B / ~90 words + keys).
    text_bytes_per_word: float = 9.5
    #: LMDB bytes per stored vector per dimension, float16 (data/wiki-2000: 1,031 B for 384-d).
    vector_bytes_per_dim: float = 2.69
    #: Tokens per whitespace word for English web text with a BPE tokenizer.
    tokens_per_word: float = 1.33
    #: SPANN RAM per vector per dimension: heads are ~1% of vectors, float32 (GloVe-50 run).
    spann_ram_bytes_per_dim: float = 0.04
    #: SPANN disk per vector per dimension: ~3 replicas, float32 (GloVe-50: 365 MB for 390k x 50).
    spann_disk_bytes_per_dim: float = 18.7
    #: Encoder passages/s on one CPU core pair at 256 words (ANCHORS.md: ~17/s).
    cpu_passages_per_s: float = 17.0
    #: ASSUMPTION (no GPU here): MiniLM-L6 passages/s on one modern GPU at 256 words.
    gpu_passages_per_s: float = 4000.0
    #: Single-query p50 / p99 ms of one SPANN shard at recall 0.9 (GloVe-50, warm, 1 thread).
    shard_p50_ms: float = 0.8
    shard_p99_ms: float = 3.0
    #: ASSUMPTION: one network hop router <-> shard inside a cluster, ms.
    hop_ms: float = 0.3


@dataclass(frozen=True)
class Plan:
    tokens: float
    chunk_words: int
    dim: int
    index: str
    passages: int
    shards: int
    passages_per_shard: int
    lmdb_bytes_per_shard: int
    index_ram_bytes_per_shard: int
    index_disk_bytes_per_shard: int
    lmdb_bytes_total: int
    index_ram_bytes_total: int
    index_disk_bytes_total: int
    gpu_hours: float
    cpu_core_hours: float
    query_p50_ms: float
    query_p99_ms: float


INDEX_RAM = {"flat": lambda c, d: 4.0 * d, "spann": lambda c, d: c.spann_ram_bytes_per_dim * d,
             "binary": lambda c, d: d / 8.0 * 2}  # binary: 2 bits per dimension in RAM
INDEX_DISK = {"flat": lambda c, d: 4.0 * d, "spann": lambda c, d: c.spann_disk_bytes_per_dim * d,
              "binary": lambda c, d: 4.0 * d}  # binary keeps floats on disk for the rerank


def measure(directory: Path) -> Costs:
    """Costs with the storage figures read off a built datastore."""
    m = Manifest.load(directory)
    words = text = vec = n = 0
    for i, d in enumerate(m.shard_dirs):
        s = Shard(Path(directory) / d, i, m.model.dim, m.vector_dtype)
        with s.env.begin() as txn:
            for name, acc in (("passages", "text"), ("vectors", "vec")):
                st = txn.stat(s.db[name])
                size = (st["leaf_pages"] + st["overflow_pages"] + st["branch_pages"]) * st["psize"]
                if acc == "text":
                    text += size
                else:
                    vec += size
        for p in s.iter_passages():
            words += len(p.text.split()) + len(p.title.split())
            n += 1
        s.close()
    if not n:
        return Costs()
    scale = 2.0 / (4 if m.vector_dtype == "float32" else 2)  # express as float16
    return Costs(text_bytes_per_word=text / words, vector_bytes_per_dim=vec / n / m.model.dim * scale)


def plan(tokens: float, *, chunk_words: int = 256, dim: int = 384, index: str = "spann",
         passages_per_shard: int = 50_000_000, costs: Costs = Costs()) -> Plan:
    if tokens <= 0 or chunk_words <= 0 or dim <= 0 or passages_per_shard <= 0:
        raise ValueError("tokens, chunk_words, dim and passages_per_shard must be positive")
    if index not in INDEX_RAM:
        raise ValueError(f"index must be one of {sorted(INDEX_RAM)}, got {index!r}")
    passages = math.ceil(tokens / costs.tokens_per_word / chunk_words)
    shards = math.ceil(passages / passages_per_shard)
    per_shard = math.ceil(passages / shards)
    lmdb = per_shard * (chunk_words * costs.text_bytes_per_word + dim * costs.vector_bytes_per_dim)
    ram = per_shard * INDEX_RAM[index](costs, dim)
    disk = per_shard * INDEX_DISK[index](costs, dim)
    encode_s = passages / costs.gpu_passages_per_s
    # the router waits for the slowest of `shards` answers: the p50 of a fan-out is near one
    # shard's p99 once there are tens of shards
    p50 = 2 * costs.hop_ms + (costs.shard_p50_ms if shards == 1 else costs.shard_p99_ms)
    p99 = 2 * costs.hop_ms + costs.shard_p99_ms * (1 + math.log10(shards))
    return Plan(tokens, chunk_words, dim, index, passages, shards, per_shard, int(lmdb), int(ram), int(disk),
                int(lmdb * shards), int(ram * shards), int(disk * shards), round(encode_s / 3600, 1),
                round(passages / costs.cpu_passages_per_s / 3600 * 2, 1), round(p50, 2), round(p99, 2))


def to_dict(p: Plan) -> dict:
    return asdict(p)
