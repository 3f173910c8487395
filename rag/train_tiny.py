"""Train a small causal LM on text in minutes on a CPU: no model ships offline, and the RAG
benchmark needs one that has seen the corpus.

A byte-level BPE tokenizer is trained on the texts (seconds), then a Bloom-style model is
trained on the texts packed into fixed-length rows, documents separated by <|endoftext|>.
Bloom's ALiBi positions are why: trained on short rows, it still reads inputs many times
longer (RAPID's long contexts), where rotary models fall apart past their training length. The wall
budget fixes the number of steps after three timed steps; `--steps` fixes it outright for
a run that repeats exactly. The result is a `save_pretrained` directory that
`rag.lm.load_causal_lm` (and any transformers user) reads.

    python -m rag.train_tiny --out runs/rag/tiny-lm --docs 2000 --minutes 3

`train_examples` trains on prepared rows instead, e.g. the retrieval-augmented windows of
`rag.ra_train` (see rag/README.md and `python -m rag.bench_rag`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import click
import torch

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TinyLMConfig:
    """Model shape and training budget."""

    layers: int = 4
    hidden: int = 256
    heads: int = 4
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    #: Wall-clock budget; the step count follows from the speed of the first steps.
    minutes: float = 4.0
    #: Exact number of steps (overrides `minutes`), for runs that repeat exactly.
    steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden must be a multiple of heads ({self.heads}), got {self.hidden}")
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size must be >= 260 (bytes + specials), got {self.vocab_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    seconds: float
    first_loss: float
    final_loss: float
    parameters: int
    out: str


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (any text encodes; decode inverts encode), EOS as BOS/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def build_model(cfg: TinyLMConfig, vocab_size: int, eos_id: int):
    """A freshly initialised Bloom-style (ALiBi) causal LM of the configured shape."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(cfg.seed)
    config = BloomConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads,
                         bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return BloomForCausalLM(config)


def pack(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Texts joined by EOS and cut into rows of seq_len + 1 tokens (inputs and shifted labels)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream += ids + [eos]
    rows = len(stream) // (seq_len + 1)
    if rows == 0:
        raise ValueError(f"texts hold {len(stream)} tokens, fewer than one row of {seq_len + 1}")
    return torch.tensor(stream[:rows * (seq_len + 1)]).view(rows, seq_len + 1)


def train(texts: Sequence[str], cfg: TinyLMConfig, out: Path, tokenizer=None,
          log: Callable[[str], None] = print) -> TrainSummary:
    """Train on `texts` (a new tokenizer unless one is given) and save model + tokenizer to `out`."""
    t_start = time.perf_counter()
    tokenizer = tokenizer or train_tokenizer(texts, cfg.vocab_size)
    data = pack(tokenizer, texts, cfg.seq_len)
    log(f"{data.numel():,} tokens in {len(data)} rows")
    return _fit(lambda idx: (data[idx], data[idx], None), len(data), cfg, out, tokenizer, log, t_start)


def pad_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]],
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask) of variable-length (ids, labels) rows, right-padded;
    labels are -100 where nothing is learnt (retrieved context, padding)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (i, lab) in enumerate(examples):
        if len(i) != len(lab):
            raise ValueError(f"example {row}: {len(i)} ids but {len(lab)} labels")
        ids[row, :len(i)] = torch.tensor(i)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(i)] = 1
    return ids, labels, mask


def train_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], cfg: TinyLMConfig, out: Path,
                   tokenizer, log: Callable[[str], None] = print, init: Path | None = None) -> TrainSummary:
    """Train on prepared (ids, labels) rows of any length up to a few hundred tokens, e.g.
    retrieval-augmented windows (rag.ra_train) whose prepended passages carry no loss.
    `init`: continue from the model saved there (a curriculum's earlier stage) instead of
    a fresh one; `cfg`'s shape is then ignored."""
    t_start = time.perf_counter()
    if not examples:
        raise ValueError("examples must not be empty")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log(f"{sum(len(i) for i, _ in examples):,} tokens in {len(examples)} examples")

    def batch(idx: torch.Tensor):
        return pad_examples([examples[int(i)] for i in idx], pad)

    return _fit(batch, len(examples), cfg, out, tokenizer, log, t_start, init)


