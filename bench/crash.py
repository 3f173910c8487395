"""Crash consistency: run each write path in a child process, SIGKILL it at a seeded random
moment, reopen the datastore and check what survived.

    python -m bench.crash [--kills 20] [--paths build,upsert,...] [--seed 0]

prints one JSON object: kills and violations per path, in total, and the load average.
The tests in tests/test_crash_consistency.py run the same paths with a few kills each.

How it works. A path's workload is a seeded, endless sequence of operations (`plan`), so
the parent knows every operation the child may have run. The child prints `B n` before
operation n and `A n` once the call returned (the acknowledgement a client would get),
then flushes stdout. After the kill the parent replays the acknowledged operations on a
model and checks, shard by shard, that the stored passages equal the model either before
or after the one operation in flight (an upsert or access change is one LMDB transaction
per shard: atomic per shard, not across shards), and that the index agrees with LMDB:
every stored passage is found by its own vector by exactly the tenants that may see it,
no deleted passage is found, and the index holds as many entries as the shard.

The build paths kill `build()` and resume it (killing the resumes too, up to three times
in a chain), check that every committed passage is the one a one-shot build stores under
that id, and compare the finished datastore with a one-shot build: same ids, texts,
vectors, counts and search results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIM = 16
BASE_PASSAGES = 240
TENANTS = ("a", "b")
PATHS = ("build", "upsert", "delete", "grant_revoke", "spann", "binary")
#: Index parameters per path: SPANN with tiny lists so inserts split them; binary small and fast.
INDEX = {
    "build": ("flat", {}),
    "upsert": ("flat", {}),
    "delete": ("flat", {}),
    "grant_revoke": ("flat", {}),
    "spann": ("spann", {"head_ratio": 0.05, "max_posting": 12, "min_posting": 3, "replicas": 2}),
    "binary": ("binary", {"bits": 2, "epochs": 1, "train_sample": 240, "batch_size": 128}),
}
#: Exhaustive search parameters: every list probed, every candidate reranked, so "found by
#: its own vector" tests the index's content, not its recall.
EXHAUSTIVE = {"nprobe": 4096, "prune_epsilon": 1e9, "oversample": 2000.0}
#: Queries per search call (the datastore caps queries x nprobe per call).
QUERY_CHUNK = 32


def vector(i: int, version: int) -> np.ndarray:
    """The deterministic unit vector of passage i at a version (float16-exact, so what LMDB
    stores equals what the model expects)."""
    v = np.random.default_rng([i, version, 7]).standard_normal(DIM).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float16).astype(np.float32)


def text(i: int, version: int) -> str:
    return f"passage {i} version {version}"


# -- workloads ------------------------------------------------------------------------------------

@dataclass
class Op:
    kind: str  # upsert, delete, grant, revoke, create_tenant, flush, compact
    ids: list[int] = field(default_factory=list)
    version: int = 0
    tenant: str = ""
    tenants: tuple[str, ...] = ()


def plan(path: str, seed: int) -> Iterator[Op]:
    """The endless operation sequence of a path; parent and child draw the same one."""
    rng = random.Random(f"{path}:{seed}")
    n = 0
    next_new = BASE_PASSAGES
    while True:
        n += 1
        r = rng.random()
        if r < 0.08:
            yield Op("flush")
        elif path == "upsert":
            ids = rng.sample(range(BASE_PASSAGES + 200), rng.randint(1, 12))
            yield Op("upsert", sorted(ids), version=n, tenants=rng.choice([(), ("a",), ("a", "b")]))
        elif path == "delete":
            yield Op("delete", sorted(rng.sample(range(BASE_PASSAGES), rng.randint(1, 8))))
        elif path == "grant_revoke":
            if r < 0.14:
                yield Op("create_tenant", tenant=f"t{n}")
            else:
                yield Op("grant" if rng.random() < 0.5 else "revoke",
                         sorted(rng.sample(range(BASE_PASSAGES), rng.randint(1, 10))), tenant=rng.choice(TENANTS))
        elif path == "spann":
            if r < 0.6:  # fresh ids grow lists past max_posting: splits
                k = rng.randint(4, 16)
                yield Op("upsert", list(range(next_new, next_new + k)), version=n)
                next_new += k
            elif r < 0.9:
                yield Op("delete", sorted(rng.sample(range(next_new), rng.randint(1, 10))))
            else:  # merges of small lists (only compaction merges)
                yield Op("compact")
        else:
            raise ValueError(f"no operation plan for path {path!r}")


@dataclass
class Model:
    """What the datastore must hold: id -> (version, tenants), plus registered tenants."""

    passages: dict[int, tuple[int, tuple[str, ...]]]
    tenants: set[str]

    def copy(self) -> Model:
        return Model(dict(self.passages), set(self.tenants))

    def apply(self, op: Op) -> None:
        if op.kind == "upsert":
            for i in op.ids:
                self.passages[i] = (op.version, tuple(sorted(op.tenants)))
        elif op.kind == "delete":
            for i in op.ids:
                self.passages.pop(i, None)
        elif op.kind in ("grant", "revoke"):
            for i in op.ids:
                version, ts = self.passages[i]
                new = set(ts) | {op.tenant} if op.kind == "grant" else set(ts) - {op.tenant}
                if new != set(ts):
                    self.passages[i] = (version, tuple(sorted(new or {"_none"})))
        elif op.kind == "create_tenant":
            self.tenants.add(op.tenant)


def base_model() -> Model:
    return Model({i: (0, base_tenants(i)) for i in range(BASE_PASSAGES)}, set(TENANTS))


def base_tenants(i: int) -> tuple[str, ...]:
    return ((), ("a",), ("b",), ("a", "b"))[i % 4]


# -- the child ------------------------------------------------------------------------------------

def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def worker(path: str, directory: Path, seed: int) -> None:
    """Run a path's workload until killed (`build` paths: one build)."""
    if path in ("build", "binary"):
        from datastore.build import build
        if path == "binary":
            _load_torch()  # before "ready": the kills land in the build, not in imports
        cfg = build_config(path, directory.parent / "input", directory)
        _say("ready")
        build(cfg)
        _say("done")
        return
    from datastore.indexing import compact_index
    from datastore.records import Passage
    from datastore.store import open_datastore

    ds = open_datastore(directory)

    def heads() -> None:  # SPANN heads per shard: growth shows the lists were split
        if path == "spann":
            _say("heads " + " ".join(str(ix.stats().extra.get("heads", 0)) for ix in ds.indexes))

    _say("ready")
    heads()
    for n, op in enumerate(plan(path, seed)):
        _say(f"B {n}")
        if op.kind == "upsert":
            ds.upsert([Passage(i, text(i, op.version), tenants=op.tenants) for i in op.ids],
                      np.stack([vector(i, op.version) for i in op.ids]))
        elif op.kind == "delete":
            ds.delete(op.ids)
        elif op.kind == "grant":
            ds.grant(op.ids, op.tenant)
        elif op.kind == "revoke":
            ds.revoke(op.ids, op.tenant)
        elif op.kind == "create_tenant":
            ds.create_tenant(op.tenant)
        elif op.kind == "flush":
            ds.flush()
        elif op.kind == "compact":
            for slot, shard in enumerate(ds.shards):
                with ds._locks[slot]:
                    compact_index(shard, ds.indexes[slot])
        _say(f"A {n}")
        heads()


