"""The RAG plugin: retriever (embedded and gRPC), MassiveDS perplexity windows and prompt
layout, RAPID speculative decoding (exact for eta = 0), adapters and CLI.

Language models are tiny transformers built from configs with random weights, over a BPE
tokenizer trained here on a few articles: nothing is downloaded.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from datastore.errors import InvalidArgument
from datastore.records import Passage
from rag import RetrievalAugmentedLM, Retriever, SpeculativeRAG
from rag.lm import RALMConfig, Window, context_ids, encode, load_causal_lm, perplexity_windows
from rag.ra_train import RATrainConfig, TrainText, build_examples, induction_rows, with_copies
from rag.retriever import Reference, RetrieverConfig
from rag.speculative import SpeculativeConfig, augmented_probs
from rag.train_tiny import TinyLMConfig, pack, pad_examples, train, train_examples, train_tokenizer

hf_logging.set_verbosity_error()


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on a loaded machine (no spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(wiki_docs):
    return train_tokenizer([f"{d['title']}\n{d['text']}" for d in wiki_docs], 600)


def gpt2(vocab: int, layers: int = 2, width: int = 64, seed: int = 0, init: float = 0.02,
         positions: int = 1024):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=vocab,
                                      n_positions=positions, initializer_range=init, bos_token_id=0,
                                      eos_token_id=0)).eval()


def llama(vocab: int, seed: int = 1, init: float = 0.02):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=1024, initializer_range=init, bos_token_id=0,
                                        eos_token_id=0)).eval()


def perturbed(model, scale: float, seed: int):
    """A copy of `model` with noise on its weights: a drafter that agrees often, not always."""
    clone = type(model)(model.config).eval()
    clone.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return clone


@pytest.fixture(scope="module")
def embedded(built_dir, encoder, tmp_path_factory):
    """A Retriever over a private copy of the built datastore, opened from its directory."""
    import shutil

    directory = tmp_path_factory.mktemp("rag") / "ds"
    shutil.copytree(built_dir, directory)
    with Retriever(directory, RetrieverConfig(k=4), encoder_factory=lambda name: encoder) as r:
        yield r


# -- retriever --------------------------------------------------------------------------------

QUESTIONS = ["Who painted the Mona Lisa?", "classical music of the twentieth century", "a famous opera",
             "sculpture in ancient Greece", "film directors"]


def test_retriever_embedded_batched_and_best_first(embedded):
    one_batch = embedded.retrieve(QUESTIONS)
    embedded.config = RetrieverConfig(k=4, batch_size=2)
    try:
        small_batches = embedded.retrieve(QUESTIONS)
    finally:
        embedded.config = RetrieverConfig(k=4)
    assert [[h.id for h in row] for row in one_batch] == [[h.id for h in row] for row in small_batches]
    for row in one_batch:
        assert 1 <= len(row) <= 4
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
        assert len({h.id for h in row}) == len(row) and all(h.text for h in row)


def test_retriever_grpc_matches_embedded(server, embedded):
    client, _, port = server
    with Retriever(f"127.0.0.1:{port}", RetrieverConfig(k=4)) as remote:
        got = remote.retrieve(QUESTIONS)
    want = embedded.retrieve(QUESTIONS)
    assert [[h.id for h in row] for row in got] == [[h.id for h in row] for row in want]
    with Retriever(client, RetrieverConfig(k=2, metadata_filter={"chunk": "0"})) as filtered:
        rows = filtered.retrieve(QUESTIONS[:2])
    assert all(h.passage.metadata.get("chunk") == "0" for row in rows for h in row)


def test_dedup_drops_near_identical_passages(server):
    client, _, _ = server
    words = ("the river flows past the old mill where the miller grinds wheat into flour for the village "
             "bakers who sell bread at the market every morning before dawn while the town sleeps").split()
    near = list(words)
    near[-1] = "wakes"  # the last of 31 words changed: 18 of 20 word 13-grams shared (Jaccard 0.9)
    other = "a completely different passage about mountains glaciers and the cold winds of the north".split()
    tag = {"case": "dedup"}
    client.upsert([Passage(-1, " ".join(w), metadata=tag) for w in (words, near, other)])
    raw = Retriever(client, RetrieverConfig(k=3, dedup=False, metadata_filter=tag))
    assert len(raw.retrieve(["the miller grinds wheat"])[0]) == 3
    clean = Retriever(client, RetrieverConfig(k=3, metadata_filter=tag))
    hits = clean.retrieve(["the miller grinds wheat"])[0]
    assert len(hits) == 2 and clean.stats.duplicates_dropped == 1
    assert sum("miller" in h.text for h in hits) == 1


def test_decontamination_rules():
    text = " ".join(f"w{i}" for i in range(60))
    words = text.split()
    assert Reference("x y " + " ".join(words[10:42]) + " z").contaminated(text)  # 32 words shared
    assert not Reference("x y " + " ".join(words[10:41]) + " z").contaminated(text)  # 31 only
    short = words[:20]  # too short for a 32-word run: only the Jaccard rule can fire
    assert Reference(" ".join(short + ["extra"])).contaminated(" ".join(short))  # 8/9 > 0.8
    assert not Reference(" ".join(short[:16] + ["a", "b", "c", "d"])).contaminated(" ".join(short))  # 4/12


def test_retrieve_decontaminates_against_the_reference(embedded):
    hits = embedded.retrieve(["Mona Lisa painting"])[0]
    top = next(h for h in hits if len(h.text.split()) >= 40)  # long enough to share a 32-word run
    reference = "Some preface. " + " ".join(top.text.split()[:40]) + " and more."
    cleaned = embedded.retrieve(["Mona Lisa painting"], references=[reference])[0]
    assert cleaned and top.id not in {h.id for h in cleaned}
    assert embedded.stats.contaminated_dropped >= 1


def test_ephemeral_tenant_sees_only_the_long_input_and_cleans_up(server):
    client, store, _ = server
    before = store.stats().passages
    long_text = " ".join(f"zebra{i} crossing the savanna at dusk" for i in range(60))
    with Retriever(client, RetrieverConfig(k=3)) as r:
        with r.ephemeral(long_text, chunk_words_per_passage=40) as scope:
            assert store.stats().passages > before
            rows = r.retrieve(["zebra crossing"], **scope)[0]
            assert rows and all(h.passage.metadata["rag_session"] == scope["tenant"] for h in rows)
            public = r.retrieve(["zebra crossing the savanna"])[0]
            assert all("zebra" not in h.text for h in public)  # other tenants never see them
    assert store.stats().passages == before


# -- perplexity -------------------------------------------------------------------------------


def test_perplexity_windows_follow_massiveds():
    assert perplexity_windows(10, 4, 2) == [Window(0, 2, 4), Window(2, 4, 6), Window(4, 6, 8),
                                            Window(6, 8, 10)]
    assert perplexity_windows(9, 4, 2)[-1] == Window(6, 8, 9)  # the last window is shorter
    assert perplexity_windows(2, 4, 2) == []  # nothing past the first query
    for n, window, stride in itertools.product([1, 5, 17, 64, 100], [4, 16, 32], [1, 3, 8, 16]):
        if stride >= window:
            with pytest.raises(ValueError, match="stride"):
                perplexity_windows(n, window, stride)
            continue
        ws = perplexity_windows(n, window, stride)
        scored = [t for w in ws for t in range(w.score_begin, w.end)]
        assert scored == list(range(window - stride, n))  # every token past the first query once
        for i, w in enumerate(ws):
            assert w.begin == i * stride and w.score_begin - w.begin == window - stride
            assert w.end - w.begin <= window


def test_perplexity_prompt_layout(embedded, tokenizer, wiki_docs):
    model = gpt2(len(tokenizer), positions=512)
    lm = RetrievalAugmentedLM(model, tokenizer, embedded, RALMConfig(k=2, max_context_tokens=200))
    text = wiki_docs[0]["text"]
    ids = encode(tokenizer, text)
    inputs = lm.window_inputs([text], window=64, stride=32, retrieval=True)
    windows = perplexity_windows(len(ids), 64, 32)
    assert len(inputs) == len(windows) > 1
    for item, w in zip(inputs, windows):
        n_ctx = len(item.input_ids) - (w.end - w.begin) - 1  # BOS, passages, window
        assert item.input_ids[0] == tokenizer.bos_token_id
        assert item.input_ids[1 + n_ctx:] == ids[w.begin:w.end]  # the window, query half first
        unscored = 1 + n_ctx + w.score_begin - w.begin
        assert item.labels[:unscored] == [-100] * unscored
        assert item.labels[-w.scored:] == ids[w.score_begin:w.end]  # only the second half is scored
        assert 0 < n_ctx <= 200 and item.passages >= 1
        query = tokenizer.decode(ids[w.begin:w.score_begin])
        best = embedded.retrieve([query], references=[tokenizer.decode(ids[w.score_begin:w.end])], k=2)[0][0]
        ctx = tokenizer.decode(item.input_ids[1:1 + n_ctx])
        assert ctx.rstrip().endswith(best.text.rstrip())  # best passage right before the query
    blank = lm.window_inputs(["\n\n" * 80 + text], window=64, stride=32)  # whitespace queries ask nothing
    assert blank[0].passages == 0 and blank[-1].passages >= 1
    plain = lm.window_inputs([text], window=64, stride=32, retrieval=False)
    assert [p.input_ids for p in plain] == [[tokenizer.bos_token_id] + ids[w.begin:w.end] for w in windows]


def test_context_packing_keeps_the_best_whole_and_cuts_the_rest_from_the_left(tokenizer):
    best, second, third = ("Mona Lisa by Leonardo.", "A portrait in the Louvre museum of Paris.",
                           "Oil on poplar.")
    sep = encode(tokenizer, "\n\n")
    whole = [encode(tokenizer, t) + sep for t in (best, second, third)]
    budget = len(whole[0]) + 3
    ids, used = context_ids(tokenizer, [best, second, third], budget)
    assert used == 2 and len(ids) == budget
    assert ids == whole[1][-3:] + whole[0]  # worst first, cut from its left; the best last and whole
    everything, used = context_ids(tokenizer, [best, second, third], 10_000)
    assert used == 3 and everything == whole[2] + whole[1] + whole[0]
    assert context_ids(tokenizer, [best], 0) == ([], 0)


def test_perplexity_counts_and_batch_invariance(embedded, tokenizer, wiki_docs):
    texts = [d["text"] for d in wiki_docs[:4]]
    model = gpt2(len(tokenizer), positions=512)
    one = RetrievalAugmentedLM(model, tokenizer, embedded, RALMConfig(k=2, batch_size=1))
    many = RetrievalAugmentedLM(model, tokenizer, embedded, RALMConfig(k=2, batch_size=5))
    for retrieval in (False, True):
        a = one.perplexity(texts, window=48, stride=24, retrieval=retrieval)
        b = many.perplexity(texts, window=48, stride=24, retrieval=retrieval)
        assert a.tokens == b.tokens == sum(max(0, len(encode(tokenizer, t)) - 24) for t in texts)
        assert a.nll == pytest.approx(b.nll, rel=1e-4)  # padding and batching change nothing
        assert 1 < a.perplexity < 10 * len(tokenizer)
    assert one.perplexity(texts, 48, 24, retrieval=True).passages_per_window > 0


def test_generate_prepends_passages(embedded, tokenizer):
    lm = RetrievalAugmentedLM(gpt2(len(tokenizer)), tokenizer, embedded,
                              RALMConfig(k=2, max_context_tokens=300))
    prompt = "The Mona Lisa was painted by"
    with_ctx, without = lm.prompt_ids(prompt), lm.prompt_ids(prompt, retrieval=False)
    assert len(with_ctx) > len(without) and with_ctx[-len(without) + 1:] == without[1:]
    text = lm.generate(prompt, max_new_tokens=5, do_sample=False)
    assert isinstance(text, str)


# -- speculative decoding ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["other-architecture", "noisy-copy", "identical"])
def test_greedy_speculative_equals_target_greedy(kind):
    vocab = 97
    target = gpt2(vocab, init=0.3)
    drafter = {"other-architecture": lambda: llama(vocab), "noisy-copy": lambda: perturbed(target, 0.3, 3),
               "identical": lambda: target}[kind]()
    prompt = torch.randint(1, vocab, (1, 40), generator=torch.Generator().manual_seed(7))
    # a RAG drafter reads less than the target; the identical one reads the same, to accept everything
    draft_ctx = prompt[0].tolist() if kind == "identical" else prompt[0, -12:].tolist()
    want = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[0, 40:].tolist()
    spec = SpeculativeRAG(target, drafter, config=SpeculativeConfig(gamma=4, max_new_tokens=40))
    got, stats = spec.generate_ids(prompt[0].tolist(), draft_ctx)
    assert got == want
    assert stats.new_tokens == 40 and stats.drafted > 0
    assert stats.target_tokens_fed < 40 + 40 * 6  # caches reused: the prompt is fed once
    assert {"other-architecture": stats.acceptance_rate < 0.5, "noisy-copy": 0 < stats.acceptance_rate < 1,
            "identical": stats.acceptance_rate == 1.0}[kind]
    assert spec.target_only_ids(prompt[0].tolist())[0] == want


def _sequence_probs(target, drafter, t_ctx, d_ctx, length, vocab, eta, alpha):
    """Exact probability of every `length`-token continuation under RAPID's r (q when eta = 0)."""
    out = {}
    for seq in itertools.product(range(vocab), repeat=length):
        prob = 1.0
        for i in range(length):
            with torch.no_grad():
                q_logits = target(torch.tensor([t_ctx + list(seq[:i])])).logits[0, -1]
                p = torch.softmax(drafter(torch.tensor([d_ctx + list(seq[:i])])).logits[0, -1], -1)
            prob *= float(augmented_probs(q_logits, p, eta, alpha, 1.0)[seq[i]])
        out[seq] = prob
    return out


