"""Retrieval datastore: passages and embeddings sharded on LMDB, searched through one index protocol."""

__version__ = "0.1.0"