def _load_torch() -> None:
    """Import what a binary build loads lazily (torch, and the inductor module that
    torch.use_deterministic_algorithms pulls in: seconds on a loaded machine)."""
    import torch
    import torch._inductor

    import index.binarizer  # noqa: F401
    torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled())


# -- setup ----------------------------------------------------------------------------------------

def write_input(directory: Path, n: int) -> Path:
    """JSONL passages and their .npy vectors for a build of n passages."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "p.jsonl", "w") as f:
        f.writelines(json.dumps({"text": text(i, 0), "tenants": list(base_tenants(i))}) + "\n" for i in range(n))
    np.save(directory / "v.npy", np.stack([vector(i, 0) for i in range(n)]))
    return directory


def build_config(path: str, input_dir: Path, out: Path, batch: int = 8):
    from datastore.build import BuildConfig
    from datastore.dedup import DedupConfig

    kind, params = INDEX[path]
    return BuildConfig([str(input_dir / "p.jsonl")], out, embeddings=input_dir / "v.npy", shards=2,
                       index_kind=kind, index_params=dict(params), batch_passages=batch, progress=False,
                       dedup=DedupConfig(exact=False, near=False))


def make_base(path: str, work: Path) -> Path:
    """A built datastore for an update path (base passages, tenants registered)."""
    from datastore.build import build

    input_dir = write_input(work / "input", BASE_PASSAGES)
    out = work / "base"
    if not out.exists():
        build(build_config(path, input_dir, out, batch=64))
    return out


# -- the parent -----------------------------------------------------------------------------------

@dataclass
class KillResult:
    path: str
    seed: int
    killed: bool
    acked: int = 0
    in_flight: bool = False
    violations: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_child(path: str, directory: Path, seed: int, delay: float, timeout: float = 120.0) -> tuple[bool, list[str]]:
    """Start the child, SIGKILL it `delay` seconds after it says ready; (killed, stdout lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.crash", "worker", path, str(directory), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT,
                            bufsize=0)  # unbuffered: readline must not swallow lines communicate() needs
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline().decode()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{path} worker did not start: {line!r} {proc.stderr.read().decode()[-2000:]}")
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"{path} worker failed: {err.decode()[-2000:]}")
    text_out = out.decode()
    lines = text_out.split("\n")
    if not text_out.endswith("\n"):
        lines = lines[:-1]  # the kill cut the last line: it does not count
    return killed, [x for x in lines if x]


