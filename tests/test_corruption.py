"""Damaged or foreign files: opening fails with a DatastoreError naming the file, never a
crash or a silent wrong answer."""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

from bench import crash
from datastore.errors import DatastoreError, FailedPrecondition
from datastore.integrity import CHECKSUMS_FILE, deep_check
from datastore.store import open_datastore

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return crash.make_base("upsert", tmp_path_factory.mktemp("corrupt"))


@pytest.fixture
def ds_dir(base, tmp_path) -> Path:
    d = tmp_path / "ds"
    shutil.copytree(base, d)
    return d


def _refused(d: Path, names: str) -> FailedPrecondition:
    """The open fails naming `names`; returns a copy of the error without its traceback
    (which holds the half-opened datastore: Datastore.__init__ leaves its shards for the
    garbage collector when a later step fails)."""
    with pytest.raises(FailedPrecondition) as e:
        open_datastore(d).close()
    err = FailedPrecondition(str(e.value), hint=e.value.hint)
    del e
    gc.collect()
    assert names in str(err), str(err)
    return err


def _answers_right(d: Path) -> None:
    with open_datastore(d) as ds:
        assert crash.check_against_model(ds, crash.base_model(), None) == []
        assert crash.check_index(ds, {}) == []


# -- manifest -------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "garble", "edit", "empty", "not_an_object"])
def test_damaged_manifest_is_refused_naming_it(ds_dir, damage):
    m = ds_dir / "manifest.json"
    text = m.read_bytes()
    m.write_bytes({"truncate": text[: len(text) // 2], "garble": bytes(random.Random(1).randbytes(len(text))),
                   "edit": text.replace(b'"num_shards": 2', b'"num_shards": 1'), "empty": b"",
                   "not_an_object": b"[1, 2, 3]"}[damage])
    err = _refused(ds_dir, str(m))
    if damage == "edit":
        assert "checksum" in str(err)


def test_manifest_without_checksum_still_opens(ds_dir):
    """Manifests written before checksums carry none: accepted as they are."""
    m = ds_dir / "manifest.json"
    d = json.loads(m.read_text())
    del d["checksum"]
    m.write_text(json.dumps(d))
    _answers_right(ds_dir)


# -- LMDB shards ----------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.5, 100])
def test_truncated_shard_is_refused_naming_it(ds_dir, keep):
    data = ds_dir / "shard-0000" / "data.mdb"
    size = data.stat().st_size
    os.truncate(data, int(size * keep) if keep < 1 else keep)
    _refused(ds_dir, str(data))


def test_garbled_meta_pages_are_refused_naming_the_file(ds_dir):
    data = ds_dir / "shard-0001" / "data.mdb"
    b = bytearray(data.read_bytes())
    b[: 2 * PAGE] = random.Random(2).randbytes(2 * PAGE)
    data.write_bytes(bytes(b))
    _refused(ds_dir, str(data))


GARBLE_CHILD = r"""
import json, random, shutil, sys
from pathlib import Path
import numpy as np
from bench import crash
from datastore.errors import DatastoreError
from datastore.store import open_datastore
base, work, seeds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for seed in range(seeds):
    rng = random.Random(seed)
    d = work / str(seed)
    shutil.copytree(base, d)
    f = d / f"shard-000{seed % 2}" / "data.mdb"
    b = bytearray(f.read_bytes())
    how = ("page", "bytes", "bit")[seed % 3]
    if how == "page":
        p = rng.randrange(2, len(b) // 4096)
        b[p * 4096:(p + 1) * 4096] = rng.randbytes(4096)
    else:
        for _ in range(8 if how == "bytes" else 1):
            o = rng.randrange(2 * 4096, len(b))
            b[o] = rng.randrange(256) if how == "bytes" else b[o] ^ (1 << rng.randrange(8))
    f.write_bytes(bytes(b))
    print(json.dumps({"seed": seed, "how": how}), flush=True)  # the last line names a seed that crashed
    try:
        with open_datastore(d) as ds:
            problems = crash.check_against_model(ds, crash.base_model(), None) + crash.check_index(ds, {})
        out = {"outcome": "wrong" if problems else "intact", "problems": problems[:2]}
    except DatastoreError as e:
        out = {"outcome": "refused", "names_file": str(f) in str(e), "message": str(e)[:200]}
    except Exception as e:
        out = {"outcome": "raw", "message": f"{type(e).__name__}: {e}"[:200]}
    print(json.dumps({"seed": seed, **out}), flush=True)
    shutil.rmtree(d)
"""


def test_garbled_data_pages_never_crash_or_answer_wrong(base, tmp_path):
    """Random pages, bytes and single bits of shard data files garbled: each open either
    answers exactly right (the damage hit free space) or fails naming the file. Run in a
    child so that a segfault shows as a failure here, not as a dead test run."""
    seeds = 15
    r = subprocess.run([sys.executable, "-c", GARBLE_CHILD, str(base), str(tmp_path), str(seeds)], check=False,
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 0, f"child died ({r.returncode}) after {lines[-1:]}: {r.stderr[-1500:]}"
    results = [x for x in lines if "outcome" in x]
    assert len(results) == seeds
    assert [x for x in results if x["outcome"] in ("wrong", "raw")] == []
    refused = [x for x in results if x["outcome"] == "refused"]
    assert refused and all(x["names_file"] for x in refused), refused
    assert any("checksum" in x["message"] for x in refused)  # record checksums caught a flipped value


def test_deep_check_reads_every_record_in_a_child(ds_dir):
    counts = deep_check(ds_dir / "shard-0000")
    assert counts["passages"] == counts["vectors"] > 0
    data = ds_dir / "shard-0000" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(FailedPrecondition, match="data.mdb"):
        deep_check(ds_dir / "shard-0000")


# -- foreign files --------------------------------------------------------------------------------

def test_a_file_in_place_of_a_shard_directory(ds_dir):
    shutil.rmtree(ds_dir / "shard-0001")
    (ds_dir / "shard-0001").write_text("not a shard")
    _refused(ds_dir, str(ds_dir / "shard-0001"))


def test_random_bytes_in_place_of_a_shard_file(ds_dir):
    data = ds_dir / "shard-0000" / "data.mdb"
    data.write_bytes(random.Random(3).randbytes(data.stat().st_size))
    _refused(ds_dir, str(data))


def test_another_lmdb_in_place_of_a_shard(ds_dir):
    data = ds_dir / "shard-0000" / "data.mdb"
    shutil.rmtree(ds_dir / "shard-0000")
    env = lmdb.open(str(ds_dir / "shard-0000"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    _refused(ds_dir, str(data))
    with lmdb.open(str(ds_dir / "shard-0000"), readonly=True) as env, env.begin() as txn:
        assert list(txn.cursor()) == [(b"hello", b"world")]  # the foreign file was left untouched


def test_a_shard_of_another_datastore_or_slot_is_refused(ds_dir, tmp_path):
    other = crash.make_base("upsert", tmp_path / "other")  # same shape, another datastore
    shutil.rmtree(ds_dir / "shard-0001")
    shutil.copytree(other / "shard-0001", ds_dir / "shard-0001")
    err = _refused(ds_dir, str(ds_dir / "shard-0001" / "data.mdb"))
    assert "datastore_id" in str(err)
    shutil.rmtree(ds_dir / "shard-0001")
    shutil.copytree(ds_dir / "shard-0000", ds_dir / "shard-0001")  # our own shard 0 in slot 1
    assert "shard_id" in str(_refused(ds_dir, str(ds_dir / "shard-0001" / "data.mdb")))


def test_damaged_control_store_is_refused_naming_it(ds_dir):
    data = ds_dir / "control" / "data.mdb"
    b = bytearray(data.read_bytes())
    b[: 2 * PAGE] = bytes(2 * PAGE)
    data.write_bytes(bytes(b))
    _refused(ds_dir, str(data))


# -- saved indexes --------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "checksums"])
def test_damaged_index_file_is_refused_naming_it(ds_dir, damage):
    d = ds_dir / "shard-0000" / "index"
    victim = d / ("flat.faiss" if damage != "checksums" else CHECKSUMS_FILE)
    assert victim.exists(), sorted(p.name for p in d.iterdir())
    b = bytearray(victim.read_bytes())
    if damage == "flip":
        b[len(b) // 2] ^= 0x10
        victim.write_bytes(bytes(b))
    elif damage == "truncate":
        victim.write_bytes(bytes(b[:-8]))
    elif damage == "missing":
        victim.unlink()
    else:
        victim.write_text("{not json")
    err = _refused(ds_dir, str(victim))
    assert f"remove {d}" in err.hint
    shutil.rmtree(d)  # what the hint says: the index is rebuilt from LMDB
    _answers_right(ds_dir)


def test_index_saved_without_checksums_still_opens(ds_dir):
    for shard in ("shard-0000", "shard-0001"):
        (ds_dir / shard / "index" / CHECKSUMS_FILE).unlink()
    _answers_right(ds_dir)


def test_damaged_binarizer_weights_are_refused_naming_them(tmp_path):
    ref, _ = crash.reference_build("binary", tmp_path)
    d = ref / "shard-0001" / "index"
    weights = sorted(d.glob("*.pt"))
    assert weights, sorted(p.name for p in d.iterdir())
    b = bytearray(weights[0].read_bytes())
    b[len(b) // 2] ^= 0x01
    weights[0].write_bytes(bytes(b))
    _refused(ref, str(weights[0]))


def test_every_open_error_is_a_datastore_error(ds_dir):
    """The open path never leaks a raw LMDB or decoding error for any of the files above."""
    for name in ("manifest.json", "shard-0000/data.mdb", "shard-0000/index/flat.faiss", "control/data.mdb"):
        d = ds_dir.parent / f"each-{name.replace('/', '-')}"
        shutil.copytree(ds_dir, d)
        f = d / name
        f.write_bytes(np.random.default_rng(5).bytes(f.stat().st_size))
        with pytest.raises(DatastoreError) as e:
            open_datastore(d).close()
        assert str(f) in str(e.value), str(e.value)
        del e
        gc.collect()
