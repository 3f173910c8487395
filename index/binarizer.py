"""BEBR's recurrent binarization model (Gan et al., KDD 2023), trained embedding-to-embedding.

    b_0 = sign(W(x)),   b_i = b_{i-1} + 2^-i sign(R_i(x - normalize(B_i(b_{i-1})))),   i < u

W, R_i and B_i are small residual MLPs; sign has a straight-through gradient (identity inside
[-1, 1], zero outside, as in BEBR's code). The result is m dims x u bits: plane 0 is coarse,
each later plane binarizes what the codes so far fail to reconstruct, at half the weight.
Inputs are (optionally) centred and scaled by the sample, and every MLP starts as the same
linear code (residual blocks at zero), so training starts from sign codes of the rotated data
(SimHash, sign(x) or ITQ, and its residual refinement) rather than from noise.

Start and guard. A wide model (384-d MiniLM on wiki-minilm) trained from a random rotation
gave worse codes than plain sign(x) (1 bit: recall@10 0.27 against 0.57), and with any
learning rate tried (3e-3 .. 3e-5, with or without residual blocks) held-out recall fell
from the first epoch on: the KL loss below, through the straight-through sign, does not
improve on a good linear code there (on GloVe-50 it did, see below). So `fit` holds out part
of its sample and (1) starts from the best of several linear codes by held-out neighbour
recall: the centred random rotation, sign(x) itself, centred sign, and ITQ (PCA turned by
Iterative Quantization, a rotation learned from the sample); (2) measures every epoch and
keeps the best state, the start if no epoch beats it (`train_stats["kept"]`). On wiki-minilm
ITQ wins and training is rejected; the result still beats sign(x) (bench/binary_quality.py).

Training is task-agnostic (embedding-to-embedding): no labels, only a sample of the vectors
to be indexed, whose float similarities are the teacher. BEBR trains with a contrastive loss
(InfoNCE over one positive and hard negatives). Here the positive is soft: each anchor scores
a candidate set made of `neighbour_samples` of its `neighbour_pool` nearest float neighbours
(the hard negatives, by construction) and of every other anchor's (mostly easy negatives), and
the target distribution over the candidates is the softmax of their float similarities
instead of a one-hot. With a one-hot target this is the contrastive loss; the soft target
also keeps the order inside the neighbourhood, which is what recall after rerank depends on.
Measured on 100k GloVe-50 vectors, 2 bits x 64 dims, recall of the float top-10 within the
top-100 by code: 0.958 with this loss, 0.908 with one hard positive, 0.915 untrained. Student
scores are the codes' inner product / m, the quantity SDC ranks by, with a learned scale.

Compatible training (BEBR): a binarizer for a new embedding model whose queries must search
the old model's codes (`fit_compatible`). Its model is a translator T (a residual MLP, new
dim -> old dim) followed by a frozen copy of the old binarizer: codes of new-model queries
are then made by the very function that made the stored codes, and only T is learned. The
loss, over pairs (new, old) of embeddings of the same passages, sums three terms:

- reconstruction: |T(x_new) - x_old|^2 / (old scale)^2, the point-wise alignment; T starts
  as the least-squares linear map, so training starts from the best linear translation;
- cross-version neighbourhood: the KL loss above with the anchor's code made from its new
  embedding and the candidates' codes the frozen old codes (the item itself first, then its
  old-float neighbours), teacher = old float similarities; this is BEBR's compatibility
  term: it ranks old codes for a new query as the old model would rank them, which is what
  recall depends on (reconstruction alone spends capacity on directions codes ignore);
- same-version neighbourhood: the KL loss among new-model codes with the new model's float
  similarities as teacher, so new codes also keep the new model's own structure (BEBR's
  new-to-new term), at a lower weight: the cross term is what queries are served by.

A new binarizer trained from scratch against the old codes must rediscover the old
binarizer's partition of the space from a few thousand pairs; measured on 2,000 wiki
passages (MiniLM old, mean GloVe new, 2 bits x 384), questions found their article in the
top 10 for 0.07 of questions that way against 0.28 for same-version GloVe codes.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from index import sdc
from index.binarizer_config import BinarizerConfig

#: Version of the model file layout; bump it when the saved fields change meaning.
FORMAT_VERSION = 1
ENCODE_BATCH = 16_384
#: Below this many sample rows the binarizer is not trained (see `fit`).
MIN_TRAIN_ROWS = 16
SCALE_LR_FACTOR = 30.0
#: Samples of at least this many rows hold some out to pick the start and the best epoch.
MIN_SELECT_ROWS = 200
HELD_OUT_FRACTION = 0.1
ITQ_ITERATIONS = 50
HELD_OUT_MAX = 1000
#: Held-out score: float top-HELD_OUT_K found within the code top-(HELD_OUT_K x depth), averaged
#: over these depths (1: recall at oversample 1; 4: what a rerank of 4x candidates can recover).
HELD_OUT_K = 10
HELD_OUT_DEPTHS = (1, 4)
#: Weights of compatible training's reconstruction and same-version terms (cross-version: 1).
COMPAT_RECONSTRUCTION_WEIGHT = 1.0
COMPAT_SAME_VERSION_WEIGHT = 0.25
#: Ridge of the least-squares start of the translator.
COMPAT_RIDGE = 1e-2


class _Target(NamedTuple):
    """What anchor codes are trained against: candidate `rows` (inputs to encode, or fixed codes
    when not `encode`), each row's nearest float `neighbours` among them, and the `floats`
    whose similarities are the teacher."""

    rows: torch.Tensor
    neighbours: np.ndarray
    floats: np.ndarray
    encode: bool


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class _ResidualMLP(nn.Module):
    """d_in -> hidden, `blocks` x (h + MLP(LayerNorm(h))), -> d_out."""

    def __init__(self, d_in: int, d_out: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
            for _ in range(blocks))
        self.out = nn.Linear(hidden, d_out)

    def start_linear(self, matrix: torch.Tensor, gain: float = 1.0) -> None:
        """Start as the linear map x -> matrix @ x: the input, times `gain`, is copied into the
        first hidden units, each block's last layer is zeroed (its residual starts at 0), and the
        output layer applies `matrix / gain`. Training then starts from a good linear code, not
        from noise. `gain` brings the hidden units to about unit size, the size of the blocks'
        outputs (LayerNorm), rather than 1/sqrt(dim) (alone it did not stop 384-d training
        from degrading the codes: see the module docstring, Start and guard)."""
        d_in = matrix.shape[1]
        with torch.no_grad():
            self.inp.weight.zero_()
            self.inp.weight[:d_in, :d_in] = torch.eye(d_in) * gain
            self.inp.bias.zero_()
            for block in self.blocks:
                block[-1].weight.zero_()
                block[-1].bias.zero_()
            self.out.weight.zero_()
            self.out.weight[:, :d_in] = matrix / gain
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class RecurrentBinarization(nn.Module):
    """The torch model: floats (n, dim) -> u sign planes (n, u, m) and their sum b."""

    def __init__(self, dim: int, m: int, bits: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.first = _ResidualMLP(dim, m, hidden, blocks)
        self.reconstruct = nn.ModuleList(_ResidualMLP(m, dim, hidden, blocks) for _ in range(bits - 1))
        self.residual = nn.ModuleList(_ResidualMLP(dim, m, hidden, blocks) for _ in range(bits - 1))
        # input standardisation, fitted on the training sample (buffers: saved, not trained)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - self.mean) / self.scale
        s = _SignSTE.apply(self.first(x))
        planes, b = [s], s
        for i, (rec, res) in enumerate(zip(self.reconstruct, self.residual)):
            s = _SignSTE.apply(res(x - F.normalize(rec(b), dim=1)))
            b = b + 0.5 ** (i + 1) * s
            planes.append(s)
        return torch.stack(planes, 1), b


class CompatibleBinarization(nn.Module):
    """A translator into the old model's space, then the old model's (frozen) binarization."""

    def __init__(self, dim: int, old: RecurrentBinarization, hidden: int, blocks: int) -> None:
        super().__init__()
        self.translate = _ResidualMLP(dim, old.mean.shape[0], hidden, blocks)
        self.old = old
        for p in self.old.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.old(self.translate(x))


class Binarizer:
    """A trained recurrent binarizer for one embedding model version; encodes floats to codes."""

    def __init__(self, dim: int, config: BinarizerConfig | None = None, embedding_version: str = "") -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.config = config or BinarizerConfig()
        self.m, self.hidden = self.config.dims_for(dim)
        if self.hidden < max(dim, self.m):
            raise ValueError(f"hidden must be 0 or >= max(dim, code_dims) = {max(dim, self.m)}, got {self.hidden}")
        self.bits = self.config.bits
        self.embedding_version = embedding_version
        #: (embedding version, fingerprint) of the binarizer whose codes this one's queries search.
        self.compatible_with: tuple[str, str] | None = None
        self._fingerprint: str | None = None
        #: How `fit` went: the start picked, held-out scores of the starts and epochs, what was kept.
        self.train_stats: dict = {}
        with _seeded(self.config.seed, self.config.threads):
            self.model = RecurrentBinarization(dim, self.m, self.bits, self.hidden, self.config.blocks)
        self.model.eval()

    @property
    def words(self) -> int:
        return sdc.words_for(self.m)

    @property
    def code_bytes(self) -> int:
        return self.bits * self.words * 8

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 (n, dim) -> uint64 codes (n, bits, words)."""
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {x.shape}")
        out = np.empty((len(x), self.bits, self.words), np.uint64)
        with torch.no_grad(), _threads(self.config.threads):
            for start in range(0, len(x), ENCODE_BATCH):
                planes, _ = self.model(torch.from_numpy(np.array(x[start:start + ENCODE_BATCH], np.float32)))
                out[start:start + len(planes)] = sdc.pack(planes.numpy())
        return out

    @property
    def translates(self) -> bool:
        """Whether this is a compatible binarizer (a translator into another model's space)."""
        return isinstance(self.model, CompatibleBinarization)

    def translate(self, x: np.ndarray) -> np.ndarray:
        """A compatible binarizer's reconstruction of the old model's embedding: float32 (n, old dim).
        Its codes are the old binarizer's codes of these, so the translated vectors can be
        searched and reranked as old-model queries."""
        if not self.translates:
            raise ValueError("only a binarizer trained with fit_compatible translates")
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {x.shape}")
        with torch.no_grad(), _threads(self.config.threads):
            return np.ascontiguousarray(self.model.translate(torch.from_numpy(np.array(x, np.float32))).numpy())

    def fingerprint(self) -> str:
        """A hash of the weights: identifies the codes this binarizer makes (cached: weights
        change only in fit, fit_compatible and load, which drop the cache)."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self._hash_weights()
        return self._fingerprint

    def _hash_weights(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().numpy().tobytes())
        return h.hexdigest()[:16]

    # -- training -------------------------------------------------------------------------------

    def fit(self, sample: np.ndarray, metric: str = "ip") -> Binarizer:
        """Train on `sample` (n, dim) so that code inner products keep its float neighbourhoods
        (fewer than MIN_TRAIN_ROWS rows: only centred and rotated, not trained).

        With at least MIN_SELECT_ROWS rows, a held-out part of the sample (HELD_OUT_FRACTION,
        at most HELD_OUT_MAX rows) guards the result: the start is the best of the candidate
        linear codes (`_start_candidates`, sign(x) among them) by held-out neighbour recall,
        the model is measured after every epoch, and the best state is kept; if no epoch beats
        the start, the start is kept (`train_stats["kept"] == "start"`). So the codes are never
        worse on held-out data than sign codes of the same bits. `train_stats` records it all."""
        x = _check(sample, self.dim, "sample")
        self._fingerprint = None
        self.train_stats = {}
        if len(x) < MIN_TRAIN_ROWS:  # too few to learn from: the centred random rotation code
            with _seeded(self.config.seed, self.config.threads):
                self._start(x, *self._start_candidates(x)[0][1:])
            self.train_stats = {"kept": "start", "start": "centred-rotation", "trained": False}
            return self
        x = np.ascontiguousarray(x[self._subsample_rows(len(x))])
        train, held = _held_out_split(len(x), self.config.seed)
        xt = np.ascontiguousarray(x[train])
        own = _Target(torch.from_numpy(xt), _neighbours(xt, metric, self._pool(len(xt)), exclude_self=True), xt, True)
        evaluate = _HeldOut(xt, x[held], metric) if len(held) else None
        with _seeded(self.config.seed, self.config.threads):
            starts = {}
            best_name, best_score = None, -1.0
            for name, centre, rotation in self._start_candidates(xt):
                self._start(xt, centre, rotation)
                if evaluate is None:  # no held-out rows: the first candidate, as before
                    best_name = name
                    break
                starts[name] = evaluate(self)
                if starts[name] > best_score:
                    best_name, best_score, best_state = name, starts[name], copy.deepcopy(self.model.state_dict())
            if evaluate is not None:
                self.model.load_state_dict(best_state)
            epochs = self._train(own.rows, [own], metric, evaluate=evaluate)
        self.train_stats = {"start": best_name, "start_scores": starts, "epoch_scores": epochs,
                            "held_out_rows": int(len(held)), "trained": True}
        if evaluate is not None:
            best_epoch = int(np.argmax(epochs)) if epochs else -1
            if epochs and epochs[best_epoch] > best_score:
                self.train_stats.update(kept=f"epoch {best_epoch + 1}", held_out_recall=epochs[best_epoch])
            else:  # no epoch beat the start: back to it
                self.model.load_state_dict(best_state)
                self.train_stats.update(kept="start", held_out_recall=best_score)
        else:
            self.train_stats["kept"] = "last epoch"
        self._fingerprint = None
        return self

    def _start_candidates(self, x: np.ndarray) -> list[tuple[str, bool, torch.Tensor]]:
        """Linear codes training may start from: (name, centre the inputs?, first rotation).

        The centred random rotation is SimHash of the centred data. When the code has at least
        as many dims as the input, the identity (padded with random rotation rows) gives the
        plain sign codes, uncentred exactly sign(x) at 1 bit: on sentence embeddings
        (MiniLM, 384-d) those beat a random rotation (0.57 vs 0.54 recall@10 on wiki-minilm),
        since the model's own axes carry unequal, meaningful variance. The first candidate is
        the default when nothing can be measured."""
        rotation = _rotation(self.m, self.dim)
        out = [("centred-rotation", True, rotation)]
        if self.m >= self.dim:
            identity = rotation.clone()
            identity[:self.dim] = torch.eye(self.dim)
            out += [("sign", False, identity), ("centred-sign", True, identity)]
        if len(x) > self.dim:  # ITQ needs a full-rank sample
            itq = rotation.clone()
            mean = x.mean(0)
            itq[:min(self.m, self.dim)] = _itq_rotation(x - mean)[:self.m]
            out.append(("itq", True, itq))
        return out

    def fit_compatible(self, sample: np.ndarray, old_sample: np.ndarray, old: Binarizer,
                       metric: str = "ip") -> Binarizer:
        """Train this (new-model) binarizer so that its codes of `sample` search `old`'s codes.

        Row i of `sample` (this model's embedding) and of `old_sample` (the old model's) is the
        same item. The model becomes a translator into the old space followed by a frozen copy
        of `old` (see the module docstring for the loss and why)."""
        x = _check(sample, self.dim, "sample")
        x_old = _check(old_sample, old.dim, "old_sample")
        if len(x) != len(x_old):
            raise ValueError(f"sample ({len(x)}) and old_sample ({len(x_old)}) must hold the same items")
        if len(x) < MIN_TRAIN_ROWS:
            raise ValueError(f"compatible training needs at least {MIN_TRAIN_ROWS} items, got {len(x)}")
        if (old.m, old.bits) != (self.m, self.bits):
            raise ValueError(f"code shape {self.m}x{self.bits} must equal the old binarizer's {old.m}x{old.bits}")
        self._fingerprint = None
        keep = self._subsample_rows(len(x))
        x, x_old = np.ascontiguousarray(x[keep]), np.ascontiguousarray(x_old[keep])
        pool = self._pool(len(x))
        old_codes = torch.from_numpy(sdc.decode(old.encode(x_old), old.m).astype(np.float32))
        targets = [_Target(old_codes, _neighbours(x_old, metric, pool, exclude_self=False), x_old, False),
                   _Target(torch.from_numpy(x), _neighbours(x, metric, pool, exclude_self=True), x, True)]
        old_t = torch.from_numpy(x_old)
        scale2 = float(old.model.scale) ** 2
        with _seeded(self.config.seed, self.config.threads):
            self._old_shape = {**_shape_of(old), "translator_hidden": max(self.hidden, self.dim, old.dim)}
            self.model = CompatibleBinarization(self.dim, copy.deepcopy(old.model),
                                                self._old_shape["translator_hidden"], self.config.blocks)
            linear = _least_squares(x, x_old)
            self.model.translate.start_linear(linear)
            with torch.no_grad():
                self.model.translate.out.bias.copy_(torch.from_numpy(x_old.mean(0) - x.mean(0) @ linear.numpy().T))

            def reconstruction(anchors: np.ndarray) -> torch.Tensor:
                idx = torch.from_numpy(anchors)
                err = self.model.translate(targets[1].rows[idx]) - old_t[idx]
                return COMPAT_RECONSTRUCTION_WEIGHT * (err ** 2).sum(1).mean() / scale2

            self._train(targets[1].rows, targets, metric, weights=[1.0, COMPAT_SAME_VERSION_WEIGHT],
                        extra=reconstruction)
        self.compatible_with = (old.embedding_version, old.fingerprint())
        return self

    def _pool(self, n: int) -> int:
        return min(self.config.neighbour_pool, n - 1)

    def _subsample_rows(self, n: int) -> np.ndarray:
        if n <= self.config.train_sample:
            return np.arange(n)
        return np.sort(np.random.default_rng(self.config.seed).choice(n, self.config.train_sample, replace=False))

    def _start(self, x: np.ndarray, centre: bool = True, rotation: torch.Tensor | None = None) -> None:
        """Centre (or not) and scale inputs by the sample, and start every MLP as the same
        rotation (random by default): the first plane then begins as sign codes of the rotated
        (centred) data, and each later plane as the signs of the rotated residual."""
        mean = x.mean(0) if centre else np.zeros(x.shape[1], np.float32)
        scale = float(np.sqrt(((x - mean) ** 2).sum(1).mean())) or 1.0
        self.model.mean.copy_(torch.from_numpy(np.asarray(mean, np.float32)))
        self.model.scale.fill_(scale)
        if rotation is None:
            rotation = _rotation(self.m, self.dim)
        # inputs are scaled to unit norm, so coordinates are ~ 1/sqrt(dim); codes are +-1
        gain = math.sqrt(self.dim)
        self.model.first.start_linear(rotation, gain)
        for rec, res in zip(self.model.reconstruct, self.model.residual):
            rec.start_linear(rotation.T.contiguous(), 1.0)
            res.start_linear(rotation, gain)

    def _train(self, inputs: torch.Tensor, targets: list[_Target], metric: str,
               weights: list[float] | None = None, extra=None, evaluate=None) -> list[float]:
        """Adam, linear warm-up then cosine decay, over shuffled anchors; the loss sums over
        targets (times `weights`), plus `extra(anchors)` when given. With `evaluate` (model ->
        held-out score), scores each epoch, ends holding the best epoch's weights and returns
        the scores (the caller compares them with the start's)."""
        weights = weights or [1.0] * len(targets)
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        n = len(inputs)
        # the student's logit scale (training only, not saved) must find the teacher's sharpness
        # within a few steps, so it learns SCALE_LR_FACTOR x faster than the weights
        log_scale = nn.Parameter(torch.zeros(()))
        lrs = [cfg.learning_rate, cfg.learning_rate * SCALE_LR_FACTOR]
        opt = torch.optim.Adam([{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": lrs[0]},
                                {"params": [log_scale], "lr": lrs[1]}])
        steps = cfg.epochs * -(-n // cfg.batch_size)
        warmup = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
        scores: list[float] = []
        best_state, best = None, -1.0
        self.model.train()
        for _ in range(cfg.epochs):
            order = rng.permutation(n)
            for start in range(0, n, cfg.batch_size):
                anchors = order[start:start + cfg.batch_size]
                if len(anchors) < 2:
                    continue
                za = self.model(inputs[torch.from_numpy(anchors)])[1]
                loss = sum(w * self._loss(za, anchors, t, log_scale, rng, metric) for w, t in zip(weights, targets))
                if extra is not None:
                    loss = loss + extra(anchors)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            if evaluate is not None:
                self.model.eval()
                scores.append(evaluate(self))
                self.model.train()
                if scores[-1] > best:
                    best, best_state = scores[-1], copy.deepcopy(self.model.state_dict())
        self.model.eval()
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return scores

    def _loss(self, za: torch.Tensor, anchors: np.ndarray, target: _Target, log_scale: torch.Tensor,
              rng: np.random.Generator, metric: str) -> torch.Tensor:
        """KL(float-similarity softmax || code-score softmax) over the batch's candidates."""
        cfg = self.config
        pool = target.neighbours.shape[1]
        picked = target.neighbours[anchors[:, None], rng.integers(0, pool, (len(anchors), cfg.neighbour_samples))]
        cand = np.unique(np.concatenate([picked.ravel(), anchors]))
        rows = target.rows[torch.from_numpy(cand)]
        zc = self.model(rows)[1] if target.encode else rows
        a = target.floats[anchors]
        nearest = _row_similarity(a, target.floats[target.neighbours[anchors, 0]], metric)
        spread = nearest - _row_similarity(a, target.floats[target.neighbours[anchors, -1]], metric)
        teacher = (_similarity(a, target.floats[cand], metric) - nearest[:, None]) / np.maximum(spread, 1e-6)[:, None]
        teacher = torch.from_numpy(teacher.astype(np.float32))
        student = za @ zc.T * (log_scale.exp() / self.m)
        if target.encode:  # an anchor against its own code teaches nothing (finite fill: no 0 x inf)
            itself = torch.from_numpy(anchors[:, None] == cand[None, :])
            teacher = teacher.masked_fill(itself, -1e4)
            student = student.masked_fill(itself, -1e4)
        p = F.softmax(teacher / cfg.temperature, 1)
        return F.kl_div(F.log_softmax(student / cfg.temperature, 1), p, reduction="batchmean")

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """One file: format version, embedding model version, config and weights (atomic)."""
        path = Path(path)
        state = {"format_version": FORMAT_VERSION, "embedding_version": self.embedding_version, "dim": self.dim,
                 "config": asdict(self.config), "compatible_with": list(self.compatible_with or []),
                 "weights": self.model.state_dict(), "train_stats": _plain(self.train_stats)}
        if isinstance(self.model, CompatibleBinarization):
            state["old_shape"] = dict(self._old_shape)
        buf = io.BytesIO()
        torch.save(state, buf)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Binarizer:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: binarizer format {state.get('format_version')} is not supported "
                             f"(this build reads {FORMAT_VERSION})")
        out = cls(state["dim"], BinarizerConfig(**state["config"]), state["embedding_version"])
        if "old_shape" in state:  # a compatible binarizer: translator + the old model
            shape = state["old_shape"]
            old = RecurrentBinarization(shape["dim"], out.m, out.bits, shape["hidden"], shape["blocks"])
            out.model = CompatibleBinarization(out.dim, old, shape["translator_hidden"], out.config.blocks)
            out._old_shape = shape
        out.model.load_state_dict(state["weights"])
        out.model.eval()
        out._fingerprint = None
        out.compatible_with = tuple(state["compatible_with"]) or None
        out.train_stats = dict(state.get("train_stats", {}))
        return out


def _plain(stats: dict) -> dict:
    """train_stats as plain str/float/int/list/dict, which torch's weights_only load accepts."""
    import json
    return json.loads(json.dumps(stats, default=float))


def _held_out_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of a sample of n; no held-out rows below MIN_SELECT_ROWS."""
    if n < MIN_SELECT_ROWS:
        return np.arange(n), np.zeros(0, np.int64)
    held = min(HELD_OUT_MAX, int(n * HELD_OUT_FRACTION))
    perm = np.random.default_rng(seed + 1).permutation(n)
    return np.sort(perm[held:]), np.sort(perm[:held])


class _HeldOut:
    """Held-out neighbour recall: held-out rows as queries against the training rows; the mean
    over depth in HELD_OUT_DEPTHS of the fraction of each query's float top-k found in its code
    top-(k x depth) (depth 1 is recall@10 at oversample 1, depth 4 what a rerank recovers)."""

    def __init__(self, base: np.ndarray, queries: np.ndarray, metric: str) -> None:
        self.base, self.queries = base, np.ascontiguousarray(queries)
        self.k = max(1, min(HELD_OUT_K, len(base) // max(HELD_OUT_DEPTHS)))
        sims = _similarity(self.queries, base, metric)
        self.truth = np.argsort(-sims, 1, kind="stable")[:, :self.k]

    def __call__(self, binarizer: Binarizer) -> float:
        planes = sdc.to_planes(binarizer.encode(self.base))
        top = sdc.top_n(sdc.sdc_int(binarizer.encode(self.queries), planes, binarizer.m),
                        self.k * max(HELD_OUT_DEPTHS))
        return float(np.mean([np.mean([np.isin(t, f[:self.k * depth]).mean() for t, f in zip(self.truth, top)])
                              for depth in HELD_OUT_DEPTHS]))


def _check(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return np.ascontiguousarray(x, np.float32)


def _shape_of(old: Binarizer) -> dict[str, int]:
    return {"dim": old.dim, "hidden": old.hidden, "blocks": old.config.blocks}


def _least_squares(x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """(dim_y, dim_x) ridge solution of y - mean(y) ~ (x - mean(x)) @ W.T."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    gram = xc.T @ xc
    w = np.linalg.solve(gram + COMPAT_RIDGE * np.trace(gram) / len(gram) * np.eye(len(gram)), xc.T @ yc)
    return torch.from_numpy(np.ascontiguousarray(w.T, np.float32))


def _itq_rotation(xc: np.ndarray) -> torch.Tensor:
    """(dim, dim) orthonormal rows: the PCA basis of centred `xc` turned by Iterative Quantization
    (Gong & Lazebnik, CVPR 2011), the rotation that minimises |sign(V R) - V R|^2 for the PCA
    coordinates V: variance spread evenly over the bits and bit boundaries where points are
    sparse. Measured on wiki-minilm (384-d, 1 bit): recall@10 0.61 against 0.57 for sign(x)
    and 0.54 for a random rotation. Deterministic (starts from the PCA axes, no randomness)."""
    xc = np.asarray(xc, np.float64)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    v = xc @ vt.T
    turn = np.eye(vt.shape[0])
    for _ in range(ITQ_ITERATIONS):
        u, _, wt = np.linalg.svd(np.sign(v @ turn).T @ v)
        turn = (u @ wt).T
    return torch.from_numpy(np.ascontiguousarray((vt.T @ turn).T, np.float32))


def _rotation(rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) with orthonormal rows, stacked blocks when rows > cols (torch's seeded RNG)."""
    blocks = []
    for _ in range(-(-rows // cols)):
        q, r = torch.linalg.qr(torch.randn(cols, cols))
        blocks.append(q * torch.sign(torch.diagonal(r)))
    return torch.cat(blocks)[:rows].contiguous()


def _similarity(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Float similarity (higher is closer) of every row of a to every row of b."""
    ip = a @ b.T
    if metric == "ip":
        return ip
    return 2 * ip - (a * a).sum(1)[:, None] - (b * b).sum(1)[None, :]


def _row_similarity(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Float similarity of row i of a to row i of b."""
    return (a * b).sum(1) if metric == "ip" else -((a - b) ** 2).sum(1)


def _neighbours(x: np.ndarray, metric: str, k: int, exclude_self: bool) -> np.ndarray:
    """(n, k) rows of each vector's nearest others in x by the float metric, nearest first."""
    index = faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, ids = index.search(x, k + 1)
    if not exclude_self:
        return ids[:, :k]
    out = np.empty((len(ids), k), np.int64)
    for r, row in enumerate(ids):  # the query itself need not come first when there are duplicates
        row = row[row != r]
        out[r] = row[:k]
    return out


@contextmanager
def _threads(threads: int) -> Iterator[None]:
    """A fixed torch thread count for a block: the same results on any machine, and no pool
    wake-ups for one-row queries (2 threads cost 2 ms per small layer on a shared VM, 1: 12 us)."""
    prev = torch.get_num_threads()
    if prev != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if prev != threads:
            torch.set_num_threads(prev)


@contextmanager
def _seeded(seed: int, threads: int) -> Iterator[None]:
    """Deterministic torch for a block: fixed seed, deterministic kernels, fixed thread count."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        with _threads(threads):
            yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