def _fit(get_batch: Callable[[torch.Tensor], tuple], rows: int, cfg: TinyLMConfig, out: Path, tokenizer,
         log: Callable[[str], None], t_start: float, init: Path | None = None) -> TrainSummary:
    """The training loop: AdamW, warmup then cosine decay, shuffled epochs over `rows` rows."""
    if init is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(init, local_files_only=True)
    else:
        model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    params = sum(p.numel() for p in model.parameters())
    log(f"{params / 1e6:.1f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(rows, generator=gen)
    total = cfg.steps or 10**9
    step, cursor, first, loss_ema, tokens = 0, 0, float("nan"), float("nan"), 0
    model.train()
    t_train = time.perf_counter()
    while step < total:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(rows, generator=gen), 0
        input_ids, labels, mask = get_batch(order[cursor:cursor + cfg.batch_size])
        cursor += cfg.batch_size
        scale = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        if cfg.steps is not None or step >= 3:
            scale *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * scale
        loss = _loss(model, input_ids, labels, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += int(input_ids.numel() if mask is None else mask.sum())
        value = loss.item()
        first = value if step == 1 else first
        loss_ema = value if step == 1 else 0.9 * loss_ema + 0.1 * value
        if cfg.steps is None and step == 3:  # the budget becomes a step count
            per_step = (time.perf_counter() - t_train) / 3
            total = max(4, int(cfg.minutes * 60 / per_step))
            log(f"{per_step:.2f} s/step: {total} steps in {cfg.minutes:g} min")
        if step % 25 == 0 or step == total:
            log(f"step {step}/{total} loss {loss_ema:.3f}")
    model.eval()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the log lines above are the progress
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = TrainSummary(step, tokens, time.perf_counter() - t_start, first, loss_ema, params, str(out))
    (out / "train_summary.json").write_text(json.dumps({"config": asdict(cfg), **asdict(summary)}, indent=1))
    return summary


def _loss(model, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (labels[t + 1] given ids[: t + 1]).

    The output layer runs only where a label is: with retrieved passages carrying no loss,
    that skips most of the largest matrix product of a tiny model (vocab x hidden per token)."""
    hidden = model.base_model(input_ids=input_ids[:, :-1],
                              attention_mask=None if mask is None else mask[:, :-1]).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[keep])
    return torch.nn.functional.cross_entropy(logits, target[keep])


def corpus_texts(docs: int | None) -> list[str]:
    """Articles of the default corpus as "title\\ntext", the layout retrieved passages have."""
    from datastore.corpus import iter_default_corpus

    return [f"{a.title}\n{a.text}" for a in iter_default_corpus(docs) if a.text.strip()]


@click.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to save to.")
@click.option("--docs", type=int, default=None, help="First N articles of the default corpus [all].")
@click.option("--layers", default=4, show_default=True)
@click.option("--hidden", default=256, show_default=True)
@click.option("--heads", default=4, show_default=True)
@click.option("--vocab-size", default=4096, show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--minutes", default=4.0, show_default=True, help="Wall budget (sets the step count).")
@click.option("--steps", type=int, default=None, help="Exact step count instead of a budget.")
@click.option("--threads", type=int, default=None, help="torch threads [torch's default].")
@click.option("--seed", default=0, show_default=True)
def main(out, docs, layers, hidden, heads, vocab_size, seq_len, batch_size, lr, minutes, steps, threads,
         seed) -> None:
    """Train a tiny Bloom-style LM on the default corpus and save it to OUT."""
    if threads:
        torch.set_num_threads(threads)
    cfg = TinyLMConfig(layers=layers, hidden=hidden, heads=heads, vocab_size=vocab_size, seq_len=seq_len,
                       batch_size=batch_size, lr=lr, minutes=minutes, steps=steps, seed=seed)
    summary = train(corpus_texts(docs), cfg, out, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(asdict(summary)))


if __name__ == "__main__":
    sys.exit(main())
