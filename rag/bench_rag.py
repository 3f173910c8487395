"""Benchmark of the RAG plugin on the default corpus; prints one JSON object.

1. Split. Among articles of at least `min_words` words, `eval_docs` are held out: their
   first `lead_words` words (with the title) stay in the corpus as the *neighbour*, the rest
   is the held-out text. Everything else is training text.
2. Build (once, cached under OUT/ds-c<chunk_words>) a datastore of the training text
   (datastore.build), `chunk_words` words per passage: with chunk_words = lead_words a
   held-out article's lead is exactly one passage.
3. Train (once, cached under OUT/models-...) a tokenizer, a target LM and a smaller drafter
   LM on the training text only. `--training augmented` (default): on retrieval-augmented
   windows (rag.ra_train), laid out as evaluation lays them out, passages from the step-2
   datastore, a window's own chunks excluded; every article longer than its lead also
   gives a lead and a tail text, as held-out articles do. `--training plain`: packed text.
4. Perplexity of the held-out texts, MassiveDS windows, with the target LM: without
   retrieval, with retrieval, with retrieval that may not see the neighbours (metadata
   filter `split=other`), and with the scored text itself in the prompt (how far the LM
   uses its context at all: the ceiling of what retrieval can do for it); also the share
   of windows whose passages hold their own article's lead.
5. Speculative decoding at long context: a long input of corpus articles (>= `context_tokens`
   target tokens) and prompts that start one of its articles; target-only greedy decoding
   vs SpeculativeRAG (drafter fed by the long input's chunks through an ephemeral tenant),
   a fixed number of new tokens (EOS ignored), interleaved runs, medians.

    python -m rag.bench_rag --out runs/rag --skip-speculative   # trains the first time
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

from rag.train_tiny import TinyLMConfig, train, train_tokenizer


def split_corpus(docs: int | None, eval_docs: int, min_words: int, lead_words: int,
                 seed: int) -> tuple[list[dict], list[str], list[str]]:
    """(datastore/training records, held-out texts, their articles' ids). Records are
    JSONL-ready dicts."""
    from datastore.corpus import iter_default_corpus

    articles = [a for a in iter_default_corpus(docs) if a.text.strip()]
    long_ones = [i for i, a in enumerate(articles) if len(a.text.split()) >= min_words]
    if len(long_ones) < eval_docs:
        raise ValueError(f"eval_docs must be <= {len(long_ones)} (articles of >= {min_words} words), "
                         f"got {eval_docs}")
    held = set(random.Random(seed).sample(long_ones, eval_docs))
    records, heldout, heldout_ids = [], [], []
    for i, a in enumerate(articles):
        text = a.text
        split = "other"
        if i in held:
            words = text.split()
            text, split = " ".join(words[:lead_words]), "neighbour"
            heldout.append(" ".join(words[lead_words:]))
            heldout_ids.append(a.doc_id)
        records.append({"id": a.doc_id, "title": a.title, "text": text, "metadata": {"split": split}})
    return records, heldout, heldout_ids


def training_texts(records: list[dict], lead_words: int, chunk_words: int) -> list:
    """The retrieval-augmented training texts, cut as the evaluation cuts held-out articles:
    an article longer than `lead_words` words gives its lead (with the title) and its tail
    (without, like a held-out text), each excluding only its own chunks from its neighbours,
    so a tail learns to read its own lead out of the datastore as a held-out tail will."""
    from rag.ra_train import TrainText

    out = []
    for r in records:
        words = r["text"].split()
        if len(words) <= lead_words:
            out.append(TrainText(f"{r['title']}\n{r['text']}", r["id"]))
            continue
        lead_chunks = -(-lead_words // chunk_words)
        out.append(TrainText(f"{r['title']}\n{' '.join(words[:lead_words])}", r["id"], range(lead_chunks)))
        out.append(TrainText(" ".join(words[lead_words:]), r["id"], range(lead_words // chunk_words, 10**9)))
    return out


def _train_models(out: Path, texts: list[str], ra_texts: list, retriever, target_cfg: TinyLMConfig,
                  drafter_cfg: TinyLMConfig, ra_cfg, cache: Path | None, copy_fraction: float, log,
                  init: Path | None = None) -> dict:
    """Train (or reuse) the target and the drafter. With a `cache` path both learn on
    retrieval-augmented rows (rag.ra_train) built once from `ra_texts` and kept there."""
    import torch

    from rag.lm import bos_ids, encode
    from rag.ra_train import build_examples, with_copies
    from rag.train_tiny import train_examples

    tdir, ddir = out / "target", out / "drafter"
    summaries = {}
    if not (tdir / "train_summary.json").exists() or not (ddir / "train_summary.json").exists():
        tokenizer = train_tokenizer(texts, target_cfg.vocab_size)
        examples = None
        augmented = cache is not None
        if augmented:
            if cache.exists():
                examples = torch.load(cache)
            else:
                log("retrieving neighbours for the training windows")
                built = build_examples(tokenizer, retriever, ra_texts, ra_cfg, log)
                examples = {"rows": built.rows, "summary": built.summary()}
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(examples, cache)
            summaries["examples"] = {**examples["summary"], "copy_fraction": copy_fraction}
            rows = with_copies(examples["rows"], copy_fraction, encode(tokenizer, ra_cfg.separator),
                               bos_ids(tokenizer), ra_cfg.context_tokens, ra_cfg.seed)
        for name, cfg, d in (("target", target_cfg, tdir), ("drafter", drafter_cfg, ddir)):
            if not (d / "train_summary.json").exists():
                log(f"training the {name}")
                if augmented:
                    train_examples(rows, cfg, d, tokenizer, log=log, init=init if name == "target" else None)
                else:
                    train(texts, cfg, d, tokenizer=tokenizer, log=log)
    for name in ("target", "drafter"):
        summaries[name] = json.loads((out / name / "train_summary.json").read_text())
    return summaries


def _build_datastore(out: Path, records: list[dict], chunk_words: int) -> dict:
    from datastore.build import BuildConfig, build
    from datastore.chunking import ChunkConfig

    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.parent / "corpus.jsonl"
    content = "".join(json.dumps(r) + "\n" for r in records)
    if not jsonl.exists() or jsonl.read_text() != content:  # its mtime is part of the build's identity
        jsonl.write_text(content)
    summary = build(BuildConfig([str(jsonl)], out, chunk=ChunkConfig(chunk_words, 0), progress=False))
    return {"passages": summary.passages, "build_seconds": round(summary.seconds, 1),
            "already_built": summary.already_built}


def _perplexity(lm, retriever, heldout: list[str], heldout_ids: list[str], window: int, stride: int) -> dict:
    from rag.retriever import RetrieverConfig

    out = {"windows_that_retrieve_their_own_lead": _own_lead_rate(lm, retriever, heldout, heldout_ids, window,
                                                                  stride),
           "without_retrieval": lm.perplexity(heldout, window, stride, retrieval=False).to_dict()}
    t = time.perf_counter()
    out["with_retrieval"] = lm.perplexity(heldout, window, stride, retrieval=True).to_dict()
    out["with_retrieval"]["seconds"] = round(time.perf_counter() - t, 1)
    out["retrieval_filters"] = asdict(retriever.stats)
    base = retriever.config
    retriever.config = RetrieverConfig(**{**asdict(base), "metadata_filter": {"split": "other"}})
    out["with_retrieval_no_neighbours"] = lm.perplexity(heldout, window, stride, retrieval=True).to_dict()
    retriever.config = base
    out["with_the_scored_text_itself"] = _copy_check(lm, heldout, window, stride)
    return out


def _own_lead_rate(lm, retriever, heldout: list[str], heldout_ids: list[str], window: int,
                   stride: int) -> float:
    """Share of evaluation windows whose k passages (after the filters) include the lead of
    their own article: how often "the neighbour is in the datastore" reaches the prompt."""
    from rag.lm import encode, perplexity_windows

    queries, refs, owners = [], [], []
    for text, doc in zip(heldout, heldout_ids):
        ids = encode(lm.tokenizer, text)
        for w in perplexity_windows(len(ids), window, stride):
            queries.append(lm.tokenizer.decode(ids[w.begin:w.score_begin]))
            refs.append(lm.tokenizer.decode(ids[w.score_begin:w.end]))
            owners.append(doc)
    rows = retriever.retrieve(queries, refs, k=lm.config.k)
    found = sum(any(h.passage is not None and h.passage.metadata.get("doc_id") == doc for h in row)
                for row, doc in zip(rows, owners))
    return round(found / max(1, len(rows)), 3)


def _copy_check(lm, heldout: list[str], window: int, stride: int) -> dict:
    """Perplexity when the prompt holds the very tokens to be scored (a contaminated passage
    on purpose): how far this LM can use its context at all, the ceiling of any retrieval."""
    from rag.lm import ScoredInput, bos_ids, encode

    sep = encode(lm.tokenizer, lm.config.separator)
    head = bos_ids(lm.tokenizer)
    inputs = []
    for item in lm.window_inputs(heldout, window, stride, retrieval=False):
        scored = [t for t in item.labels if t != -100]
        inputs.append(ScoredInput(head + scored + sep + item.input_ids[len(head):],
                                  [-100] * (len(head) + len(scored) + len(sep)) + item.labels[len(head):], 1))
    return lm.score(inputs, retrieval=True).to_dict()


def _long_input(tokenizer, records: list[dict], tokens: int) -> tuple[str, list[dict]]:
    """Articles joined until they reach `tokens` tokens; also the articles used."""
    parts, used, n = [], [], 0
    for r in records:
        if r["metadata"]["split"] != "other" or len(r["text"].split()) < 40:
            continue
        part = f"{r['title']}\n{r['text']}"
        parts.append(part)
        used.append(r)
        n += len(tokenizer(part + "\n\n", add_special_tokens=False)["input_ids"])
        if n >= tokens:
            return "\n\n".join(parts), used
    raise ValueError(f"the corpus holds fewer than {tokens} tokens of long articles")


def _speculative(target_dir: Path, drafter_dir: Path, retriever, records: list[dict], context_tokens: int,
                 prompts: int, new_tokens: int, gamma: int, eta: float, repeats: int) -> dict:
    from rag.lm import load_causal_lm
    from rag.speculative import SpeculativeConfig, SpeculativeRAG

    target, tokenizer = load_causal_lm(target_dir)
    drafter, _ = load_causal_lm(drafter_dir)
    context, used = _long_input(tokenizer, records, context_tokens)
    picks = [used[int(i * (len(used) - 1) / max(1, prompts - 1))] for i in range(prompts)]
    cases = [f"{r['title']}\n{' '.join(r['text'].split()[:8])}" for r in picks]
    rows = []
    for eta_value in sorted({0.0, eta}):
        cfg = SpeculativeConfig(gamma=gamma, eta=eta_value, max_new_tokens=new_tokens, k=8,
                                draft_context_tokens=768)
        spec = SpeculativeRAG(target, drafter, tokenizer, retriever, cfg)
        for prompt in cases:
            base_t, spec_t, base_dec, spec_dec = [], [], [], []
            for _ in range(repeats):  # interleaved, so load on the machine hits both alike
                b = spec.generate(prompt, context, baseline=True, stop_at_eos=False)
                s = spec.generate(prompt, context, stop_at_eos=False)
                base_t.append(b.stats.prefill_seconds + b.stats.decode_seconds)
                spec_t.append(s.stats.prefill_seconds + s.stats.decode_seconds)
                base_dec.append(b.stats.decode_seconds / b.stats.new_tokens)
                spec_dec.append(s.stats.decode_seconds / s.stats.new_tokens)
            rows.append({"eta": eta_value, "prompt": prompt, "target_context": s.stats.target_context,
                         "draft_context": s.stats.draft_context,
                         "acceptance_rate": round(s.stats.acceptance_rate, 3),
                         "tokens_per_step": round(s.stats.tokens_per_step, 3),
                         "same_text_as_target": s.token_ids == b.token_ids,
                         "speedup_total": round(statistics.median(base_t) / statistics.median(spec_t), 3),
                         "speedup_decode": round(statistics.median(base_dec) / statistics.median(spec_dec),
                                                 3),
                         "target_only_decode_tok_s": round(1 / statistics.median(base_dec), 2),
                         "speculative_decode_tok_s": round(1 / statistics.median(spec_dec), 2),
                         "retrieval_seconds": round(s.stats.retrieval_seconds, 3),
                         "speculative_text": s.text[:160], "target_text": b.text[:160]})
    return {"cases": rows, "context_articles": len(used), "gamma": gamma, "new_tokens": new_tokens,
            "repeats": repeats}


@click.command()
@click.option("--out", default="runs/rag", show_default=True, type=click.Path(path_type=Path))
@click.option("--docs", default=4000, show_default=True, help="Articles of the default corpus used.")
@click.option("--eval-docs", default=150, show_default=True, help="Articles whose tail is held out.")
@click.option("--min-words", default=110, show_default=True)
@click.option("--lead-words", default=40, show_default=True,
              help="Words of a held-out article kept as its neighbour.")
@click.option("--chunk-words", default=40, show_default=True,
              help="Words per datastore passage (= lead words: a lead is one passage).")
@click.option("--training", type=click.Choice(["augmented", "plain"]), default="augmented", show_default=True,
              help="Train on retrieval-augmented windows (rag.ra_train) or on plain packed text.")
@click.option("--no-retrieval-fraction", default=0.25, show_default=True,
              help="Augmented training: windows trained without passages.")
@click.option("--copy-fraction", default=0.5, show_default=True,
              help="Augmented training: windows with passages that also get a span of themselves "
                   "(rag.ra_train.with_copies, a copying curriculum; never at evaluation).")
@click.option("--target-layers", default=4, show_default=True)
@click.option("--target-hidden", default=256, show_default=True)
@click.option("--target-minutes", default=5.0, show_default=True)
@click.option("--target-steps", type=int, default=None, help="Exact steps instead of --target-minutes.")
@click.option("--drafter-minutes", default=2.0, show_default=True)
@click.option("--drafter-steps", type=int, default=None, help="Exact steps instead of --drafter-minutes.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--init", type=click.Path(path_type=Path), default=None,
              help="Augmented training: continue the target from this saved model (an earlier stage).")
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--window", default=128, show_default=True)
@click.option("--stride", default=64, show_default=True)
@click.option("-k", "k", default=3, show_default=True)
@click.option("--context-budget", default=256, show_default=True, help="Tokens of passages per window.")
@click.option("--context-tokens", default=4096, show_default=True)
@click.option("--prompts", default=3, show_default=True)
@click.option("--new-tokens", default=64, show_default=True)
@click.option("--gamma", default=4, show_default=True)
@click.option("--eta", default=0.5, show_default=True, help="Also run RAPID's augmented target at this eta.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--skip-perplexity", is_flag=True)
@click.option("--skip-speculative", is_flag=True)
@click.option("--threads", default=1, show_default=True,
              help="torch threads (1 beats 2 for these tiny models, and is steadier on a shared machine).")
@click.option("--seed", default=0, show_default=True)
def main(out, docs, eval_docs, min_words, lead_words, chunk_words, training, no_retrieval_fraction, copy_fraction,
         target_layers, target_hidden, target_minutes, target_steps, drafter_minutes, drafter_steps, batch_size, init, lr, window, stride, k, context_budget,
         context_tokens, prompts, new_tokens, gamma, eta, repeats, skip_perplexity, skip_speculative, threads,
         seed) -> None:
    """Perplexity with vs without retrieval and SpeculativeRAG speed at long context."""
    import torch

    from rag.lm import RALMConfig, RetrievalAugmentedLM, load_causal_lm
    from rag.ra_train import RATrainConfig
    from rag.retriever import Retriever, RetrieverConfig

    torch.set_num_threads(threads)

    def log(msg: str) -> None:
        click.echo(f"[{time.strftime('%H:%M:%S')}] {msg}", err=True)

    t0 = time.perf_counter()
    records, heldout, heldout_ids = split_corpus(docs, eval_docs, min_words, lead_words, seed)
    texts = [f"{r['title']}\n{r['text']}" for r in records]
    target_cfg = TinyLMConfig(layers=target_layers, hidden=target_hidden, heads=4, minutes=target_minutes,
                              steps=target_steps, batch_size=batch_size, lr=lr, seed=seed)
    drafter_cfg = TinyLMConfig(layers=2, hidden=128, heads=2, minutes=drafter_minutes, steps=drafter_steps,
                               batch_size=batch_size, lr=lr, seed=seed)
    ra_cfg = RATrainConfig(window=window, k=k, context_tokens=context_budget,
                           no_retrieval_fraction=no_retrieval_fraction, seed=seed)
    log("building the datastore")
    ds_dir = out / f"ds-c{chunk_words}"
    ds = _build_datastore(ds_dir, records, chunk_words)
    models_dir = out / (f"models-{training}-c{chunk_words}-{target_layers}x{target_hidden}"
                        + (f"-copy{copy_fraction:g}" if training == "augmented" else "")
                        + (f"-from-{init.parent.name}" if init else ""))
    # the training rows depend on the split, the datastore and their layout, not on the model
    cache = (out / f"ra-examples-d{docs}-c{chunk_words}-w{window}-k{k}-b{context_budget}"
                   f"-f{no_retrieval_fraction:g}-s{seed}.pt") if training == "augmented" else None
    with Retriever(ds_dir, RetrieverConfig(k=k)) as retriever:
        models = _train_models(models_dir, texts, training_texts(records, lead_words, chunk_words), retriever,
                               target_cfg, drafter_cfg, ra_cfg, cache, copy_fraction, log, init)
        report: dict = {"split": {"docs": len(records), "heldout_texts": len(heldout), "lead_words": lead_words,
                                  "chunk_words": chunk_words},
                        "training": training, "models_dir": str(models_dir),
                        "models": {n: {key: m[key] for key in ("parameters", "steps", "tokens", "seconds",
                                                                "final_loss")}
                                   for n, m in models.items() if n != "examples"},
                        "training_examples": models.get("examples"), "datastore": ds}
        if not skip_perplexity:
            log("perplexity")
            model, tokenizer = load_causal_lm(models_dir / "target")
            lm = RetrievalAugmentedLM(model, tokenizer, retriever,
                                      RALMConfig(k=k, max_context_tokens=context_budget))
            report["perplexity"] = {"window": window, "stride": stride, "k": k,
                                    "context_budget": context_budget,
                                    **_perplexity(lm, retriever, heldout, heldout_ids, window, stride)}
        if not skip_speculative:
            log("speculative decoding")
            report["speculative"] = _speculative(models_dir / "target", models_dir / "drafter", retriever,
                                                 records, context_tokens, prompts, new_tokens, gamma, eta,
                                                 repeats)
    report["threads"] = threads
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"report-{training}-{context_tokens}.json").write_text(json.dumps(report, indent=1))
    click.echo(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
