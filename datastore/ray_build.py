"""The Ray side of `datastore build --ray`: embedding on an actor pool with Ray Data, and
per-shard index builds as Ray tasks. Reading, chunking, dedup, id assignment and LMDB writes
stay in the driver, exactly as in a local build, so both give the same datastore.

On a small machine mind the actor/CPU deadlock: actors take fractional CPUs here, so the
Ray Data tasks that feed them always find a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datastore.encoder import Encoder, model_revision, resolve_model_path


def init_ray(address: str) -> None:
    """Join the cluster at `address`, or start a local one for "local"."""
    import ray

    if ray.is_initialized():
        return
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress and summary suffice
    ray.data.DataContext.get_current().enable_progress_bars = False
    if address in ("", "local"):
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False)


def model_info(name: str) -> tuple[int, str]:
    """(dimension, revision) of a model, read from its files, without loading it here."""
    import json

    path = resolve_model_path(name)
    dim = None
    pooling = path / "1_Pooling" / "config.json"
    if pooling.exists():
        dim = json.loads(pooling.read_text()).get("word_embedding_dimension")
    if dim is None:
        dim = Encoder(name).dim  # no pooling config: load it once to ask
    return int(dim), model_revision(path)


class _EmbedActor:
    """One sentence-transformers model per actor; rows keep their position."""

    def __init__(self, model: str, device: str | None) -> None:
        self.encoder = Encoder(model, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"row": batch["row"], "vector": self.encoder.encode([str(t) for t in batch["text"]])}


class RayEmbedder:
    """Vectors for lists of texts, computed by `actors` models on the Ray cluster."""

    def __init__(self, model: str, actors: int, gpus_per_actor: float, device: str | None) -> None:
        self.model, self.actors, self.gpus, self.device = model, actors, gpus_per_actor, device

    def __call__(self, text_batches: list[list[str]]) -> list[np.ndarray]:
        import ray

        texts = [t for batch in text_batches for t in batch]
        if not texts:
            return [np.zeros((0, 0), np.float32) for _ in text_batches]
        ds = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(texts)])
        # fractional CPUs: an actor pool that takes every CPU starves the tasks feeding it
        cpus = 0 if self.gpus else 0.5
        out = ds.map_batches(_EmbedActor, fn_constructor_kwargs={"model": self.model, "device": self.device},
                             batch_size=64, concurrency=self.actors, num_gpus=self.gpus, num_cpus=cpus)
        rows = out.take_all()
        vectors = np.empty((len(texts), len(rows[0]["vector"])), np.float32)
        for r in rows:
            vectors[r["row"]] = r["vector"]
        bounds = np.cumsum([len(b) for b in text_batches])[:-1]
        return np.split(vectors, bounds)


def build_shards_on_ray(directory: Path, num_shards: int, seed: int) -> None:
    """Each shard's index built by its own Ray task (the shards must be on storage every
    worker sees: one machine, or a shared filesystem)."""
    import ray

    from datastore.indexing import build_shard

    task = ray.remote(num_cpus=1)(build_shard)
    ray.get([task.remote(Path(directory), i, seed) for i in range(num_shards)])
