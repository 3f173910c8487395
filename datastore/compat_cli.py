"""`datastore compat ...`: one binarizer per datastore, and queries of other embedding models.

Kept apart from cli.py so that its imports (torch, through the binarizer) load only when used.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("compat")
def compat() -> None:
    """Binary codes across shards and embedding model versions (binary indexes)."""


@compat.command("add-model")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--model", required=True,
              help="The new embedding model: a sentence-transformers name/path, or glove-6b-50d-mean.")
@click.option("--sample", default=10_000, show_default=True, help="Passages embedded with the new model.")
@click.option("--held-out", default=200, show_default=True, help="Of those, kept out of training to report recall.")
@click.option("--epochs", default=8, show_default=True)
@click.option("--seed", default=0, show_default=True)
def add_model(directory: Path, model: str, sample: int, held_out: int, epochs: int, seed: int) -> None:
    """Let queries embedded by MODEL search DIRECTORY's codes (SearchParams.query_model=MODEL).

    Embeds a sample of the passages with MODEL, trains a compatible binarizer against the
    datastore's own (training that first, on a sample over all shards, if the build did not),
    saves it in DIRECTORY/binarizers/ and records it in manifest.compat_models. Run it with
    the datastore closed (no server on it). Prints a JSON summary."""
    from datastore.compat import CompatConfig
    from datastore.compat import add_model as run

    summary = run(directory, model, CompatConfig(sample=sample, held_out=held_out, epochs=epochs, seed=seed),
                  log=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(summary))


@compat.command("unify")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--seed", default=0, show_default=True)
def unify(directory: Path, seed: int) -> None:
    """Give every shard's binary index the datastore's one binarizer (training it when the
    manifest names none) and re-encode shards whose codes came from another. Prints JSON."""
    from datastore import compat as c
    from datastore.indexing import open_index, save_index
    from datastore.manifest import Manifest
    from datastore.shard import Shard

    m = Manifest.load(directory)
    shards = [Shard(Path(directory) / d, i, m.model.dim, m.vector_dtype) for i, d in enumerate(m.shard_dirs)]
    try:
        indexes = [open_index(s, m.index) for s in shards]
        changed = c.unify(directory, m, shards, indexes, seed, save=save_index)
        m.save(directory)
    finally:
        for s in shards:
            s.close()
    click.echo(json.dumps({"binarizer": c.own_record(m), "reencoded_shards": changed}))


@compat.command("list")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
def list_models(directory: Path) -> None:
    """The datastore's own binarizer and the query models it accepts, as JSON."""
    from datastore import compat as c
    from datastore.manifest import Manifest

    m = Manifest.load(directory)
    click.echo(json.dumps({"model": m.model.name, "binarizer": c.own_record(m), "compat_models": m.compat_models}))
