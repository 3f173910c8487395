"""Bounded soak: 32 clients mix searches, upserts, reads and deletes through a router over
shard servers with replicas, while one replica after another is SIGKILLed and restarted.

    python -m bench.soak [--seconds 600] [--clients 32] [--kill-every 60] [--down-seconds 10]

Two shard servers (shards 0,1 and 2,3), each with two replicas on separate copies of the
data, behind `datastore serve --router`. Replicas a2 and b2 take turns being killed and
restarted with `--seed-from` their live peer, so they resync and rejoin the rotation (the
router's view of its replicas, sampled from Stats, shows when). a1, b1 and the router live
throughout: their RSS from the baseline (minute 2, or a third of a shorter run) to the end
measures growth, and their open file descriptors and threads, sampled from /proc, show
leaks. The router's policy (partial results off) allows no failed request while one replica
of every server is up, so every failed call counts. Reads of a passage the client itself
wrote that come back NOT_FOUND are counted apart as stale reads (a replica serving reads
that missed a write).

Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIM = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_dataset(directory: Path, n: int, shards: int = 4, seed: int = 0) -> Path:
    from datastore.build import BuildConfig, build
    from datastore.dedup import DedupConfig

    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(directory / "v.npy", x)
    (directory / "p.jsonl").write_text("".join(f'{{"text": "passage {i}"}}\n' for i in range(n)))
    out = directory / "ds"
    build(
        BuildConfig(
            [str(directory / "p.jsonl")],
            out,
            embeddings=directory / "v.npy",
            shards=shards,
            vector_dtype="float32",
            dedup=DedupConfig(exact=False, near=False),
            progress=False,
        )
    )
    return out


class Proc:
    """One `datastore serve` subprocess on a fixed port (a restart binds the same one)."""

    def __init__(self, name: str, args: list[str], port: int) -> None:
        self.name, self.args, self.port = name, args, port
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, extra: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "datastore.cli", "serve", *self.args, *extra, "--port", str(self.port)],
            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
            stderr=subprocess.PIPE,
            text=True,
        )
        self.starts += 1

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None and self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited: {self.proc.stderr.read()}")
            if re.search(r"serving .* on ", line):
                threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()
                return
        raise TimeoutError(f"{self.name} did not start")

    @staticmethod
    def _drain(proc: subprocess.Popen) -> None:
        for _ in proc.stderr:  # keep the pipe from filling up (the router logs missed writes)
            pass

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def sample(self) -> dict | None:
        """RSS (bytes), threads and open fds from /proc; None while it is down."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        pid = self.proc.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
            anon = int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024
            threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, AttributeError):
            return None
        return {"rss": rss, "anon": anon, "threads": threads, "fds": fds, "pid": pid}


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: Counter = field(default_factory=Counter)
    failure_examples: list[str] = field(default_factory=list)
    stale_reads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, op: str, seconds: float) -> None:
        with self.lock:
            self.latencies[op].append(seconds)

    def fail(self, op: str, e: Exception) -> None:
        with self.lock:
            self.failures[f"{op}:{type(e).__name__}"] += 1
            if len(self.failure_examples) < 10:
                self.failure_examples.append(f"{op}: {type(e).__name__}: {e}"[:300])


def _client_loop(address: str, n_base: int, seed: int, stop: threading.Event, tally: Tally) -> None:
    from datastore.errors import NotFound
    from datastore.records import Passage
    from service.client import DatastoreClient

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    mine: list[int] = []  # passages this client wrote and has not deleted
    with DatastoreClient(address, timeout=15) as c:
        while not stop.is_set():
            roll = rng.random()
            t = time.monotonic()
            try:
                if roll < 0.70:
                    op = "search"
                    q = nrng.standard_normal((rng.choice([1, 1, 4]), DIM)).astype(np.float32)
                    rows = c.search(list(q), k=10, include_text=rng.random() < 0.5)
                    assert all(len(r) == 10 for r in rows), "a search returned fewer than k hits"
                elif roll < 0.82 or not mine:
                    op = "upsert"
                    n = rng.randint(1, 4)
                    v = nrng.standard_normal((n, DIM)).astype(np.float32)
                    ids = c.upsert([Passage(-1, f"soak {seed} {rng.random()}") for _ in range(n)], v)
                    assert len(set(ids)) == n and min(ids) >= n_base
                    mine.extend(ids)
                elif roll < 0.91:
                    op = "get"
                    pick = rng.sample(mine, min(len(mine), 3))
                    try:
                        got = c.get_passages(pick)
                        assert [p.id for p in got] == pick
                    except NotFound:
                        with tally.lock:
                            tally.stale_reads += 1
                else:
                    op = "delete"
                    pick = [
                        mine.pop(rng.randrange(len(mine))) for _ in range(min(len(mine), rng.randint(1, 4)))
                    ]
                    c.delete(pick)
                tally.ok(op, time.monotonic() - t)
            except Exception as e:  # noqa: BLE001  # every failure is counted; the policy allows none
                tally.fail(op, e)
            if len(mine) > 40:  # keep the live set bounded so memory can settle
                pick, mine[:] = mine[:20], mine[20:]
                try:
                    c.delete(pick)
                except Exception as e:  # noqa: BLE001
                    tally.fail("delete", e)


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else 0.0


