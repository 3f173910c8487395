"""Shared fixtures: the real model (loaded once), a small real corpus, a built datastore,
and a real gRPC server on a loopback port."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datastore.build import BuildConfig, build  # noqa: E402
from datastore.corpus import iter_default_corpus  # noqa: E402
from datastore.encoder import Encoder  # noqa: E402

CORPUS_DOCS = 60


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    return Encoder()


@pytest.fixture(scope="session")
def wiki_docs() -> list[dict]:
    """The first articles of the default corpus, as JSONL records."""
    return [{"id": a.doc_id, "title": a.title, "text": a.text, "source": a.source, "metadata": a.metadata}
            for a in iter_default_corpus(CORPUS_DOCS)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def wiki_jsonl(tmp_path_factory, wiki_docs) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "wiki.jsonl", wiki_docs)


@pytest.fixture(scope="session")
def built_dir(tmp_path_factory, wiki_jsonl, encoder) -> Path:
    """A two-shard datastore of the corpus, built once per session; tests must not modify it."""
    out = tmp_path_factory.mktemp("built") / "ds"
    build(BuildConfig([str(wiki_jsonl)], out, shards=2, progress=False, chunk=_chunk(64)),
          encoder_factory=lambda: encoder)
    return out


def _chunk(words: int):
    from datastore.chunking import ChunkConfig
    return ChunkConfig(words, 0)


@pytest.fixture
def store_copy(tmp_path, built_dir):
    """A private, writable copy of the built datastore."""
    import shutil
    dst = tmp_path / "ds"
    shutil.copytree(built_dir, dst)
    return dst


@pytest.fixture
def open_store(store_copy, encoder):
    from datastore.store import open_datastore
    ds = open_datastore(store_copy, encoder_factory=lambda name: encoder)
    yield ds
    ds.close()


@pytest.fixture
def server(open_store):
    """(client, store) with a real server on a free loopback port."""
    from service.client import DatastoreClient
    from service.server import ServerConfig, create_server, stop_server
    config = ServerConfig(max_workers=4, max_message_bytes=4 * 1024 * 1024, grace_seconds=0.5)
    srv, port = create_server(open_store, "127.0.0.1:0", config)
    client = DatastoreClient(f"127.0.0.1:{port}", timeout=30)
    yield client, open_store, port
    client.close()
    stop_server(srv, config)
