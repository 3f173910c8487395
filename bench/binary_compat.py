"""Cross-version binary search (BEBR compatible training), measured on a real datastore.

    python -m bench.binary_compat --datastore data/wiki-2000 --new-model glove-6b-50d-mean --out r.json

The datastore's passages were embedded by its own ("old") model. The new model embeds the
same passages; three binarizers are trained with the same code shape (bits x m):

- old: the old model's, normally (the codes the datastore holds);
- same-version: the new model's, normally, over new-model codes of the passages (what a
  full re-embedding and re-encoding with the new model would give);
- cross-version: the new model's, compatibly against `old` (Binarizer.fit_compatible), its
  query codes searching the old codes.

Queries are questions about article titles (bench.prepare.make_questions), each relevant to
the passages of its article; recall@k is the share of questions with a relevant passage in
the top k (the task view: both versions answer the same questions). Also printed: the
neighbour recall of new-model queries against the old model's float top-k. All code scores
are SDC (no rerank) unless the name says rerank8 (top 8k by SDC reranked by floats: the
new floats for same-version, the old floats against the query's translation into the old
space for cross-version, as the binary index does). One JSON object to stdout (and --out).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np


@dataclass(frozen=True)
class CompatBenchConfig:
    datastore: Path
    new_model: str = "glove-6b-50d-mean"
    bits: int = 2
    questions: int = 500
    limit: int | None = None
    epochs: int = 8
    train_sample: int = 20_000
    k: int = 10
    seed: int = 0


def _hits(found: np.ndarray, relevant: list[set[int]]) -> float:
    return float(np.mean([bool(set(f.tolist()) & r) for f, r in zip(found, relevant)]))


def _overlap(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / truth.shape[1] for f, t in zip(found, truth)]))


def run(cfg: CompatBenchConfig) -> dict:
    from bench.prepare import make_questions
    from datastore.compat import make_encoder
    from datastore.manifest import Manifest
    from datastore.shard import Shard
    from index import sdc
    from index.binarizer import Binarizer, BinarizerConfig

    t0 = time.perf_counter()
    m = Manifest.load(cfg.datastore)
    texts, titles, old = [], [], []
    for i, d in enumerate(m.shard_dirs):
        shard = Shard(Path(cfg.datastore) / d, i, m.model.dim, m.vector_dtype, readonly=True)
        try:
            for ids, vecs, _ in shard.iter_vectors():
                ps = shard.get(ids.tolist())
                texts += [p.embedding_input() for p in ps]
                titles += [p.title for p in ps]
                old.append(vecs)
        finally:
            shard.close()
    old = np.concatenate(old)
    if cfg.limit:
        texts, titles, old = texts[:cfg.limit], titles[:cfg.limit], old[:cfg.limit]
    questions = make_questions(titles, cfg.questions, cfg.seed)
    asked = list(questions)
    by_title: dict[str, set[int]] = {}
    for i, t in enumerate(titles):
        by_title.setdefault(t, set()).add(i)
    relevant = [by_title[_title_of(q, by_title)] for q in asked]
    old_enc, new_enc = make_encoder(m.model.name), make_encoder(cfg.new_model)
    t_embed = time.perf_counter()
    new = np.concatenate([new_enc.encode(texts[i:i + 256]) for i in range(0, len(texts), 256)])
    q_old, q_new = old_enc.encode(asked), new_enc.encode(asked)
    t_embed = time.perf_counter() - t_embed
    bcfg = BinarizerConfig(bits=cfg.bits, code_dims=sdc.words_for(m.model.dim) * sdc.WORD_BITS, epochs=cfg.epochs,
                           train_sample=cfg.train_sample, seed=cfg.seed)
    t = time.perf_counter()
    b_old = Binarizer(m.model.dim, bcfg, m.model.name).fit(old)
    t_old = time.perf_counter() - t
    b_same = Binarizer(new.shape[1], bcfg, cfg.new_model).fit(new)
    t = time.perf_counter()
    b_cross = Binarizer(new.shape[1], bcfg, cfg.new_model).fit_compatible(new, old, b_old)
    t_cross = time.perf_counter() - t
    old_planes, new_planes = sdc.to_planes(b_old.encode(old)), sdc.to_planes(b_same.encode(new))
    k = cfg.k

    def codes_top(qcodes: np.ndarray, planes: np.ndarray, n: int) -> np.ndarray:
        return sdc.top_n(sdc.sdc_int(qcodes, planes, bcfg.code_dims), n)

    def rerank(q: np.ndarray, base: np.ndarray, cand: np.ndarray) -> np.ndarray:
        s = np.einsum("qnd,qd->qn", base[cand], q)
        return np.take_along_axis(cand, np.argsort(-s, 1)[:, :k], 1)

    top_float_old = np.argsort(-(q_old @ old.T), 1)[:, :k]
    top_float_new = np.argsort(-(q_new @ new.T), 1)[:, :k]
    cross = codes_top(b_cross.encode(q_new), old_planes, k)
    same = codes_top(b_same.encode(q_new), new_planes, k)
    out = {
        "bench": "binary-compat", "datastore": str(cfg.datastore), "passages": len(texts), "questions": len(asked),
        "old_model": m.model.name, "new_model": cfg.new_model, "bits": cfg.bits, "code_dims": bcfg.code_dims,
        "k": k, "epochs": cfg.epochs,
        "recall_at_k": {
            "old_float": _hits(top_float_old, relevant),
            "old_codes": _hits(codes_top(b_old.encode(q_old), old_planes, k), relevant),
            "old_codes_rerank8": _hits(rerank(q_old, old, codes_top(b_old.encode(q_old), old_planes, 8 * k)),
                                       relevant),
            "new_float": _hits(top_float_new, relevant),
            "same_version_codes": _hits(same, relevant),
            "same_version_codes_rerank8": _hits(rerank(q_new, new, codes_top(b_same.encode(q_new), new_planes,
                                                                              8 * k)), relevant),
            "cross_version_codes": _hits(cross, relevant),
            "cross_version_codes_rerank8": _hits(rerank(b_cross.translate(q_new), old, codes_top(
                b_cross.encode(q_new), old_planes, 8 * k)), relevant),
            "unaligned_codes": _hits(codes_top(b_same.encode(q_new), old_planes, k), relevant),
        },
        "neighbour_recall_vs_old_float": {
            "old_codes": _overlap(codes_top(b_old.encode(q_old), old_planes, k), top_float_old),
            "cross_version_codes": _overlap(cross, top_float_old),
            "new_float": _overlap(top_float_new, top_float_old),
        },
        "seconds": {"embed_new": round(t_embed, 1), "train_old": round(t_old, 1), "train_cross": round(t_cross, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "loadavg": os.getloadavg()[0],
    }
    r = out["recall_at_k"]
    out["cross_minus_same"] = round(r["cross_version_codes"] - r["same_version_codes"], 4)
    out["cross_minus_same_rerank8"] = round(r["cross_version_codes_rerank8"] - r["same_version_codes_rerank8"], 4)
    return out


def _title_of(question: str, titles: dict) -> str:
    """The title that `question` (a make_questions template filled in) asks about."""
    from bench.prepare import QUESTION_TEMPLATES

    for form in QUESTION_TEMPLATES:
        head, tail = form.split("{t}")
        if question.startswith(head) and question.endswith(tail):
            title = question[len(head):len(question) - len(tail)]
            if title in titles:
                return title
    raise ValueError(f"no title for question {question!r}")


@click.command()
@click.option("--datastore", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--new-model", default="glove-6b-50d-mean", show_default=True)
@click.option("--bits", default=2, show_default=True)
@click.option("--questions", default=500, show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N passages.")
@click.option("--epochs", default=8, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the JSON here.")
def main(datastore, new_model, bits, questions, limit, epochs, seed, out) -> None:
    """Same-version vs cross-version recall of binary codes on DATASTORE."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(CompatBenchConfig(datastore, new_model, bits, questions, limit, epochs, seed=seed))
    text = json.dumps(result, indent=2)
    click.echo(text)
    if out is not None:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
