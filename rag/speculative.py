"""Retrieval-augmented speculative decoding (RAPID: Chen et al., ICML 2025; John-AI-Lab/RAPID).

The target LM reads the whole long input; the drafter reads only retrieved chunks of it (or
of the datastore) plus the prompt, so drafting stays cheap however long the input is. Each
step the drafter proposes `gamma` tokens; the target scores them all in one forward pass.

Retrieval-augmented target: with drafter distribution p and target distribution q (both at
the sampling temperature), the target's logits are shifted by eta * mask * (p - q), where
mask = p >= alpha * max p keeps the shift to tokens the drafter is confident about (as in
`_speculative_sampling` of the RAPID code, where eta is `m`). Tokens are then accepted with
probability min(1, r(x) / p(x)) against the shifted distribution r, and a rejection samples
from norm(max(r - p, 0)): the standard rule, so the output follows r exactly, and with
eta = 0 it follows the target exactly. Two choices differ from the RAPID code, both so that
every token follows r: the residual is the standard one (the code mixes in p - r), and when
eta > 0 the bonus token after g accepted drafts comes from r too (the drafter runs one more
position), not from the plain target. Greedy decoding (temperature 0) accepts a draft
token when it is the argmax of r.

The mask is taken over the drafter's p: that is what the RAPID code does (`teacher_prob`)
and what "where the drafter is confident" means, whatever letter a write-up gives it.

Both models keep their KV caches across steps; a rejection crops them to the accepted prefix.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from transformers import DynamicCache

from rag.lm import bos_ids, context_ids, encode, load_causal_lm
from rag.retriever import Retriever, hit_text


@dataclass(frozen=True)
class SpeculativeConfig:
    """Decoding knobs (RAPID's names where it has them)."""

    #: Draft tokens per step.
    gamma: int = 4
    #: Strength of the drafter's pull on the target; 0 keeps the target's distribution exact.
    eta: float = 0.0
    #: The shift applies where p >= alpha * max p (the drafter's confident tokens).
    alpha: float = 0.1
    #: 0 decodes greedily.
    temperature: float = 0.0
    max_new_tokens: int = 64
    #: Chunks retrieved for the drafter.
    k: int = 8
    #: Token budget of the drafter's retrieved context.
    draft_context_tokens: int = 1024
    #: Words per chunk when a long input is chunked for retrieval.
    chunk_words: int = 64
    #: Tokens fed per forward pass when a long prompt fills a cache.
    prefill_chunk: int = 2048
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.draft_context_tokens < 0:
            raise ValueError(f"draft_context_tokens must be >= 0, got {self.draft_context_tokens}")
        if self.chunk_words < 1:
            raise ValueError(f"chunk_words must be >= 1, got {self.chunk_words}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")


@dataclass
class SpeculativeStats:
    """Counts and wall times of one generation."""

    new_tokens: int = 0
    steps: int = 0
    #: Tokens run through the target, prompt included: the KV cache keeps this near
    #: prompt + steps * (gamma + 1) instead of growing with steps * prompt.
    target_tokens_fed: int = 0
    drafted: int = 0
    accepted: int = 0
    target_context: int = 0
    draft_context: int = 0
    retrieval_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens over prefill and decoding (retrieval excluded: it is reported apart)."""
        total = self.prefill_seconds + self.decode_seconds
        return self.new_tokens / total if total else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}
        for name in ("acceptance_rate", "tokens_per_step", "tokens_per_s", "decode_tokens_per_s"):
            d[name] = round(getattr(self, name), 4)
        return d


@dataclass
class SpeculativeOutput:
    text: str
    token_ids: list[int]
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)


def probs_at(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature); temperature 0 (greedy) reads as 1, only argmax matters then."""
    return torch.softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)


def augmented_probs(target_logits: torch.Tensor, draft_probs: torch.Tensor, eta: float, alpha: float,
                    temperature: float) -> torch.Tensor:
    """RAPID's retrieval-augmented target distribution r over the last dimension."""
    q = probs_at(target_logits, temperature)
    if eta == 0:
        return q
    mask = draft_probs >= alpha * draft_probs.max(dim=-1, keepdim=True).values
    scaled = target_logits / (temperature if temperature > 0 else 1.0)
    return torch.softmax(scaled + eta * mask * (draft_probs - q), dim=-1)


