"""The datastore as a retriever in LangChain and LlamaIndex (optional extras).

Both frameworks are imported only when an adapter is asked for, so neither is a dependency
of the plugin; each document carries the passage id (as the framework's id and in its
metadata) and the search score, so answers can cite what they read.
"""

from __future__ import annotations

from typing import Any

from datastore.records import Hit
from rag.retriever import Retriever, hit_text


def _metadata(hit: Hit) -> dict[str, Any]:
    p = hit.passage
    meta: dict[str, Any] = dict(p.metadata) if p is not None else {}
    meta.update({"id": hit.id, "score": float(hit.score), "title": hit.title,
                 "source": p.source if p is not None else ""})
    return meta


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this adapter needs {package}: pip install {package}") from e


def as_langchain(retriever: Retriever, k: int | None = None):
    """A `langchain_core` BaseRetriever over `retriever` (k defaults to its config's)."""
    lc_retrievers = _require("langchain_core.retrievers", "langchain-core")
    lc_documents = _require("langchain_core.documents", "langchain-core")

    class DatastoreRetriever(lc_retrievers.BaseRetriever):
        """LangChain view of a rag.Retriever."""

        source: Any
        k: int | None = None

        def _get_relevant_documents(self, query: str, *, run_manager=None) -> list:
            hits = self.source.retrieve([query], k=self.k)[0]
            return [lc_documents.Document(page_content=hit_text(h), metadata=_metadata(h), id=str(h.id))
                    for h in hits]

    return DatastoreRetriever(source=retriever, k=k)


def as_llamaindex(retriever: Retriever, k: int | None = None):
    """A `llama_index.core` BaseRetriever over `retriever` (k defaults to its config's)."""
    li_retrievers = _require("llama_index.core.retrievers", "llama-index-core")
    li_schema = _require("llama_index.core.schema", "llama-index-core")

    class DatastoreRetriever(li_retrievers.BaseRetriever):
        """LlamaIndex view of a rag.Retriever."""

        def __init__(self, source: Retriever, k: int | None) -> None:
            super().__init__()
            self._source, self._k = source, k

        def _retrieve(self, query_bundle) -> list:
            hits = self._source.retrieve([query_bundle.query_str], k=self._k)[0]
            return [li_schema.NodeWithScore(node=li_schema.TextNode(text=hit_text(h), id_=str(h.id),
                                                                    metadata=_metadata(h)),
                                            score=float(h.score)) for h in hits]

    return DatastoreRetriever(retriever, k)
