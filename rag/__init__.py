"""Retrieval-augmented generation over the datastore: a retriever, an in-context
retrieval-augmented LM (MassiveDS) and a retrieval-fed speculative drafter (RAPID).

Talks to the datastore only through `DatastoreClient` (served) or `Datastore` (embedded).
Names load on first use (PEP 562), so `datastore --help` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rag.lm import RALMConfig, RetrievalAugmentedLM
    from rag.retriever import Retriever, RetrieverConfig
    from rag.speculative import SpeculativeConfig, SpeculativeRAG

_HOMES = {"Retriever": "rag.retriever", "RetrieverConfig": "rag.retriever",
          "RetrievalAugmentedLM": "rag.lm", "RALMConfig": "rag.lm",
          "SpeculativeRAG": "rag.speculative", "SpeculativeConfig": "rag.speculative"}

__all__ = ["Retriever", "RetrieverConfig", "RetrievalAugmentedLM", "RALMConfig", "SpeculativeRAG",
           "SpeculativeConfig"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'rag' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
