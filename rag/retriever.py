"""The datastore as a language model sees it: batched top-k passages, cleaned the MassiveDS way.

A `Retriever` wraps either a served datastore (`DatastoreClient`, "host:port") or an embedded
one (`Datastore`, a directory); both expose the same `search`, so nothing here branches on
which. After the search, two filters run per query, in MassiveDS's order:
decontamination against a reference text (the text being scored must not leak into the
prompt), then near-duplicate removal among the hits (k copies of one passage waste the
context budget). The datastore is asked for more than k (`fetch_k`) so that dropped hits
leave k behind.
"""

from __future__ import annotations

import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from datastore.chunking import ChunkConfig, chunk_words
from datastore.dedup import DedupConfig, Deduplicator, normalize
from datastore.records import Hit, Passage
from datastore.store import Datastore, open_datastore
from service.client import DatastoreClient

_ADDRESS = re.compile(r"^[\w.\-\[\]:]+:\d+$")
#: Metadata key that marks the chunks of one long input upserted for one generation.
SESSION_KEY = "rag_session"


@dataclass(frozen=True)
class RetrieverConfig:
    """How many passages, for whom, and which ones to drop before they reach the model."""

    k: int = 5
    #: Hits asked of the datastore before filtering (default 3k, so that drops leave k).
    fetch_k: int | None = None
    tenant: str | None = None
    metadata_filter: dict[str, str] | None = None
    #: Queries per datastore request.
    batch_size: int = 64
    #: Drop near-identical hits (MinHash over word 13-grams, Jaccard >= dedup_threshold).
    dedup: bool = True
    dedup_threshold: float = 0.8
    #: Drop hits sharing a run of this many words with the reference (MassiveDS: 32).
    decontam_overlap_words: int = 32
    #: ... or whose word 13-gram sets have Jaccard above this with the reference (MassiveDS: 0.8).
    decontam_jaccard: float = 0.8
    decontam_ngram: int = 13

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.fetch_k is not None and self.fetch_k < self.k:
            raise ValueError(f"fetch_k must be >= k ({self.k}), got {self.fetch_k}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ValueError(f"dedup_threshold must be in (0, 1], got {self.dedup_threshold}")
        if self.decontam_overlap_words < 1:
            raise ValueError(f"decontam_overlap_words must be >= 1, got {self.decontam_overlap_words}")
        if not 0.0 <= self.decontam_jaccard <= 1.0:
            raise ValueError(f"decontam_jaccard must be in [0, 1], got {self.decontam_jaccard}")
        if self.decontam_ngram < 1:
            raise ValueError(f"decontam_ngram must be >= 1, got {self.decontam_ngram}")


@dataclass
class RetrievalStats:
    """What the filters dropped and how long the datastore took (summed over calls)."""

    queries: int = 0
    hits: int = 0
    duplicates_dropped: int = 0
    contaminated_dropped: int = 0
    seconds: float = 0.0


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass
class Reference:
    """A text that retrieved passages must not copy; its n-gram sets are built once."""

    text: str
    overlap_words: int = 32
    ngram: int = 13
    jaccard: float = 0.8
    _long: set[tuple[str, ...]] = field(init=False, repr=False)
    _grams: set[tuple[str, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        words = normalize(self.text).split()
        self._long = _ngrams(words, self.overlap_words)
        self._grams = _ngrams(words, self.ngram)

    def contaminated(self, passage: str) -> bool:
        """A shared run of >= overlap_words words (the same as sharing one such n-gram), or
        exact word n-gram Jaccard > jaccard."""
        words = normalize(passage).split()
        if self._long and not self._long.isdisjoint(_ngrams(words, self.overlap_words)):
            return True
        grams = _ngrams(words, self.ngram)
        union = len(grams | self._grams)
        return bool(union) and len(grams & self._grams) / union > self.jaccard


def hit_text(hit: Hit) -> str:
    """What a model reads of a hit: the title kept with the text, as it was embedded."""
    return hit.passage.embedding_input() if hit.passage is not None else ""


class Retriever:
    """Top-k passages for batches of text queries from a served or embedded datastore."""

    def __init__(self, source: str | Path | DatastoreClient | Datastore,
                 config: RetrieverConfig | None = None, **open_kwargs) -> None:
        """`source`: a client, an open Datastore, a "host:port" address or a directory
        (`open_kwargs` go to `open_datastore`). What this opens, `close` closes."""
        self.config = config or RetrieverConfig()
        self.stats = RetrievalStats()
        self._owned = not isinstance(source, (DatastoreClient, Datastore))
        if isinstance(source, (DatastoreClient, Datastore)):
            self.backend: DatastoreClient | Datastore = source
        elif not Path(source).exists() and _ADDRESS.match(str(source)):
            self.backend = DatastoreClient(str(source))
        else:
            self.backend = open_datastore(source, **open_kwargs)

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self.backend.close()

    def reference(self, text: str) -> Reference:
        c = self.config
        return Reference(text, c.decontam_overlap_words, c.decontam_ngram, c.decontam_jaccard)

    def retrieve(self, queries: Sequence[str], references: Sequence[str | None] | None = None,
                 k: int | None = None, tenant: str | None = None,
                 metadata_filter: dict[str, str] | None = None) -> list[list[Hit]]:
        """Best-first hits per query, at most k each, after decontamination against
        `references[i]` (None: none for that query) and near-duplicate removal.

        `tenant` and `metadata_filter` override the config's for this call."""
        if references is not None and len(references) != len(queries):
            raise ValueError(f"references must match queries: {len(references)} for {len(queries)}")
        c = self.config
        k = c.k if k is None else k
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        fetch = max(k, c.fetch_k) if c.fetch_k is not None else 3 * k
        out: list[list[Hit]] = []
        for start in range(0, len(queries), c.batch_size):
            batch = list(queries[start:start + c.batch_size])
            t = time.perf_counter()
            rows = self.backend.search(batch, k=fetch, tenant=tenant or c.tenant,
                                       metadata_filter=metadata_filter or c.metadata_filter,
                                       include_text=True)
            self.stats.seconds += time.perf_counter() - t
            for i, row in enumerate(rows):
                ref = references[start + i] if references is not None else None
                out.append(self._clean(row, self.reference(ref) if ref else None, k))
        self.stats.queries += len(queries)
        return out

    def _clean(self, hits: list[Hit], reference: Reference | None, k: int) -> list[Hit]:
        c = self.config
        dedup = Deduplicator(DedupConfig(threshold=c.dedup_threshold)) if c.dedup else None
        kept: list[Hit] = []
        for hit in hits:
            text = hit_text(hit)
            if reference is not None and reference.contaminated(text):
                self.stats.contaminated_dropped += 1
                continue
            if dedup is not None and not dedup.check(hit.id, text):
                self.stats.duplicates_dropped += 1
                continue
            kept.append(hit)
            if len(kept) == k:
                break
        self.stats.hits += len(kept)
        return kept

    @contextmanager
    def ephemeral(self, text: str, chunk_words_per_passage: int = 64, title: str = "") -> Iterator[dict]:
        """Chunk a long input, upsert the chunks under a fresh private tenant, and yield the
        `retrieve` keyword arguments that search only them; dropping the tenant after deletes
        the chunks. This is how RAPID's drafter reads a long document: through retrieval.

        The datastore must let this caller create and drop tenants."""
        session = f"rag-{uuid.uuid4().hex}"
        chunks = chunk_words(text, ChunkConfig(chunk_words_per_passage, 0))
        if not chunks:
            raise ValueError("the long input has no words to chunk")
        passages = [Passage(-1, chunk, title, "rag-ephemeral", (session,),
                            {SESSION_KEY: session, "chunk": str(n)}) for n, chunk in enumerate(chunks)]
        self.backend.create_tenant(session)
        try:
            self.backend.upsert(passages)
            yield {"tenant": session, "metadata_filter": {SESSION_KEY: session}}
        finally:
            self.backend.drop_tenant(session)