@pytest.mark.parametrize("eta", [0.0, 2.0])
def test_sampling_follows_the_target_distribution(eta):
    """Chi-square of 1,500 seeded samples of 3 tokens (27 outcomes) against the exact law:
    the target's for eta = 0, RAPID's augmented target for eta > 0."""
    from scipy.stats import chisquare

    vocab, length, n = 3, 3, 1500
    target, drafter = gpt2(vocab, 1, 16, seed=0, init=0.3), gpt2(vocab, 1, 16, seed=5, init=0.3)
    t_ctx, d_ctx = [0, 1, 2, 1], [2, 2]
    exact = _sequence_probs(target, drafter, t_ctx, d_ctx, length, vocab, eta, 0.3)
    drafts = _sequence_probs(drafter, drafter, d_ctx, d_ctx, length, vocab, 0.0, 0.3)
    assert 0.5 * sum(abs(exact[s] - drafts[s]) for s in exact) > 0.3  # a drafter far from the target
    config = SpeculativeConfig(gamma=2, eta=eta, alpha=0.3, temperature=1.0, max_new_tokens=length)
    spec = SpeculativeRAG(target, drafter, config=config)
    torch.manual_seed(1234)
    counts = dict.fromkeys(exact, 0)
    accepted = drafted = 0
    for _ in range(n):
        ids, stats = spec.generate_ids(t_ctx, d_ctx)
        counts[tuple(ids)] += 1
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    keys = sorted(exact, key=exact.get)
    observed = np.array([counts[s] for s in keys], float)
    expected = np.array([exact[s] for s in keys]) * n
    small = expected < 5  # pool rare outcomes so the chi-square approximation holds
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    assert chisquare(observed, expected).pvalue > 1e-3
    # sampling noise alone puts the TV distance near 0.04 at n = 1,500; the drafter is > 0.3 away
    assert 0.5 * np.abs(observed / n - expected / n).sum() < 0.1
    assert 0 < accepted < drafted  # both acceptance and residual resampling were exercised


