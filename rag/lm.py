"""In-context retrieval-augmented LM (MassiveDS): retrieved passages prepended to the input.

Perplexity follows MassiveDS (Shao et al., 2024, `src/data.py` and
`src/evaluate_perplexity.py` of RulinShao/retrieval-scaling): each text is cut into windows
of `window` tokens that start every `stride` tokens; the first `window - stride` tokens of a
window are the retrieval query and the context, and only the tokens after them are scored,
so every token is scored once. The retrieved passages go before the window, the best one
last (closest to the query), and passages that copy the scored text are dropped
(decontamination). Windows keep their token ids: the query is decoded only to search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from datastore.errors import NotFound
from rag.retriever import Retriever, hit_text


@dataclass(frozen=True)
class Window:
    """Token positions of one perplexity window: [begin, score_begin) is the query and
    context, [score_begin, end) is scored."""

    begin: int
    score_begin: int
    end: int

    @property
    def scored(self) -> int:
        return self.end - self.score_begin


def perplexity_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """MassiveDS windows over n tokens: start every `stride`, `window` long (the last one
    shorter), scoring what the previous window did not. The first `window - stride` tokens
    of the text are only ever context, so a text of at most that many tokens scores nothing."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 0 < stride < window:
        raise ValueError(f"stride must be in [1, window), got {stride}")
    out: list[Window] = []
    begin = 0
    while begin + window - stride < n_tokens:
        end = min(begin + window, n_tokens)
        out.append(Window(begin, begin + window - stride, end))
        if end == n_tokens:
            break
        begin += stride
    return out


@dataclass(frozen=True)
class RALMConfig:
    """How retrieved passages enter the prompt."""

    #: Passages prepended per window or prompt.
    k: int = 3
    #: Token budget for the passages (None: whatever the model's context leaves).
    max_context_tokens: int | None = None
    separator: str = "\n\n"
    #: Windows per forward pass in perplexity().
    batch_size: int = 8
    #: Drop passages that copy the scored half (MassiveDS decontamination).
    decontaminate: bool = True

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.max_context_tokens is not None and self.max_context_tokens < 0:
            raise ValueError(f"max_context_tokens must be >= 0, got {self.max_context_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class ScoredInput:
    """One window as the model reads it; labels are -100 except on the scored tokens."""

    input_ids: list[int]
    labels: list[int]
    passages: int = 0


@dataclass(frozen=True)
class PerplexityResult:
    """Token-weighted negative log-likelihood over the scored halves of all windows."""

    nll: float
    tokens: int
    windows: int
    retrieval: bool
    #: Mean passages actually prepended per window (after filters and budget).
    passages_per_window: float = 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.tokens else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": round(self.perplexity, 4), "nll": round(self.nll, 5), "tokens": self.tokens,
                "windows": self.windows, "retrieval": self.retrieval,
                "passages_per_window": round(self.passages_per_window, 3)}


def load_causal_lm(path: str | Path, device: str | None = None):
    """(model, tokenizer) from a local directory; never a hub download."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise NotFound(f"model {path} is not a local directory", resource_type="model",
                       resource_name=str(path),
                       hint="pass a directory written by save_pretrained (e.g. python -m rag.train_tiny)")
    model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    if device:
        model = model.to(device)
    return model.eval(), tokenizer


def encode(tokenizer, text: str) -> list[int]:
    """Token ids without special tokens: callers place BOS and separators themselves, so
    the token accounting of windows and budgets is exact."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_ids(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def max_positions(model) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def context_ids(tokenizer, passages: Sequence[str], budget: int,
                separator: str = "\n\n") -> tuple[list[int], int]:
    """Passages (best first) packed into at most `budget` tokens, laid out worst first so
    that the best passage sits right before the query; the passage that overflows keeps
    only its end, as MassiveDS's left truncation of the whole prompt would leave it.
    Returns (ids, passages used, partly or whole)."""
    sep = encode(tokenizer, separator)
    chosen: list[list[int]] = []
    left = budget
    for text in passages:
        if left <= len(sep):
            break
        ids = encode(tokenizer, text) + sep
        chosen.append(ids[-left:])
        left -= len(chosen[-1])
    return [t for ids in reversed(chosen) for t in ids], len(chosen)


