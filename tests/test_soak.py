"""A short soak (bench/soak.py runs the 10-minute one): 32 clients mixing searches, upserts,
reads and deletes through a router over two shard servers with two replicas each, while a
replica is SIGKILLed and restarted twice. No request may fail (one replica of every server
is always up, so the default policy allows no failure), and the processes that live through
the run must not leak file descriptors or threads."""

from __future__ import annotations

from bench.soak import soak


def test_short_soak_fails_no_request_and_leaks_nothing(tmp_path):
    out = soak(
        seconds=30, clients=32, kill_every=12, down_seconds=3, n=3000, workdir=tmp_path, sample_every=2.0
    )
    assert out["failed_beyond_policy"] == 0, (out["failures"], out["failure_examples"])
    assert out["requests"] > 200 and out["by_op"]["upsert"]["n"] > 0 and out["by_op"]["delete"]["n"] > 0
    kills = sum("kill" in e for e in out["events"])
    assert kills >= 2 and sum("restarted" in e for e in out["events"]) == kills, out["events"]
    for name in ("router", "a1", "b1"):  # alive from start to end
        p = out["processes"][name]
        assert not p["restarted"]
        assert p["fds_end"] <= p["fds_baseline"] + 4, (name, p["fds_over_time"])
        assert p["threads_end"] <= p["threads_baseline"] + 8, (name, p["threads_over_time"])
