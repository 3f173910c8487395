"""Vector indexes as pure algorithms over numpy: one protocol, one module per kind."""

from index.base import IndexStats, SearchParams, SearchResult, VectorIndex
from index.registry import INDEX_KINDS, create_index, load_index

__all__ = ["IndexStats", "SearchParams", "SearchResult", "VectorIndex", "INDEX_KINDS", "create_index", "load_index"]