def test_augmented_probs_shift_toward_confident_drafts():
    target_logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draft = torch.tensor([0.05, 0.15, 0.7, 0.1])
    q = torch.softmax(target_logits, -1)
    assert torch.allclose(augmented_probs(target_logits, draft, 0.0, 0.1, 1.0), q)
    r = augmented_probs(target_logits, draft, 2.0, 0.2, 1.0)
    assert r[2] > q[2]  # confident draft token pulled up
    logit_shift = torch.log(r) - torch.log(q)
    masked_out = draft < 0.2 * draft.max()  # tokens 0 and 3 are below alpha * max p
    assert masked_out.tolist() == [True, False, False, True]
    assert logit_shift[0] == pytest.approx(float(logit_shift[3]), abs=1e-5)  # untouched: a common offset
    others = logit_shift[~masked_out] - logit_shift[0]
    assert torch.allclose(others, 2.0 * (draft - q)[~masked_out], atol=1e-5)
    with pytest.raises(ValueError, match="gamma"):
        SpeculativeConfig(gamma=0)
    with pytest.raises(ValueError, match="alpha"):
        SpeculativeConfig(alpha=1.5)


def test_text_generation_with_ephemeral_chunks(server, tokenizer, wiki_docs):
    client, store, _ = server
    before = store.stats().passages
    vocab = len(tokenizer)
    target = gpt2(vocab, positions=2048, init=0.3)
    drafter = perturbed(target, 0.2, 11)
    context = "\n\n".join(f"{d['title']}\n{d['text']}" for d in wiki_docs[:6])
    with Retriever(client) as retriever:
        spec = SpeculativeRAG(target, drafter, tokenizer, retriever,
                              SpeculativeConfig(gamma=3, max_new_tokens=20, k=3, draft_context_tokens=300))
        out = spec.generate(wiki_docs[2]["title"], context)
        base = spec.generate(wiki_docs[2]["title"], context, baseline=True)
    assert out.token_ids == base.token_ids and out.text == base.text
    assert out.stats.target_context > 3 * out.stats.draft_context > 0
    assert out.stats.retrieval_seconds > 0 and store.stats().passages == before