class _CachedLM:
    """A causal LM over a growing token sequence, feeding only what its KV cache lacks."""

    def __init__(self, model, ids: Sequence[int]) -> None:
        if len(ids) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        self.model = model
        self.ids = list(ids)
        self.cache = DynamicCache(config=model.config)
        self.cached = 0
        self.fed = 0
        self.device = next(model.parameters()).device

    def prefill(self, chunk: int) -> None:
        """Cache all but the last token, `chunk` tokens per forward pass."""
        while self.cached < len(self.ids) - 1:
            stop = min(self.cached + chunk, len(self.ids) - 1)
            self._forward(self.ids[self.cached:stop], 1)

    def next_logits(self, rows: int = 1) -> torch.Tensor:
        """Feed the uncached tokens; float logits (rows, vocab) of the last `rows` positions,
        the last row predicting the token after ids[-1]."""
        pending = self.ids[self.cached:]
        if len(pending) < rows:
            raise ValueError(f"{rows} rows asked, {len(pending)} tokens pending")
        return self._forward(pending, rows)

    @torch.no_grad()
    def _forward(self, tokens: list[int], rows: int) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.device)
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=rows)
        self.cached += len(tokens)
        self.fed += len(tokens)
        return out.logits[0, -rows:].float()

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (and at most their cache)."""
        del self.ids[n:]
        if self.cached > n:
            self.cache.crop(n - self.cached)
            self.cached = n


def _choose(probs: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> int:
    if greedy:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def _residual(r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """norm(max(r - p, 0)); r itself where the two agree to rounding (nothing to correct)."""
    res = torch.clamp(r - p, min=0)
    total = res.sum()
    return res / total if total > 1e-12 else r


class SpeculativeRAG:
    """A long-context target LM verifying a retrieval-fed drafter's tokens (RAPID)."""

    def __init__(self, target, drafter, tokenizer=None, retriever: Retriever | None = None,
                 config: SpeculativeConfig | None = None) -> None:
        """`target`, `drafter`: transformers causal LMs sharing one vocabulary, or local
        directories (the tokenizer is then read from the target's)."""
        if isinstance(target, (str, Path)):
            target, path_tokenizer = load_causal_lm(target)
            tokenizer = tokenizer or path_tokenizer
        if isinstance(drafter, (str, Path)):
            drafter, _ = load_causal_lm(drafter)
        vt = target.get_output_embeddings().weight.shape[0]
        vd = drafter.get_output_embeddings().weight.shape[0]
        if vt != vd:
            raise ValueError(f"drafter vocabulary ({vd}) must equal the target's ({vt})")
        self.target = target.eval()
        self.drafter = drafter.eval()
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.config = config or SpeculativeConfig()

    # -- token level ----------------------------------------------------------------------------

    def _generator(self) -> torch.Generator | None:
        if self.config.seed is None:
            return None
        g = torch.Generator(device=next(self.target.parameters()).device)
        g.manual_seed(self.config.seed)
        return g

    def generate_ids(self, target_ids: Sequence[int], draft_ids: Sequence[int],
                     max_new_tokens: int | None = None,
                     eos_token_id: int | None = None) -> tuple[list[int], SpeculativeStats]:
        """New tokens after `target_ids` (what the target reads) with drafts conditioned on
        `draft_ids` (what the drafter reads); stops after `eos_token_id` if given."""
        c = self.config
        limit = max_new_tokens or c.max_new_tokens
        greedy = c.temperature == 0
        gen = self._generator()
        stats = SpeculativeStats(target_context=len(target_ids), draft_context=len(draft_ids))
        target, draft = _CachedLM(self.target, target_ids), _CachedLM(self.drafter, draft_ids)
        t0 = time.perf_counter()
        target.prefill(c.prefill_chunk)
        draft.prefill(c.prefill_chunk)
        t1 = time.perf_counter()
        stats.prefill_seconds = t1 - t0
        out: list[int] = []
        while len(out) < limit and (eos_token_id is None or not out or out[-1] != eos_token_id):
            g = min(c.gamma, limit - len(out) - 1)  # the step's own token always comes on top
            t_len, d_len = len(target.ids), len(draft.ids)
            ta = time.perf_counter()
            drafts, draft_probs = [], []
            for _ in range(g):
                p = probs_at(draft.next_logits()[-1], c.temperature)
                x = _choose(p, greedy, gen)
                drafts.append(x)
                draft_probs.append(p)
                draft.ids.append(x)
            if c.eta > 0:  # the drafter's view of the bonus position, so that every token follows r
                draft_probs.append(probs_at(draft.next_logits()[-1], c.temperature))
            tb = time.perf_counter()
            target.ids.extend(drafts)
            logits = target.next_logits(g + 1)
            n, token = self._verify(logits, drafts, draft_probs, greedy, gen)
            stats.draft_seconds += tb - ta
            stats.verify_seconds += time.perf_counter() - tb
            stats.steps += 1
            stats.drafted += g
            stats.accepted += n
            new = drafts[:n] + [token]
            if eos_token_id is not None and eos_token_id in new:
                new = new[:new.index(eos_token_id) + 1]
            out.extend(new)
            target.truncate(t_len + n)
            target.ids.append(token)
            draft.truncate(d_len + n)
            draft.ids.append(token)
        stats.decode_seconds = time.perf_counter() - t1
        stats.new_tokens = len(out)
        stats.target_tokens_fed = target.fed
        return out, stats

    def _verify(self, logits: torch.Tensor, drafts: list[int], draft_probs: list[torch.Tensor], greedy: bool,
                gen: torch.Generator | None) -> tuple[int, int]:
        """(accepted drafts, the token that follows them) from the target's g + 1 rows."""
        c = self.config
        for i, x in enumerate(drafts):
            r = augmented_probs(logits[i], draft_probs[i], c.eta, c.alpha, c.temperature)
            if greedy:
                if int(r.argmax()) != x:
                    return i, int(r.argmax())
                continue
            u = torch.rand((), generator=gen, device=r.device)
            if u * draft_probs[i][x] > r[x]:  # reject with probability 1 - min(1, r(x) / p(x))
                return i, _choose(_residual(r, draft_probs[i]), False, gen)
        g = len(drafts)  # every draft accepted: the bonus token follows r too (plain q when eta = 0)
        bonus = (augmented_probs(logits[g], draft_probs[g], c.eta, c.alpha, c.temperature)
                 if len(draft_probs) > g else probs_at(logits[g], c.temperature))
        return g, _choose(bonus, greedy, gen)

    def target_only_ids(self, target_ids: Sequence[int], max_new_tokens: int | None = None,
                        eos_token_id: int | None = None) -> tuple[list[int], SpeculativeStats]:
        """The baseline: the target decoding alone with the same cache and sampling code."""
        c = self.config
        limit = max_new_tokens or c.max_new_tokens
        gen = self._generator()
        stats = SpeculativeStats(target_context=len(target_ids))
        target = _CachedLM(self.target, target_ids)
        t0 = time.perf_counter()
        target.prefill(c.prefill_chunk)
        t1 = time.perf_counter()
        stats.prefill_seconds = t1 - t0
        out: list[int] = []
        while len(out) < limit and (eos_token_id is None or not out or out[-1] != eos_token_id):
            probs = probs_at(target.next_logits()[-1], c.temperature)
            token = _choose(probs, c.temperature == 0, gen)
            out.append(token)
            target.ids.append(token)
            stats.steps += 1
        stats.decode_seconds = time.perf_counter() - t1
        stats.new_tokens = len(out)
        stats.target_tokens_fed = target.fed
        return out, stats

    # -- text level -----------------------------------------------------------------------------

    def draft_passages(self, prompt: str, context: str | None,
                       source: Literal["context", "datastore"]) -> list[str]:
        """Chunks for the drafter, best first: from the long input (upserted into a private
        tenant, retrieved, deleted) or from the datastore."""
        if self.retriever is None:
            raise ValueError("drafting from retrieved chunks needs a retriever")
        c = self.config
        if source == "context":
            if not context:
                raise ValueError("source='context' needs a long input")
            with self.retriever.ephemeral(context, c.chunk_words) as scope:
                rows = self.retriever.retrieve([prompt], k=c.k, **scope)
        else:
            rows = self.retriever.retrieve([prompt], k=c.k)
        return [hit_text(h) for h in rows[0]]

    def generate(self, prompt: str, context: str | None = None,
                 source: Literal["context", "datastore"] | None = None, max_new_tokens: int | None = None,
                 baseline: bool = False, stop_at_eos: bool = True) -> SpeculativeOutput:
        """Continue `prompt`; the target reads `context` + `prompt`, the drafter retrieved
        chunks + `prompt`. `source` defaults to the context when one is given. With
        `baseline`, the target decodes alone (for speed and quality comparisons); without
        `stop_at_eos`, exactly `max_new_tokens` come (fixed-length timing)."""
        if self.tokenizer is None:
            raise ValueError("text generation needs a tokenizer")
        tok = self.tokenizer
        prompt_ids = encode(tok, prompt)
        long_ids = encode(tok, context + "\n\n") if context else []
        target_ids = bos_ids(tok) + long_ids + prompt_ids
        eos = tok.eos_token_id if stop_at_eos else None
        if baseline:
            ids, stats = self.target_only_ids(target_ids, max_new_tokens, eos)
            return SpeculativeOutput(tok.decode(ids, skip_special_tokens=True), ids, stats)
        t = time.perf_counter()
        passages = self.draft_passages(prompt, context, source or ("context" if context else "datastore"))
        retrieval_seconds = time.perf_counter() - t
        ctx, _ = context_ids(tok, passages, self.config.draft_context_tokens)
        draft_ids = bos_ids(tok) + ctx + prompt_ids
        ids, stats = self.generate_ids(target_ids, draft_ids, max_new_tokens, eos)
        stats.retrieval_seconds = retrieval_seconds
        return SpeculativeOutput(tok.decode(ids, skip_special_tokens=True), ids, stats)
