"""Retrieval-augmented training rows: teach a tiny LM to read the passages put before its input.

A model trained only on plain text for a few CPU minutes never learns to copy from its
context (no induction heads yet), so prepending retrieved passages cannot lower its
perplexity: the benchmark's copy check (the scored text itself in the prompt) showed it.
In-context RALM training (RETRO-style, with the MassiveDS prompt layout) fixes that: each
training window is laid out exactly as `RetrievalAugmentedLM` lays out an evaluation window,
BOS + retrieved passages (best last, within a token budget) + the window, and the loss
falls on the window only. The passages come from the real datastore, searched with the
window's first half as the query, like at evaluation time.

What a window may not see is the text it is trained on: hits whose passage is part of the
same text (same `doc_id`, a chunk inside the text's chunk range) are dropped, and so is
anything the MassiveDS decontamination flags against the whole window. Other chunks of
the same document stay: at evaluation time the held-out part of an article sees its other
parts in the datastore, and training shows the model the same situation. A fraction of
windows gets no passages, so the one model is also a fair no-retrieval baseline.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from datastore.records import Hit
from rag.lm import bos_ids, context_ids, encode
from rag.retriever import Retriever, hit_text


@dataclass(frozen=True)
class RATrainConfig:
    """Shape of the retrieval-augmented training rows."""

    #: Tokens per training window (windows do not overlap; the first half is the query).
    window: int = 128
    #: Passages prepended per window.
    k: int = 3
    #: Token budget of the passages.
    context_tokens: int = 256
    #: Windows trained without passages (the same model then also reads plain text well).
    no_retrieval_fraction: float = 0.25
    #: Extra hits fetched so that dropping the window's own text still leaves k.
    fetch_extra: int = 4
    separator: str = "\n\n"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"window must be >= 2, got {self.window}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.context_tokens < 0:
            raise ValueError(f"context_tokens must be >= 0, got {self.context_tokens}")
        if not 0.0 <= self.no_retrieval_fraction <= 1.0:
            raise ValueError(f"no_retrieval_fraction must be in [0, 1], got {self.no_retrieval_fraction}")
        if self.fetch_extra < 0:
            raise ValueError(f"fetch_extra must be >= 0, got {self.fetch_extra}")


@dataclass(frozen=True)
class TrainText:
    """A training text and where it lives in the datastore, so that it is never its own
    neighbour: passages of `doc_id` whose chunk number is in `chunks` (None: every chunk)."""

    text: str
    doc_id: str | None = None
    chunks: range | None = None

    def owns(self, hit: Hit) -> bool:
        if self.doc_id is None or hit.passage is None:
            return False
        meta = hit.passage.metadata
        if meta.get("doc_id") != self.doc_id:
            return False
        return self.chunks is None or int(meta.get("chunk", "0")) in self.chunks


@dataclass
class RAExamples:
    """Training rows (ids, labels) and how many of them carry passages."""

    rows: list[tuple[list[int], list[int]]]
    with_passages: int
    passages: int
    retrieval_seconds: float

    def summary(self) -> dict:
        n = len(self.rows)
        return {"rows": n, "with_passages": self.with_passages,
                "passages_per_augmented_row": round(self.passages / max(1, self.with_passages), 3),
                "tokens": sum(len(i) for i, _ in self.rows), "retrieval_seconds": round(self.retrieval_seconds, 1)}


def build_examples(tokenizer, retriever: Retriever, texts: Sequence[TrainText], cfg: RATrainConfig,
                   log: Callable[[str], None] = print, chunk: int = 1024) -> RAExamples:
    """Cut texts into windows and lay each out as evaluation does, passages from `retriever`."""
    rng = random.Random(cfg.seed)
    bos = bos_ids(tokenizer)
    windows: list[tuple[int, list[int], bool]] = []  # (text index, window ids, with retrieval)
    for n, t in enumerate(texts):
        ids = encode(tokenizer, t.text)
        for begin in range(0, len(ids), cfg.window):
            w = ids[begin:begin + cfg.window]
            if len(w) >= 2:
                windows.append((n, w, rng.random() >= cfg.no_retrieval_fraction))
    asked = [i for i, (_, _, r) in enumerate(windows) if r]
    found: dict[int, list[str]] = {}
    t0 = time.perf_counter()
    for start in range(0, len(asked), chunk):
        part = asked[start:start + chunk]
        queries = [tokenizer.decode(windows[i][1][:max(1, len(windows[i][1]) // 2)]) for i in part]
        refs = [tokenizer.decode(windows[i][1]) for i in part]
        rows = retriever.retrieve(queries, refs, k=cfg.k + cfg.fetch_extra)
        for i, hits in zip(part, rows):
            own = texts[windows[i][0]]
            found[i] = [hit_text(h) for h in hits if not own.owns(h)][:cfg.k]
        log(f"retrieved for {min(start + chunk, len(asked))}/{len(asked)} training windows "
            f"({time.perf_counter() - t0:.0f} s)")
    out: list[tuple[list[int], list[int]]] = []
    with_passages = passages = 0
    for i, (_, w, _) in enumerate(windows):
        ctx, used = context_ids(tokenizer, found.get(i, []), cfg.context_tokens, cfg.separator)
        with_passages += used > 0
        passages += used
        prefix = bos + ctx
        out.append((prefix + w, [-100] * len(prefix) + w))
    return RAExamples(out, with_passages, passages, time.perf_counter() - t0)


def with_copies(rows: Sequence[tuple[list[int], list[int]]], fraction: float, separator_ids: Sequence[int],
                prefix_ids: Sequence[int], budget: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """A copying curriculum: in a `fraction` of the rows that carry passages, one more
    passage is a span of the window itself (at least half of it, placed first or last).

    Real neighbours overlap a text only here and there (a name, a phrase), too rarely for a
    model trained a few CPU minutes to learn to copy at all; a verbatim span makes copying
    pay off at once, and what is learnt (match a prefix in the context, continue it) is what
    reading a real neighbour needs. Evaluation never sees such a passage: its passages are
    retrieved and decontaminated against the scored text. Rows keep `budget` tokens of
    passages at most (older passage tokens are cut from the left)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = random.Random(seed)
    sep, head = list(separator_ids), list(prefix_ids)
    out = []
    for ids, labels in rows:
        n_prefix = next((i for i, lab in enumerate(labels) if lab != -100), len(labels))
        ctx, window = ids[len(head):n_prefix], ids[n_prefix:]
        if not ctx or len(window) < 4 or rng.random() >= fraction:
            out.append((ids, labels))
            continue
        size = rng.randint(len(window) // 2, len(window))
        begin = rng.randint(0, len(window) - size)
        span = window[begin:begin + size] + sep
        keep = max(0, budget - len(span))
        ctx = ctx[len(ctx) - keep:] if keep < len(ctx) else ctx
        ctx = span + ctx if rng.random() < 0.5 else ctx + span
        ctx = ctx[-budget:] if budget else []
        out.append((head + ctx + window, [-100] * (len(head) + len(ctx)) + window))
    return out


def induction_rows(n_rows: int, vocab_size: int, low_id: int, bos: Sequence[int], min_len: int = 8,
                   max_len: int = 32, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Rows of random tokens said twice, loss on the second time only: a warm-up after which
    a tiny model copies from its context (it grows induction heads: find where the current
    token was seen before, predict what followed it). On natural text that circuit forms
    only after far more tokens than a few CPU minutes give; on these rows nothing else
    lowers the loss, so it forms in a few hundred short steps. Tokens come from
    [low_id, vocab_size) so that special tokens never appear."""
    if not 0 <= low_id < vocab_size:
        raise ValueError(f"low_id must be in [0, vocab_size), got {low_id}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        seq = [rng.randrange(low_id, vocab_size) for _ in range(rng.randint(min_len, max_len))]
        head = list(bos) + seq
        rows.append((head + seq, [-100] * len(head) + seq))
    return rows