def test_train_tiny_saves_a_bloom_model_that_decodes_exactly(tokenizer, wiki_docs, tmp_path):
    """The benchmark's model family (ALiBi Bloom) through training, saving, loading and
    speculative decoding against its own greedy generate()."""
    texts = [d["text"] for d in wiki_docs[:20]]
    rows = pack(tokenizer, texts, 32)
    assert rows.shape[1] == 33 and (rows == tokenizer.eos_token_id).any()
    with pytest.raises(ValueError, match="hidden"):
        TinyLMConfig(hidden=30, heads=4)
    summary = train(texts, TinyLMConfig(layers=1, hidden=32, heads=1, seq_len=32, batch_size=4, steps=2),
                    tmp_path / "lm", tokenizer=tokenizer, log=lambda m: None)
    assert summary.steps == 2 and (tmp_path / "lm" / "train_summary.json").exists()
    model, tok = load_causal_lm(tmp_path / "lm")
    drafter = perturbed(model, 0.5, 1)
    prompt = encode(tok, wiki_docs[0]["text"])[:30]
    want = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 30, dtype=torch.long),
                          max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id,
                          eos_token_id=None)[0, 30:].tolist()
    got, _ = SpeculativeRAG(model, drafter, tok, config=SpeculativeConfig(gamma=3)).generate_ids(
        prompt, prompt[-8:], max_new_tokens=12)
    assert got == want


