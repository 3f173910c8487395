"""SPANN's typed config: build and search settings, validated, with defaults that work from
thousands to millions of vectors (index/spann.py explains the algorithm they steer)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SpannConfig:
    """Build and search settings; the defaults work from thousands to millions of vectors."""

    #: Heads as a share of vectors; each head's list then holds ~replication/head_ratio entries.
    #: (SPTAG starts from 0.2; on GloVe-50, 0.01 gave the best recall per query time.)
    head_ratio: float = 0.01
    branching: int = 16
    balance_slack: float = 1.3
    #: Lloyd iterations over the training sample after the balanced tree, started from its
    #: leaves. Balancing cuts natural clusters in two; on syn384 (4096-cluster mixture) the
    #: tree's heads reached recall 0.74 at one list, 5 iterations 0.88 (faiss k-means 0.86).
    #: Lists grown past max_posting are split as usual. 0 keeps the tree's leaves.
    refine_iters: int = 5
    #: Closure replication: at most this many heads per vector (SPANN: 8).
    replicas: int = 8
    #: eps1: replicate to heads within (1 + eps1) x the nearest head's distance.
    closure_epsilon: float = 0.5
    #: RNG rule: skip head h if rng_factor * dist(h, chosen)^2 < dist(x, h)^2. 1.0 is the strict
    #: rule; 2.0 replicates more (GloVe-50: 5.6 entries a vector, recall .966 with 8 lists where
    #: 1.0 needs over 32). None: chosen at build among 1.0, 1.5 and 2.0 on the training sample
    #: (index/spann_tune.py); the saved config then holds the factor chosen.
    rng_factor: float | None = None
    #: eps2 default: probe heads within (1 + eps2) x the nearest head's distance.
    prune_epsilon: float = 0.6
    #: Hard cap on lists probed per query (SearchParams.nprobe overrides).
    max_lists: int = 48
    #: Longest list; longer ones are split (0 = 4x the mean list length at build).
    max_posting: int = 0
    #: Shorter lists are merged into their neighbours at compaction.
    min_posting: int = 4
    #: float32 by default: converting float16 lists at query time costs more than reading 2x bytes.
    vector_dtype: Literal["float16", "float32"] = "float32"
    #: What list entries hold: the vectors ("float", in vector_dtype) or BEBR binary codes
    #: ("binary": code_bits x code_dims bits, reranked with floats from the vectors database).
    codes: Literal["float", "binary"] = "float"
    code_bits: int = 2
    #: 0: the dim rounded up to 64.
    code_dims: int = 0
    #: Binary codes: candidates reranked per result (SearchParams.oversample overrides).
    oversample: float = 10.0
    #: Binary codes: the binarizer trains on this many rows of the head-training sample, for this many epochs.
    code_train_sample: int = 20_000
    code_epochs: int = 6
    compress: bool = False
    #: Heads are chosen from this many vectors (memory: train_sample x dim x 4 bytes).
    train_sample: int = 200_000
    #: Fewest training vectors per head: heads are capped at train_sample / sample_per_head
    #: (20,000 by default). Raise train_sample for more heads.
    sample_per_head: int = 10
    #: Heads are searched exactly up to this many; above, through an inverted file over them
    #: (index/spann_heads.py) that scans `head_nprobe` of its ~16 sqrt(heads) cells (spherical
    #: cells for metric "ip").
    head_flat_max: int = 8192
    head_nprobe: int = 64
    #: Bulk build: assignments gather in memory up to this many bytes of vectors before they
    #: spill to scratch LMDB sorted by head (peak build memory is ~2x this, whatever N).
    stage_bytes: int = 64 << 20
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "head_ratio": 0 < self.head_ratio <= 1, "branching": self.branching >= 2,
            "balance_slack": self.balance_slack >= 1, "refine_iters": self.refine_iters >= 0,
            "replicas": self.replicas >= 1,
            "closure_epsilon": self.closure_epsilon >= 0, "rng_factor": self.rng_factor is None or self.rng_factor > 0,
            "prune_epsilon": self.prune_epsilon >= 0, "max_lists": self.max_lists >= 1,
            "max_posting": self.max_posting >= 0, "min_posting": self.min_posting >= 0,
            "vector_dtype": self.vector_dtype in ("float16", "float32"), "train_sample": self.train_sample >= 1,
            "sample_per_head": self.sample_per_head >= 1,
            "head_flat_max": self.head_flat_max >= 1, "head_nprobe": self.head_nprobe >= 1, "stage_bytes": self.stage_bytes > 0,
            "codes": self.codes in ("float", "binary"), "code_bits": 1 <= self.code_bits <= 8,
            "code_dims": self.code_dims >= 0, "oversample": math.isfinite(self.oversample) and self.oversample >= 1,
            "code_train_sample": self.code_train_sample >= 2, "code_epochs": self.code_epochs >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"SpannConfig: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")