class RetrievalAugmentedLM:
    """A Hugging Face causal LM reading retrieved passages before its input."""

    def __init__(self, model, tokenizer=None, retriever: Retriever | None = None,
                 config: RALMConfig | None = None) -> None:
        """`model`: a transformers causal LM, or a local directory (then `tokenizer` is read
        from it too)."""
        if isinstance(model, (str, Path)):
            model, path_tokenizer = load_causal_lm(model)
            tokenizer = tokenizer or path_tokenizer
        if tokenizer is None:
            raise ValueError("tokenizer is required with a model object")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.config = config or RALMConfig()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _budget(self, following: int) -> int:
        """Tokens left for passages before `following` tokens of query and text."""
        limit = max_positions(self.model)
        budget = self.config.max_context_tokens
        if limit is None:
            if budget is None:
                raise ValueError("max_context_tokens must be set: the model declares no context length")
            return budget
        room = max(0, limit - following - len(bos_ids(self.tokenizer)))
        return room if budget is None else min(room, budget)

    def _passages(self, queries: list[str], references: list[str | None]) -> list[list[str]]:
        """Passage texts per query, best first; a blank query (a window of whitespace) gets none."""
        if self.retriever is None:
            raise ValueError("retrieval needs a retriever")
        asked = [i for i, q in enumerate(queries) if q.strip()]
        refs = [references[i] for i in asked] if self.config.decontaminate else None
        rows = self.retriever.retrieve([queries[i] for i in asked], refs, k=self.config.k) if asked else []
        out: list[list[str]] = [[] for _ in queries]
        for i, row in zip(asked, rows):
            out[i] = [hit_text(h) for h in row]
        return out

    def window_inputs(self, texts: Sequence[str], window: int = 1024, stride: int = 512,
                      retrieval: bool = True) -> list[ScoredInput]:
        """The model inputs of MassiveDS perplexity: per window, BOS + passages (best last) +
        the window's tokens, labels only on its scored part."""
        limit = max_positions(self.model)
        if limit is not None and window + len(bos_ids(self.tokenizer)) > limit:
            raise ValueError(f"window must fit the model's {limit} positions, got {window}")
        if retrieval and self.retriever is None:
            raise ValueError("retrieval=True needs a retriever")
        items: list[tuple[list[int], Window]] = []
        for text in texts:
            ids = encode(self.tokenizer, text)
            items += [(ids, w) for w in perplexity_windows(len(ids), window, stride)]
        found: list[list[str]] = [[] for _ in items]
        if retrieval:  # one call: the retriever batches its requests
            found = self._passages([self.tokenizer.decode(ids[w.begin:w.score_begin]) for ids, w in items],
                                   [self.tokenizer.decode(ids[w.score_begin:w.end]) for ids, w in items])
        bos = bos_ids(self.tokenizer)
        out: list[ScoredInput] = []
        for (ids, w), passages in zip(items, found):
            ctx, used = (context_ids(self.tokenizer, passages, self._budget(w.end - w.begin),
                                     self.config.separator) if passages else ([], 0))
            prefix = bos + ctx + ids[w.begin:w.score_begin]
            scored = ids[w.score_begin:w.end]
            out.append(ScoredInput(prefix + scored, [-100] * len(prefix) + scored, used))
        return out

    def perplexity(self, texts: Sequence[str], window: int = 1024, stride: int = 512,
                   retrieval: bool = True) -> PerplexityResult:
        """MassiveDS perplexity over `texts`, with or without retrieved passages."""
        return self.score(self.window_inputs(texts, window, stride, retrieval), retrieval)

    def score(self, inputs: Sequence[ScoredInput], retrieval: bool) -> PerplexityResult:
        """Perplexity of prepared inputs (from window_inputs, or built by hand for ablations)."""
        nll, tokens = 0.0, 0
        for start in range(0, len(inputs), self.config.batch_size):
            s, n = self._score(inputs[start:start + self.config.batch_size])
            nll, tokens = nll + s, tokens + n
        passages = sum(i.passages for i in inputs)
        return PerplexityResult(nll / tokens if tokens else float("nan"), tokens, len(inputs), retrieval,
                                passages / len(inputs) if inputs else 0.0)

    @torch.no_grad()
    def _score(self, batch: Sequence[ScoredInput]) -> tuple[float, int]:
        """Summed NLL and count of the scored tokens of a batch of windows (right-padded)."""
        width = max(len(item.input_ids) for item in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        dev = self.device
        input_ids = torch.tensor([i.input_ids + [pad] * (width - len(i.input_ids)) for i in batch],
                                 device=dev)
        target = torch.tensor([i.labels + [-100] * (width - len(i.labels)) for i in batch], device=dev)
        mask = torch.tensor([[1] * len(i.input_ids) + [0] * (width - len(i.input_ids)) for i in batch],
                            device=dev)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        target = target[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        return float(loss), int((target != -100).sum())

    def prompt_ids(self, prompt: str, retrieval: bool = True, query: str | None = None) -> list[int]:
        """BOS + retrieved passages (best last) + the prompt, within the model's context."""
        ids = encode(self.tokenizer, prompt)
        ctx: list[int] = []
        if retrieval:
            passages = self._passages([query or prompt], [None])[0]
            ctx, _ = context_ids(self.tokenizer, passages, self._budget(len(ids)), self.config.separator)
        return bos_ids(self.tokenizer) + ctx + ids

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 64, retrieval: bool = True,
                 query: str | None = None, **generate_kwargs) -> str:
        """Continue `prompt` after retrieving with `query` (default: the prompt); returns the
        new text only. Extra keyword arguments go to `model.generate`."""
        ids = torch.tensor([self.prompt_ids(prompt, retrieval, query)], device=self.device)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=max_new_tokens, pad_token_id=pad, **generate_kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
