"""Hostile input against a real server: hypothesis-drawn calls over every RPC (malformed
messages, raw bytes, huge batches and k, bad vectors, unicode edge cases, huge metadata,
invalid tenants and ids, oversized streams), with and without API keys. Every call must
answer within its deadline with a documented status code, never echo the caller's key, and
the server must answer a normal search exactly as before. bench/fuzz.py runs >= 10,000."""

from __future__ import annotations

from bench.fuzz import Target, fuzz_and_check

DIM = 384


def _check(out: dict) -> None:
    assert out["crashes"] == 0 and out["hangs"] == 0 and out["undocumented_codes"] == 0, out["failures"]
    assert out["key_echoes"] == 0, out["failures"]
    assert out["serving_after"] and out["probe_same"], out
    # the fuzz reached past the front door: some calls were accepted, many refused as bad input
    assert out["by_code"].get("OK", 0) > 0 and out["by_code"].get("INVALID_ARGUMENT", 0) > 0, out["by_code"]


def test_fuzz_without_keys_keeps_the_server_healthy(server):
    _, store, port = server
    out = fuzz_and_check(
        Target(f"127.0.0.1:{port}", DIM, store._next_id, heavy=False),
        requests=300,
        rng_seed=1,
        stop_on_failure=True,
    )
    _check(out)
    assert out["requests"] >= 300


def test_fuzz_with_keys_keeps_the_server_healthy(server):
    _, store, port = server
    store.create_tenant("acme")
    keys = {"admin": store.control.create_key(None)[0], "tenant": store.control.create_key("acme")[0]}
    out = fuzz_and_check(
        Target(f"127.0.0.1:{port}", DIM, store._next_id, ("acme",), keys, heavy=False),
        requests=150,
        rng_seed=2,
        stop_on_failure=True,
    )
    _check(out)
    assert out["by_code"].get("UNAUTHENTICATED", 0) > 0 and out["by_code"].get("PERMISSION_DENIED", 0) > 0
