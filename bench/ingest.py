"""Ingest benchmark: passages/s of a whole `datastore build` on the default corpus, and the
share of wall time spent inside the encoder (the physical limit on a CPU machine).

    datastore bench ingest --docs 1000        # or: python -m bench.ingest --docs 1000

Prints one JSON object. `outside_over_encoder` is the goal metric: wall time outside the
encoder divided by encoder time (target <= 0.10).
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import click


def run_ingest(docs: int | None, shards: int, chunk_words: int, batch_size: int, out: Path | None) -> dict:
    from datastore.build import BuildConfig, build
    from datastore.chunking import ChunkConfig
    from datastore.corpus import DEFAULT_CORPUS

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-")) if out is None else None
    target = out if out is not None else tmp / "ds"
    try:
        t0 = time.perf_counter()
        s = build(BuildConfig([DEFAULT_CORPUS], target, limit_docs=docs, shards=shards,
                              chunk=ChunkConfig(chunk_words, 0), batch_passages=batch_size, progress=False))
        wall = time.perf_counter() - t0
        if s.already_built:
            raise click.UsageError(f"{target} already holds a datastore: give an empty --out")
        outside = s.seconds - s.encoder_seconds
        return {
            "bench": "ingest", "corpus": DEFAULT_CORPUS, "documents": s.documents, "passages": s.passages,
            "shards": shards, "chunk_words": chunk_words, "batch_size": batch_size,
            "build_s": round(s.seconds, 3), "model_load_s": round(s.load_seconds, 3),
            "wall_s": round(wall, 3), "index_s": round(s.index_seconds, 3),
            "encoder_s": round(s.encoder_seconds, 3),
            "passages_per_s": round(s.passages / s.seconds, 2) if s.seconds else None,
            "encoder_passages_per_s": round(s.passages / s.encoder_seconds, 2) if s.encoder_seconds else None,
            "encoder_share": round(s.encoder_seconds / s.seconds, 4) if s.seconds else None,
            "outside_over_encoder": round(outside / s.encoder_seconds, 4) if s.encoder_seconds else None,
            "host": platform.node(), "cpus": __import__("os").cpu_count(),
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@click.command("ingest")
@click.option("--docs", default=1000, show_default=True, help="Articles of the default corpus (0 = all).")
@click.option("--shards", default=1, show_default=True)
@click.option("--chunk-words", default=256, show_default=True)
@click.option("--batch-size", default=256, show_default=True, help="Passages per committed batch.")
@click.option("--out", type=click.Path(path_type=Path), help="Keep the datastore here (default: a temp dir).")
def ingest(docs: int, shards: int, chunk_words: int, batch_size: int, out: Path | None) -> None:
    """Time a whole build of the default corpus and the encoder's share of it; print JSON."""
    click.echo(json.dumps(run_ingest(docs or None, shards, chunk_words, batch_size, out)))


if __name__ == "__main__":
    ingest()