def read_state(ds) -> dict[int, tuple[str, tuple[str, ...], np.ndarray]]:
    """id -> (text, tenants, vector) of everything stored in the open shards."""
    out = {}
    for shard in ds.shards:
        ps = list(shard.iter_passages())
        vecs = shard.get_vectors([p.id for p in ps]) if ps else np.zeros((0, DIM), np.float32)
        for p, v in zip(ps, vecs):
            out[p.id] = (p.text, p.tenants, v)
    return out


def check_against_model(ds, prev: Model, nxt: Model | None) -> list[str]:
    """Per shard, stored passages equal `prev` or (the op in flight applied) `nxt`."""
    from datastore.sharding import shard_of

    state = read_state(ds)
    bad = []
    for slot, shard in enumerate(ds.shards):
        def mine(m: Model, shard=shard) -> dict:
            ids = np.fromiter(m.passages, np.int64, len(m.passages))
            keep = ids[shard_of(ids, ds.manifest.num_shards) == shard.shard_id] if len(ids) else ids
            return {int(i): m.passages[int(i)] for i in keep}

        have = {i: s for i, s in state.items() if shard_of(np.array([i]), ds.manifest.num_shards)[0] == shard.shard_id}
        options = [mine(prev)] + ([mine(nxt)] if nxt is not None else [])
        if not any(_same(have, want) for want in options):
            want = options[-1]
            diff = sorted(set(have) ^ set(want))[:5] or [i for i in want if i in have and not _same(
                {i: have[i]}, {i: want[i]})][:5]
            bad.append(f"shard {shard.shard_id}: stored passages match neither the acknowledged state nor the "
                       f"state after the operation in flight (first differing ids {diff})")
    return bad


def _same(have: dict, want: dict) -> bool:
    if set(have) != set(want):
        return False
    for i, (version, tenants) in want.items():
        t, ts, v = have[i]
        if t != text(i, version) or tuple(sorted(ts)) != tenants or not np.array_equal(v, vector(i, version)):
            return False
    return True


def check_index(ds, known: dict[int, int]) -> list[str]:
    """The index agrees with LMDB: each passage found by its own vector by exactly those
    who may see it; deleted ids never found; index size equals shard size."""
    from index import SearchParams

    bad = []
    params = SearchParams(**EXHAUSTIVE)

    def search(q: np.ndarray, tenant: str | None = None) -> np.ndarray:
        return np.concatenate([ds.search_vectors(q[i:i + QUERY_CHUNK], 3, tenant=tenant, params=params).ids
                               for i in range(0, len(q), QUERY_CHUNK)])

    state = read_state(ds)
    for slot, shard in enumerate(ds.shards):
        if len(ds.indexes[slot]) != len(shard):
            bad.append(f"shard {shard.shard_id}: index holds {len(ds.indexes[slot])} entries, LMDB {len(shard)}")
    if not state:
        return bad
    ids = np.fromiter(state, np.int64, len(state))
    vecs = np.stack([state[int(i)][2] for i in ids])
    for tenant in (None, *TENANTS):
        res = search(vecs, tenant)
        for row, i in enumerate(ids.tolist()):
            ts = state[i][1]
            visible = not ts or (tenant is not None and tenant in ts)
            found = res[row, 0] == i
            if visible and not found:
                bad.append(f"passage {i} (tenants {ts}) not found by its own vector as tenant {tenant}")
            if not visible and i in res[row]:
                bad.append(f"passage {i} (tenants {ts}) found by tenant {tenant} who may not see it")
    gone = sorted(set(known) - set(state))  # ids once stored (with their last version), now deleted
    if gone:
        q = np.stack([vector(i, known[i]) for i in gone])
        leaked = sorted(set(np.concatenate([search(q, t) for t in (None, *TENANTS)]).ravel().tolist()) & set(gone))
        if leaked:
            bad.append(f"deleted passages still found: {leaked[:10]}")
    return bad[:20]


