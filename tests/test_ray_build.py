"""`datastore build --ray` on a local Ray: same passages, ids and vectors as a local build."""

import numpy as np
import pytest

from datastore.build import BuildConfig, build
from datastore.chunking import ChunkConfig
from datastore.manifest import Manifest
from datastore.store import open_datastore

ray = pytest.importorskip("ray", reason="ray[data] is part of the dev install")


def _content(directory):
    with open_datastore(directory) as ds:
        rows = sorted((p.id, p.title, p.text) for s in ds.shards for p in s.iter_passages())
        ids = np.concatenate([i for s in ds.shards for i, _, _ in s.iter_vectors()])
        vecs = np.concatenate([v for s in ds.shards for _, v, _ in s.iter_vectors()])
    order = np.argsort(ids)
    return rows, ids[order], vecs[order]


def test_ray_build_equals_local_build(tmp_path, wiki_jsonl, encoder):
    common = dict(shards=2, chunk=ChunkConfig(64, 0), limit_docs=25, batch_passages=8, progress=False)
    build(BuildConfig([str(wiki_jsonl)], tmp_path / "local", **common), encoder_factory=lambda: encoder)
    try:
        summary = build(BuildConfig([str(wiki_jsonl)], tmp_path / "ray", ray="local", embed_actors=1,
                                    ray_window=3, **common))
    finally:
        ray.shutdown()
    assert summary.embedded == summary.passages > 25
    rows_a, ids_a, vec_a = _content(tmp_path / "local")
    rows_b, ids_b, vec_b = _content(tmp_path / "ray")
    assert rows_a == rows_b
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(vec_a, vec_b, atol=2e-3)
    a, b = Manifest.load(tmp_path / "local"), Manifest.load(tmp_path / "ray")
    assert (a.model, a.counts, a.index, a.num_shards) == (b.model, b.counts, b.index, b.num_shards)
    with open_datastore(tmp_path / "ray", encoder_factory=lambda n: encoder) as ds:
        assert ds.search(["painting"], k=3)[0]
