"""SIGKILL each write path at seeded random moments, reopen, check what survived.

The harness is bench/crash.py (its command runs >= 20 kills per path); here each path is
killed a few times, and the checks themselves are shown to catch a broken datastore.
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

from bench import crash
from datastore.store import open_datastore

UPDATE_PATHS = ("upsert", "delete", "grant_revoke", "spann")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("crash")


@pytest.mark.parametrize("path", UPDATE_PATHS)
def test_killed_update_path_keeps_every_acknowledged_write(work, path):
    base = crash.make_base(path, work / path)
    rng = random.Random(path)
    longest = 3.0 if path == "spann" else 1.2  # SPANN inserts (with their splits) are slower
    results = [crash.kill_update_path(path, base, work / path, seed, rng.uniform(longest / 3, longest))
               for seed in range(2)]
    assert all(r.killed for r in results)
    assert [v for r in results for v in r.violations] == []
    assert sum(r.acked for r in results) > 0  # the kills landed after some acknowledged writes
    if path == "spann":  # an acknowledged insert split lists (the base's lists are over max_posting)
        for seed, r in enumerate(results):
            ops = crash.plan(path, seed)
            if any(next(ops).kind == "upsert" for _ in range(r.acked)):
                assert r.info["heads_max"] > r.info["heads_first"], r.info


@pytest.mark.parametrize("path,chain", [("build", 2), ("binary", 1)])
def test_killed_build_resumes_to_the_one_shot_result(work, path, chain):
    ref, est = crash.reference_build(path, work / path)
    results = crash.kill_build_path(path, ref, est, work / path, seed=1, rng=random.Random(path), chain=chain)
    assert [v for r in results for v in r.violations] == []
    assert any(r.killed for r in results)


def test_the_checks_catch_a_lost_write_and_a_stale_index(work, tmp_path):
    """The harness must be able to fail: drop a passage behind the model's back, then drop
    one from the index only."""
    base = crash.make_base("upsert", work / "upsert")
    d = tmp_path / "ds"
    shutil.copytree(base, d)
    model = crash.base_model()
    with open_datastore(d) as ds:
        assert crash.check_against_model(ds, model, None) == []
        assert crash.check_index(ds, {}) == []
        ds.indexes[0].remove(np.array([next(p.id for p in ds.shards[0].iter_passages())]))
        assert any("not found by its own vector" in v or "index holds" in v for v in crash.check_index(ds, {}))
        victim = next(p.id for p in ds.shards[1].iter_passages())
        ds.shards[1].delete([victim])
        assert any("shard 1" in v for v in crash.check_against_model(ds, model, None))


@pytest.mark.slow
def test_twenty_kills_per_path(tmp_path):
    out = crash.run(list(crash.PATHS), kills=20, seed=0, work=tmp_path)
    assert out["violations"] == 0, out
    assert all(p["kills"] >= 20 for p in out["paths"].values())