def test_augmented_training_rows_never_show_a_window_its_own_text(embedded, tokenizer, wiki_docs):
    """Rows are laid out as evaluation windows (BOS + passages, loss on the window only); a
    text's own chunks never reach its passages, while its article's other chunks may."""
    docs = [d for d in wiki_docs if len(d["text"].split()) > 100][:6]
    assert len(docs) >= 3
    texts, leads = [], []
    for d in docs:
        words = d["text"].split()
        texts.append(TrainText(f"{d['title']}\n{d['text']}", d["id"]))  # whole article: no own chunk
        texts.append(TrainText(" ".join(words[64:]), d["id"], range(1, 10**9)))  # tail: may see chunk 0
        leads += [None, " ".join(words[52:64])]  # the end of chunk 0 (a cut passage keeps its end)
    cfg = RATrainConfig(window=48, k=2, context_tokens=120, no_retrieval_fraction=0.0)
    built = build_examples(tokenizer, embedded, texts, cfg, log=lambda m: None)
    assert built.with_passages > 0 and len(built.rows) >= len(texts)
    bos = tokenizer.bos_token_id
    leads_seen = row = 0
    for t, lead in zip(texts, leads):
        ids = encode(tokenizer, t.text)
        for begin in range(0, len(ids), 48):
            window = ids[begin:begin + 48]
            if len(window) < 2:
                continue
            got, labels = built.rows[row]
            row += 1
            n_prefix = len(got) - len(window)
            assert got[0] == bos and got[n_prefix:] == window and n_prefix - 1 <= 120
            assert labels == [-100] * n_prefix + window
            prefix = tokenizer.decode(got[1:n_prefix])
            if lead is None:  # the text is the whole article: none of its chunks may be prepended
                for chunk in (t.text.split("\n", 1)[1].split()[i:i + 64] for i in range(0, 10**4, 64)):
                    if chunk:
                        assert " ".join(chunk[:12]) not in prefix
            elif lead in prefix:
                leads_seen += 1
    assert row == len(built.rows)
    assert leads_seen >= 1  # a tail retrieved its own lead, as a held-out tail will
    none = build_examples(tokenizer, embedded, texts[:2], RATrainConfig(window=48, no_retrieval_fraction=1.0),
                          log=lambda m: None)
    assert none.with_passages == 0 and all(r[0][0] == bos and r[1][0] == -100 for r in none.rows)