@contextmanager
def _index_opens():
    """How each shard's index was opened (datastore.indexing logs it): a list of
    "loaded", "replayed" or "rebuilt", filled while the block runs."""
    import logging

    opens: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            words = record.getMessage().split()
            if words[2:3] == ["index"] and len(words) > 3:
                opens.append(words[3])

    logger = logging.getLogger("datastore.indexing")
    handler, level = Handler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield opens
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def kill_update_path(path: str, base: Path, work: Path, seed: int, delay: float) -> KillResult:
    from datastore.store import open_datastore

    d = work / f"kill-{seed}"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(base, d)
    killed, lines = run_child(path, d, seed, delay)
    acks = [int(x.split()[1]) for x in lines if x.startswith("A ")]
    begun = [int(x.split()[1]) for x in lines if x.startswith("B ")]
    heads = [list(map(int, x.split()[1:])) for x in lines if x.startswith("heads ")]
    result = KillResult(path, seed, killed, acked=len(acks))
    if acks != list(range(len(acks))) or begun[:len(acks)] != acks:
        result.violations.append(f"child out of order: begun {begun}, acked {acks}")
        return result
    prev = base_model()
    last_version = {i: 0 for i in prev.passages}  # the vector each id last had, for the deleted ones
    ops = plan(path, seed)
    for _ in acks:
        op = next(ops)
        prev.apply(op)
        last_version.update((i, v) for i, (v, _) in prev.passages.items())
    nxt = None
    if len(begun) > len(acks):
        op = next(ops)
        nxt = prev.copy()
        nxt.apply(op)
        result.in_flight = True
    result.info = {"ops_acked": len(acks), "heads_max": max((sum(h) for h in heads), default=0),
                   "heads_first": sum(heads[0]) if heads else 0}
    try:
        with _index_opens() as opens:
            ds = open_datastore(d)
        result.info["reopen"] = opens
    except Exception as e:  # a datastore that does not reopen is the worst outcome
        result.violations.append(f"reopen failed: {type(e).__name__}: {e}")
        return result
    try:
        result.violations += check_against_model(ds, prev, nxt)
        tenants = set(ds.list_tenants())
        allowed = prev.tenants | (nxt.tenants if nxt else set())
        if not prev.tenants <= tenants <= allowed:
            result.violations.append(f"tenants {sorted(tenants)}, acknowledged {sorted(prev.tenants)}")
        result.violations += check_index(ds, last_version)
    finally:
        ds.close()
    # closing saved the index; a second open must load it (checksums verified) and agree
    try:
        with open_datastore(d) as ds:
            result.violations += [f"after a clean reopen: {v}" for v in check_index(ds, {})]
    except Exception as e:
        result.violations.append(f"second reopen failed: {type(e).__name__}: {e}")
    shutil.rmtree(d, ignore_errors=True)
    return result


def reference_build(path: str, work: Path) -> tuple[Path, float]:
    from datastore.build import build

    if path == "binary":
        _load_torch()  # loading torch is no part of the build time the kill delays are drawn from
    input_dir = write_input(work / "input", BASE_PASSAGES)
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    t = time.perf_counter()
    build(build_config(path, input_dir, ref))
    return ref, time.perf_counter() - t


def _snapshot(directory: Path) -> tuple[dict, dict]:
    """(id -> (text, tenants, vector bytes) over all shards, manifest counts), read directly."""
    from datastore.manifest import Manifest
    from datastore.shard import Shard

    m = Manifest.load(directory)
    out = {}
    for i, sd in enumerate(m.shard_dirs):
        if not (directory / sd / "data.mdb").exists():
            continue
        s = Shard(directory / sd, i, m.model.dim, m.vector_dtype, readonly=True)
        try:
            ps = list(s.iter_passages())
            vecs = s.get_vectors([p.id for p in ps]) if ps else []
            for p, v in zip(ps, vecs):
                out[p.id] = (p.text, p.tenants, np.asarray(v).tobytes())
        finally:
            s.close()
    return out, m.counts


