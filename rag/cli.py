"""`datastore rag ...`: perplexity, generation and speculative decoding against a datastore.

TARGET is a datastore directory (opened embedded) or a server's host:port, as for
`datastore search`; models are local directories (save_pretrained), never downloads.
Every command prints one JSON object. Bad arguments raise InvalidArgument, which the
`datastore` entry point prints as one line with exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import click

from datastore.errors import InvalidArgument, NotFound


def _filters(items: Sequence[str]) -> dict[str, str] | None:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument.field("filter", f"{item!r} is not KEY=VALUE")
        out[key] = value
    return out or None


def _texts(path: Path) -> list[str]:
    """A JSONL file's "text" fields, or a text file's blank-line-separated paragraphs."""
    if not path.exists():
        raise NotFound(f"texts file {path} does not exist")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise InvalidArgument(f"{path}:{n}: each line must be an object with a string \"text\"")
                texts.append(record["text"])
        return texts
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def _retriever(target: str, k: int, tenant: str | None, filters: Sequence[str], decontaminate_words: int):
    from rag.retriever import Retriever, RetrieverConfig

    config = _config(RetrieverConfig, k=k, tenant=tenant, metadata_filter=_filters(filters),
                     decontam_overlap_words=decontaminate_words)
    return Retriever(target, config)


def _config(cls, **kwargs):
    """A config dataclass, its ValueError turned into the CLI's one-line error."""
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def _retrieval_options(f):
    for option in reversed([
        click.argument("target"),
        click.option("-k", "k", default=3, show_default=True, help="Passages retrieved per query."),
        click.option("--tenant", default=None, help="Retrieve as this tenant."),
        click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
                     help="Metadata passages must have."),
        click.option("--decontaminate-words", default=32, show_default=True,
                     help="Drop passages sharing this many consecutive words with the scored text."),
    ]):
        f = option(f)
    return f


def _echo(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


@click.group("rag")
def rag() -> None:
    """Retrieval-augmented LMs over a datastore: perplexity, generate, speculative."""


@rag.command()
@_retrieval_options
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Local causal LM directory.")
@click.option("--texts", "texts_file", required=True, type=click.Path(path_type=Path),
              help="JSONL with a \"text\" field, or text with blank-line-separated paragraphs.")
@click.option("--window", default=1024, show_default=True, help="Tokens per window.")
@click.option("--stride", default=512, show_default=True, help="Tokens between window starts.")
@click.option("--max-context-tokens", type=int, default=None, help="Token budget of the retrieved passages.")
@click.option("--batch-size", default=8, show_default=True)
def perplexity(target, k, tenant, filters, decontaminate_words, model, texts_file, window, stride,
               max_context_tokens, batch_size) -> None:
    """MassiveDS perplexity of TEXTS with and without retrieval from TARGET."""
    from rag.lm import RALMConfig, RetrievalAugmentedLM

    texts = _texts(texts_file)
    if not texts:
        raise InvalidArgument.field("texts", f"{texts_file} holds no text")
    config = _config(RALMConfig, k=k, max_context_tokens=max_context_tokens, batch_size=batch_size)
    with _retriever(target, k, tenant, filters, decontaminate_words) as retriever:
        lm = RetrievalAugmentedLM(model, retriever=retriever, config=config)
        try:
            without = lm.perplexity(texts, window, stride, retrieval=False)
            with_ = lm.perplexity(texts, window, stride, retrieval=True)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        _echo({"window": window, "stride": stride, "k": k, "without_retrieval": without.to_dict(),
               "with_retrieval": with_.to_dict(), "filters": vars(retriever.stats)})


@rag.command()
@_retrieval_options
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Local causal LM directory.")
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--retrieval/--no-retrieval", default=True, show_default=True)
def generate(target, k, tenant, filters, decontaminate_words, model, prompt, max_new_tokens,
             retrieval) -> None:
    """Greedy continuation of PROMPT with retrieved passages from TARGET prepended."""
    from rag.lm import RALMConfig, RetrievalAugmentedLM

    with _retriever(target, k, tenant, filters, decontaminate_words) as retriever:
        lm = RetrievalAugmentedLM(model, retriever=retriever, config=_config(RALMConfig, k=k))
        text = lm.generate(prompt, max_new_tokens=max_new_tokens, retrieval=retrieval, do_sample=False)
        _echo({"prompt": prompt, "text": text, "retrieval": retrieval})


@rag.command()
@_retrieval_options
@click.option("--target-model", required=True, type=click.Path(path_type=Path), help="The long-context LM.")
@click.option("--drafter-model", required=True, type=click.Path(path_type=Path), help="The RAG drafter LM.")
@click.option("--prompt", required=True)
@click.option("--context-file", type=click.Path(path_type=Path), help="Long input the target reads whole.")
@click.option("--source", type=click.Choice(["context", "datastore"]), default=None,
              help="Where the drafter's chunks come from [context when given, else datastore].")
@click.option("--gamma", default=4, show_default=True)
@click.option("--eta", default=0.0, show_default=True)
@click.option("--alpha", default=0.1, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 decodes greedily.")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--draft-context-tokens", default=1024, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--compare", is_flag=True, help="Also decode with the target alone and report the speedup.")
def speculative(target, k, tenant, filters, decontaminate_words, target_model, drafter_model, prompt,
                context_file, source, gamma, eta, alpha, temperature, max_new_tokens, draft_context_tokens,
                seed, compare) -> None:
    """RAPID speculative decoding: a retrieval-fed drafter, a long-context target."""
    from rag.speculative import SpeculativeConfig, SpeculativeRAG

    if context_file is not None and not context_file.exists():
        raise NotFound(f"context file {context_file} does not exist")
    context = context_file.read_text(encoding="utf-8") if context_file else None
    config = _config(SpeculativeConfig, gamma=gamma, eta=eta, alpha=alpha, temperature=temperature,
                     max_new_tokens=max_new_tokens, k=k, draft_context_tokens=draft_context_tokens, seed=seed)
    with _retriever(target, k, tenant, filters, decontaminate_words) as retriever:
        spec = SpeculativeRAG(target_model, drafter_model, retriever=retriever, config=config)
        try:
            out = spec.generate(prompt, context, source)
            report = {"prompt": prompt, "text": out.text, "stats": out.stats.to_dict()}
            if compare:
                base = spec.generate(prompt, context, baseline=True)
                report["target_only"] = {"text": base.text, "stats": base.stats.to_dict()}
                spent = out.stats.prefill_seconds + out.stats.decode_seconds
                report["speedup"] = round((base.stats.prefill_seconds + base.stats.decode_seconds) / spent, 3)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        _echo(report)