def test_copy_curriculum_adds_a_span_of_the_window_within_budget():
    window = list(range(100, 140))
    rows = [([1] + [50] * 30 + window, [-100] * 31 + window), ([1] + window, [-100] + window)]
    out = with_copies(rows * 20, 0.5, [7], [1], budget=40, seed=3)
    copied = 0
    for (ids, labels), (old_ids, _) in zip(out, rows * 20):
        n_prefix = len(ids) - len(window)
        assert ids[n_prefix:] == window and labels == [-100] * n_prefix + window and ids[0] == 1
        assert n_prefix - 1 <= 40
        if old_ids == [1] + window:  # no passages: stays a plain row
            assert ids == old_ids
        elif ids != old_ids:
            copied += 1
            ctx = ids[1:n_prefix]
            span = [t for t in ctx if t >= 100]  # the passage tokens are 50s, the separator 7
            start = ctx.index(span[0])
            assert ctx[start:start + len(span) + 1] == span + [7]  # one piece, then a separator
            assert len(span) >= 20 and span == list(range(span[0], span[0] + len(span)))
    assert 3 <= copied <= 17
    assert with_copies(rows, 0.0, [7], [1], 40) == rows
    with pytest.raises(ValueError, match="fraction"):
        with_copies(rows, 1.5, [7], [1], 40)