def kill_build_path(path: str, ref: Path, est: float, work: Path, seed: int, rng: random.Random,
                    chain: int = 3) -> list[KillResult]:
    """Kill a build up to `chain` times (each resume too), then let it finish; compare."""
    from datastore.build import build
    from datastore.store import open_datastore

    d = work / f"build-{seed}"
    shutil.rmtree(d, ignore_errors=True)
    want, want_counts = _snapshot(ref)
    results = []
    for k in range(chain):
        delay = rng.uniform(0.0, est * 1.2)
        killed, _ = run_child(path, d, seed, delay)
        r = KillResult(path, seed, killed, info={"delay_s": round(delay, 3), "chain": k})
        results.append(r)
        if not killed:
            break
        if (d / "manifest.json").exists():
            have, _ = _snapshot(d)
            wrong = [i for i, v in have.items() if want.get(i) != v]
            if wrong:
                r.violations.append(f"committed passages differ from the one-shot build's: ids {wrong[:10]}")
            r.acked = len(have)
    cfg = build_config(path, work / "input", d)
    build(cfg)  # the final resume, in-process
    have, counts = _snapshot(d)
    last = results[-1]
    if have != want:
        last.violations.append(f"resumed build differs from the one-shot build: {len(have)} passages against "
                               f"{len(want)}, {sum(have.get(i) != v for i, v in want.items())} differ")
    if counts != want_counts:
        last.violations.append(f"counts {counts} differ from the one-shot build's {want_counts}")
    with open_datastore(d) as ds, open_datastore(ref) as one_shot:
        last.violations += check_index(ds, {})
        if path == "build":  # exact index: the same answers as the one-shot build
            q = np.stack([vector(i, 1) for i in range(20)])
            a, b = ds.search_vectors(q, 5), one_shot.search_vectors(q, 5)
            if not np.array_equal(a.ids, b.ids):
                last.violations.append("search results differ from the one-shot build's")
    shutil.rmtree(d, ignore_errors=True)
    return results


def run(paths: list[str], kills: int, seed: int, work: Path, max_delay: float = 1.5) -> dict:
    """Kill each path until it was killed `kills` times; JSON-ready figures."""
    out: dict = {"kills": 0, "violations": 0, "paths": {}}
    for path in paths:
        t0 = time.perf_counter()
        pwork = work / path
        pwork.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"{seed}:{path}")
        results: list[KillResult] = []
        s = seed * 1000
        if path in ("build", "binary"):
            ref, est = reference_build(path, pwork)
            while sum(r.killed for r in results) < kills:
                results += kill_build_path(path, ref, est, pwork, s, rng)
                s += 1
        else:
            base = make_base(path, pwork)
            longest = 3 * max_delay if path == "spann" else max_delay  # SPANN splits make slower writes
            while sum(r.killed for r in results) < kills:
                results.append(kill_update_path(path, base, pwork, s, rng.uniform(0.05, longest)))
                s += 1
        killed = [r for r in results if r.killed]
        bad = [v for r in results for v in r.violations]
        summary = {"kills": len(killed), "runs": len(results), "violations": len(bad),
                   "examples": bad[:5], "in_flight_at_kill": sum(r.in_flight for r in killed),
                   "acked_ops": sum(r.acked for r in killed), "seconds": round(time.perf_counter() - t0, 1)}
        if path != "build" and path != "binary":
            summary["index_opens"] = dict(Counter(o for r in results for o in r.info.get("reopen", [])))
        if path == "spann":
            summary["heads_grew"] = sum(r.info.get("heads_max", 0) > r.info.get("heads_first", 0) for r in results)
        out["paths"][path] = summary
        out["kills"] += len(killed)
        out["violations"] += len(bad)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["worker"]:
        worker(args[1], Path(args[2]), int(args[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="kills per path")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    a = p.parse_args(args)
    paths = [x for x in a.paths.split(",") if x]
    unknown = set(paths) - set(PATHS)
    if unknown:
        p.error(f"unknown paths {sorted(unknown)}; known: {', '.join(PATHS)}")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="crash-"))
    try:
        out = run(paths, a.kills, a.seed, work)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    out["seed"] = a.seed
    out["load_average"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    return 1 if out["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
