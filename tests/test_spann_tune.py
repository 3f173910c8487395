"""SPANN's RNG factor chosen at build (index/spann_tune.py): the strict rule where replicas
only repeat what a query reads anyway, a lax one where they save lists, a fixed fallback
on small samples, and the choice kept across a save."""

import numpy as np

from index import spann_tune
from index.spann import SpannIndex


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int = 20_000, d: int = 64, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Tight clusters, each cut into ~10 lists: the syn384 case in small."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, d)))
    return _unit(centres[rng.integers(0, clusters, n)] + 0.1 * rng.standard_normal((n, d)))


def _isotropic(n: int = 20_000, d: int = 32, seed: int = 0) -> np.ndarray:
    """No clusters at all: a neighbour often lies across a list boundary."""
    return _unit(np.random.default_rng(seed).standard_normal((n, d)))


def _built(x: np.ndarray, **config) -> SpannIndex:
    index = SpannIndex(x.shape[1], "ip", head_ratio=0.02, **config)
    index.train(x)
    index.add(np.arange(len(x)), x)
    index.search(x[:1], 10)  # seals the bulk build
    return index


def _choice(index: SpannIndex, x: np.ndarray, total: int) -> spann_tune.RngChoice:
    return spann_tune.choose_rng_factor(x, total, index.heads.count, "ip", index.config.max_lists,
                                        index.heads.search, index._assign)


def test_strict_rule_chosen_where_replicas_repeat_what_is_read():
    x = _clustered()
    index = _built(x, rng_factor=2.0)
    choice = _choice(index, x, total=2_000_000)
    assert choice.factor == 1.0
    assert choice.replication[2.0] > choice.replication[1.0]
    assert choice.lists_needed[1.0] <= choice.lists_needed[2.0] + 1


def test_lax_rule_chosen_where_replicas_save_lists():
    x = _isotropic()
    index = _built(x)  # the default config tunes the factor itself
    assert index.config.rng_factor == 2.0
    choice = _choice(index, x, total=len(x))
    assert choice.lists_needed[1.0] > 2 * choice.lists_needed[2.0]
    assert choice.replication[2.0] > 2 * choice.replication[1.0]


def test_small_sample_gets_the_fallback_factor():
    x = _isotropic(n=3_000)
    index = _built(x)
    assert index.config.rng_factor == spann_tune.FALLBACK
    assert _choice(index, x, total=len(x)).cost == {}


def test_chosen_factor_is_saved_and_used_after_reopening(tmp_path):
    x = _clustered(n=12_000)
    index = _built(x)
    chosen = index.config.rng_factor
    assert chosen in spann_tune.CANDIDATES
    index.save(tmp_path / "ix")
    again = SpannIndex.load(tmp_path / "ix")
    assert again.config.rng_factor == chosen == again.stats().extra["rng_factor"]
    ids = again.search(x[:50], 10).ids
    assert (ids[:, 0] >= 0).all()
    # and still takes inserts (assigned by the saved factor)
    fresh = _unit(x[:200] + 0.01)
    again.add(np.arange(10**6, 10**6 + 200), fresh)
    assert set(again.search(fresh[:20], 1).ids[:, 0].tolist()) <= set(range(10**6, 10**6 + 200))