def soak(
    seconds: float = 600,
    resync: bool = True,
    clients: int = 32,
    kill_every: float = 60,
    down_seconds: float = 10,
    n: int = 20_000,
    workdir: Path | None = None,
    sample_every: float = 5.0,
) -> dict:
    """Run the soak (see the module docstring) and return its report."""
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="soak-")) if workdir is None else workdir
    procs: dict[str, Proc] = {}
    try:
        base = build_dataset(workdir, n)
        for name, shards in (("a1", "0,1"), ("a2", "0,1"), ("b1", "2,3"), ("b2", "2,3")):
            copy = workdir / f"replica-{name}"
            shutil.copytree(base, copy)  # replicas are separate copies of the data
            procs[name] = Proc(
                name,
                [str(copy), "--shards", shards, "--workers", "16", "--flush-seconds", "30"],
                _free_port(),
            )
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.wait_ready()
        router = Proc(
            "router",
            [
                "--router",
                "--shard",
                f"{procs['a1'].address},{procs['a2'].address}",
                "--shard",
                f"{procs['b1'].address},{procs['b2'].address}",
                "--workers",
                "32",
                "--per-shard-timeout",
                "5",
            ],
            _free_port(),
        )
        router.start()
        router.wait_ready()
        procs["router"] = router

        tally, stop = Tally(), threading.Event()
        timeline: list[dict] = []
        events: list[str] = []
        baseline_at = min(120.0, seconds / 3)
        t0 = time.monotonic()

        def sample() -> None:
            while True:
                now = time.monotonic() - t0
                timeline.append({"t": round(now, 1), **{k: p.sample() for k, p in procs.items()}})
                if stop.wait(sample_every):
                    timeline.append(
                        {"t": round(time.monotonic() - t0, 1), **{k: p.sample() for k, p in procs.items()}}
                    )
                    return

        def chaos() -> None:
            """Kill a2 and b2 in turn: first at half a period, then every kill_every seconds;
            with `resync`, restart them seeded from their live peer (--seed-from)."""
            turn, wait = 0, kill_every / 2
            while not stop.wait(wait):  # kills at kill_every / 2 + turn * kill_every
                victim, peer = (("a2", "a1"), ("b2", "b1"))[turn % 2]
                procs[victim].kill()
                events.append(f"{time.monotonic() - t0:.1f}s kill {victim}")
                stop.wait(down_seconds)
                procs[victim].start(("--seed-from", procs[peer].address) if resync else ())
                procs[victim].wait_ready()
                events.append(f"{time.monotonic() - t0:.1f}s restarted {victim}")
                turn += 1
                wait = max(0.5, kill_every / 2 + turn * kill_every - (time.monotonic() - t0))

        def replica_view() -> None:
            """The router's view of its replicas (Stats.replicas): which are down or stale."""
            import grpc

            from service.pb import datastore_pb2 as pb
            from service.pb import datastore_pb2_grpc as pb_grpc

            names = {p.address: k for k, p in procs.items()}
            with grpc.insecure_channel(router.address) as ch:
                stub = pb_grpc.DatastoreStub(ch)
                while not stop.wait(sample_every):
                    try:
                        reps = stub.Stats(pb.StatsRequest(), timeout=10).replicas
                    except grpc.RpcError as e:
                        replicas.append((round(time.monotonic() - t0, 1), f"Stats failed: {e.code().name}"))
                        continue
                    out = sorted(
                        f"{names.get(r.address, r.address)}:{'down' if not r.healthy else 'stale'}"
                        for r in reps
                        if not r.healthy or r.stale
                    )
                    replicas.append((round(time.monotonic() - t0, 1), ",".join(out) or "all in sync"))

        replicas: list[tuple[float, str]] = []
        threads = [threading.Thread(target=f, daemon=True) for f in (sample, chaos, replica_view)]
        threads += [
            threading.Thread(
                target=_client_loop, args=(router.address, n, 1000 + i, stop, tally), daemon=True
            )
            for i in range(clients)
        ]
        for th in threads:
            th.start()
        stop.wait(seconds)
        stop.set()
        for th in threads:
            th.join(timeout=60)
        out = _report(seconds, clients, tally, timeline, events, baseline_at)
        # the router's replica view, where it changed
        out["replica_view"] = [
            f"{t}s {v}" for n, (t, v) in enumerate(replicas) if n == 0 or v != replicas[n - 1][1]
        ]
        return out
    finally:
        for p in procs.values():
            p.stop()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def _report(
    seconds: float, clients: int, tally: Tally, timeline: list[dict], events: list[str], baseline_at: float
) -> dict:
    all_lat = [x for v in tally.latencies.values() for x in v]
    by_op = {
        op: {"n": len(v), "p50_ms": _pct(v, 50), "p99_ms": _pct(v, 99)}
        for op, v in sorted(tally.latencies.items())
    }
    procs = {}
    for name in ("router", "a1", "b1", "a2", "b2"):
        points = [(row["t"], row[name]) for row in timeline if row.get(name)]
        if not points:
            continue
        base = next((s for t, s in points if t >= baseline_at), points[-1][1])
        end = points[-1][1]
        same = base["pid"] == end["pid"]
        procs[name] = {
            "rss_mb_baseline": round(base["rss"] / 2**20, 1),
            "rss_mb_end": round(end["rss"] / 2**20, 1),
            "rss_growth_pct": round(100 * (end["rss"] - base["rss"]) / base["rss"], 2) if same else None,
            # anonymous memory (heap): RSS also counts pages of LMDB's file mapping a read touched
            "anon_mb_baseline": round(base["anon"] / 2**20, 1),
            "anon_mb_end": round(end["anon"] / 2**20, 1),
            "anon_growth_pct": round(100 * (end["anon"] - base["anon"]) / base["anon"], 2) if same else None,
            "anon_mb_over_time": [round(s["anon"] / 2**20, 1) for _, s in points][
                :: max(1, len(points) // 20)
            ],
            "fds_baseline": base["fds"],
            "fds_end": end["fds"],
            "fds_max": max(s["fds"] for _, s in points),
            "threads_baseline": base["threads"],
            "threads_end": end["threads"],
            "threads_max": max(s["threads"] for _, s in points),
            "restarted": not same,
            "fds_over_time": [s["fds"] for _, s in points][:: max(1, len(points) // 20)],
            "threads_over_time": [s["threads"] for _, s in points][:: max(1, len(points) // 20)],
        }
    failed = sum(tally.failures.values())
    return {
        "seconds": seconds,
        "clients": clients,
        "requests": len(all_lat) + failed,
        "failed_requests": failed,
        "failed_beyond_policy": failed,
        "failures": dict(tally.failures),
        "failure_examples": tally.failure_examples,
        "stale_reads": tally.stale_reads,
        "qps": round((len(all_lat) + failed) / seconds, 1),
        "p50_ms": _pct(all_lat, 50),
        "p99_ms": _pct(all_lat, 99),
        "by_op": by_op,
        "events": events,
        "baseline_at_s": baseline_at,
        "processes": procs,
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--kill-every", type=float, default=60)
    ap.add_argument("--down-seconds", type=float, default=10)
    ap.add_argument("--passages", type=int, default=20_000)
    ap.add_argument("--no-resync", action="store_true", help="restart killed replicas without --seed-from")
    args = ap.parse_args(argv)
    print(
        json.dumps(
            soak(
                args.seconds,
                not args.no_resync,
                args.clients,
                args.kill_every,
                args.down_seconds,
                args.passages,
            )
        )
    )


if __name__ == "__main__":
    main()