def test_induction_rows_repeat_random_tokens_with_loss_on_the_repeat():
    rows = induction_rows(50, 300, 5, [0], min_len=3, max_len=9, seed=1)
    lengths = set()
    for ids, labels in rows:
        n = (len(ids) - 1) // 2
        lengths.add(n)
        assert ids[0] == 0 and ids[1:1 + n] == ids[1 + n:] and all(5 <= t < 300 for t in ids[1:])
        assert labels == [-100] * (1 + n) + ids[1 + n:]
    assert min(lengths) >= 3 and max(lengths) <= 9 and len(lengths) > 3
    assert induction_rows(5, 300, 5, [0], seed=1) == induction_rows(5, 300, 5, [0], seed=1)
    with pytest.raises(ValueError, match="min_len"):
        induction_rows(1, 300, 5, [0], min_len=5, max_len=2)


def test_train_examples_pads_and_masks(tokenizer, tmp_path):
    ids, labels, mask = pad_examples([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    with pytest.raises(ValueError, match="labels"):
        pad_examples([([1, 2], [1])], 0)
    rows = [([tokenizer.bos_token_id] + list(range(10, 10 + n)), [-100] + list(range(10, 10 + n)))
            for n in (5, 9, 12)]
    summary = train_examples(rows, TinyLMConfig(layers=1, hidden=32, heads=1, batch_size=2, steps=2),
                             tmp_path / "lm", tokenizer, log=lambda m: None)
    assert summary.steps == 2 and summary.tokens > 0
    assert load_causal_lm(tmp_path / "lm")[0].config.n_layer == 1


# -- adapters and CLI -------------------------------------------------------------------------


def test_langchain_adapter(embedded):
    pytest.importorskip("langchain_core", reason="langchain-core is an optional extra")
    from rag.adapters import as_langchain

    docs = as_langchain(embedded, k=3).invoke("Who painted the Mona Lisa?")
    want = embedded.retrieve(["Who painted the Mona Lisa?"], k=3)[0]
    assert [d.id for d in docs] == [str(h.id) for h in want]
    assert [d.metadata["id"] for d in docs] == [h.id for h in want]
    assert [d.metadata["score"] for d in docs] == pytest.approx([h.score for h in want])
    assert all(d.page_content for d in docs)


def test_llamaindex_adapter(embedded):
    pytest.importorskip("llama_index.core", reason="llama-index-core is an optional extra")
    from rag.adapters import as_llamaindex

    nodes = as_llamaindex(embedded, k=3).retrieve("Who painted the Mona Lisa?")
    want = embedded.retrieve(["Who painted the Mona Lisa?"], k=3)[0]
    assert [n.node.node_id for n in nodes] == [str(h.id) for h in want]
    assert [n.score for n in nodes] == pytest.approx([h.score for h in want])
    assert all(n.node.metadata["id"] == h.id for n, h in zip(nodes, want))


def test_cli_perplexity_and_speculative(server, tokenizer, wiki_docs, tmp_path):
    from click.testing import CliRunner

    from rag.cli import rag

    _, _, port = server
    model_dir = tmp_path / "lm"
    model = gpt2(len(tokenizer), positions=512)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in wiki_docs[:3]))
    address = f"127.0.0.1:{port}"
    runner = CliRunner()
    res = runner.invoke(rag, ["perplexity", address, "--model", str(model_dir), "--texts", str(texts),
                              "--window", "64", "--stride", "32", "-k", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["with_retrieval"]["tokens"] == report["without_retrieval"]["tokens"] > 0
    res = runner.invoke(rag, ["speculative", address, "--target-model", str(model_dir), "--drafter-model",
                              str(model_dir), "--prompt", "Music", "--max-new-tokens", "8", "--compare"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["stats"]["acceptance_rate"] == 1.0 and report["text"] == report["target_only"]["text"]
    bad = runner.invoke(rag, ["speculative", address, "--target-model", str(model_dir), "--drafter-model",
                              str(model_dir), "--prompt", "x", "--gamma", "0"])
    assert isinstance(bad.exception, InvalidArgument) and "gamma" in str(bad.exception)


def test_retriever_closes_only_what_it_opened(open_store):
    with Retriever(open_store) as r:
        assert r.retrieve(["opera"], k=2)[0]
    assert open_store.shards and open_store.search(["opera"], k=1)[0]
