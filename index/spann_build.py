"""SPANN's bulk build: rows staged on disk, then heads chosen and every list written once.

Adds after `train` go to a scratch LMDB (bounded memory whatever the size of the build); the
seal, at the first search or save, chooses the heads from the training sample (and, for
binary-coded lists, trains the binarizer on the same sample), assigns every staged row to
its heads, gathers the assignments in a second scratch LMDB sorted by head, and writes each
list once, capped at max_posting with every primary entry kept. A mixin of SpannIndex: it
works on the index's own fields.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from index import postings as codec
from index.kmeans import squared_distances
from index.postings import Posting
from index.spann_codes import BinaryRows
from index.storage import LmdbBlobStore


class BulkBuild:
    """Staging, sealing and scratch stores of SpannIndex's bulk build."""

    #: Rows per staged blob: bounds the memory of a bulk build whatever the size of one add.
    STAGE_ROWS = 16_384

    def _spill_store(self, name: str) -> LmdbBlobStore:
        """A scratch LMDB beside the posting store (in the shard directory when there is one)."""
        base = getattr(self.store, "path", None)
        d = Path(tempfile.mkdtemp(prefix=f"spann-{name}-", dir=base if base and Path(base).is_dir() else None))
        self._spills.append(d)
        return LmdbBlobStore.open(d)

    def _drop_spills(self) -> None:
        remove_dirs(self._spills)
        self._spills.clear()  # the same list: the index's finalizer holds it
        base = getattr(self.store, "path", None)
        if base and Path(base).is_dir():  # left behind by a build that was killed
            for d in Path(base).glob("spann-*-*"):
                shutil.rmtree(d, ignore_errors=True)

    def _stage(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Bulk phase: keep raw (id, vector) rows in a scratch LMDB until the seal.

        A staged id is current: an earlier tombstone or version of it no longer applies (the
        seal writes entries at version 0), and if it is staged again only its last row counts."""
        if self._deleted or self._versions:
            known = [i for i in ids.tolist() if i in self._deleted or i in self._versions]
            if known:
                for i in known:
                    self._deleted.discard(i)
                    self._versions.pop(i, None)
                self._filter_cache = None
                self._commit(version_deletes=known)
        self._staged_ids.append(np.array(ids, np.int64))
        if self._raw is None:
            self._raw = self._spill_store("raw")
        for start in range(0, len(ids), self.STAGE_ROWS):  # one blob at a time: memory stays flat
            part = slice(start, start + self.STAGE_ROWS)
            blob = codec.encode(Posting(ids[part], np.zeros(len(ids[part]), np.uint16), vectors[part]))
            self._raw.write({self._raw_seq: blob})
            self._raw_seq += 1
        self._count += len(ids)

    def _seal(self) -> None:
        """End the bulk phase: choose heads, assign every staged row to its heads, and write
        each list once (capped at max_posting, primaries kept). Memory stays bounded: rows
        stream from the raw spill, assignments gather in a second spill sorted by head."""
        if self._sealed:
            return
        self._sealed = True
        if self._raw is None:
            return
        sample = self._sample
        if sample is None or not len(sample):
            rows = []
            for _, blob in self._raw.items():
                rows.append(codec.decode(blob, self.dim).vectors)
                if sum(map(len, rows)) >= self.config.train_sample:
                    break
            sample = np.concatenate(rows)[:self.config.train_sample].astype(np.float32)
        self._choose_heads(sample, self._count)
        if self.config.codes == "binary":
            self._train_codes(sample)
        self._sample = sample = None  # the sample is done with: let it go before the assignment
        last = self._last_staged_rows()
        grouped = self._spill_store("grouped")
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        pending_bytes, seq = 0, 0
        # floats until each list is finished (capping measures distances; codes come last)
        dtype = self.config.vector_dtype if self.config.codes == "float" else np.float32
        row_bytes = self.dim * np.dtype(dtype).itemsize * self.config.replicas
        step = max(256, self.config.stage_bytes // (4 * row_bytes))  # rows whose replicas fit a quarter
        offset = 0
        for _, blob in self._raw.items():  # in staging order (keys count up)
            staged = codec.decode(blob, self.dim)
            if last is not None:
                staged, offset = staged.take(last[offset:offset + len(staged)]), offset + len(staged)
            for start in range(0, len(staged), step):
                p = staged.take(slice(start, start + step))
                heads = self._assign(p.vectors)
                rep = np.fromiter((len(h) for h in heads), np.int64, len(heads))
                rows = np.repeat(np.arange(len(p)), rep)
                primary = np.zeros(len(rows), np.uint16)
                primary[np.concatenate([[0], np.cumsum(rep)[:-1]])] = 1  # the nearest head comes first
                vecs = p.vectors[rows].astype(dtype, copy=False)
                pending.append((np.concatenate(heads).astype(np.int64), p.ids[rows], primary, vecs))
                pending_bytes += vecs.nbytes
                if pending_bytes >= self.config.stage_bytes:
                    self._spill_grouped(grouped, pending, seq)
                    pending, pending_bytes, seq = [], 0, seq + 1
            staged = p = None  # before the next blob is read
        self._spill_grouped(grouped, pending, seq)
        self._raw.close()  # unmap the staged rows: their pages count in RSS until then
        self._raw = None
        # lists left by a seal that a crash cut short; the head table goes in with the last
        # batch of lists, so until then the index reopens empty
        self.store.clear()
        if self.state is not None:
            self.state.clear(versions=False)
        batch: dict[int, bytes] = {}
        batch_bytes, head, acc = 0, None, None
        for key, blob in grouped.items():  # keys sort by head, then by spill
            h = key >> 24
            if h != head and acc is not None:
                batch[head] = self._finish_posting(head, acc)
                batch_bytes += len(batch[head])
                acc = None
                if len(batch) >= 512 or batch_bytes >= self.SPILL_TXN_BYTES:
                    self.store.write(batch)
                    batch, batch_bytes = {}, 0
            head = h
            part = codec.decode(blob, self.dim)
            # folded in part by part, capped as it goes: a hub head can draw replicas from a
            # large share of the corpus (one syn384 head drew 622k of 1M; its whole list
            # took 3.9 GB to cap at once), but only max_posting of them are ever kept
            acc = part if acc is None else self._capped(head, acc.concat(part), 2 * self.max_posting)
        if acc is not None:
            batch[head] = self._finish_posting(head, acc)
        alive = np.flatnonzero(self.heads.alive)
        self._commit(batch, heads=dict(zip(alive.tolist(), self.heads.vectors[alive])))
        grouped.close()
        self._drop_spills()

    def _last_staged_rows(self) -> np.ndarray | None:
        """Per staged row, whether it is its id's last (None when no id was staged twice);
        the count drops the earlier rows."""
        staged = np.concatenate(self._staged_ids) if self._staged_ids else np.zeros(0, np.int64)
        self._staged_ids = []
        rev = staged[::-1]
        _, first = np.unique(rev, return_index=True)
        if len(first) == len(staged):
            return None
        keep = np.zeros(len(staged), bool)
        keep[len(staged) - 1 - first] = True
        self._count -= len(staged) - len(first)
        return keep

    #: Bytes of grouped blobs per scratch write transaction (LMDB keeps a transaction's
    #: dirty pages in anonymous memory until the commit).
    SPILL_TXN_BYTES = 16 << 20

    def _spill_grouped(self, grouped: LmdbBlobStore, pending: list, seq: int) -> None:
        """Write the pending assignments as one blob per (head, seq), sorted by head, each
        cut to max_posting entries as the final list will be (`_capped`).

        Memory stays ~2x the pending rows: the parts are gathered from the concatenated
        arrays by index (no sorted copy of everything) and written in bounded transactions."""
        if not pending:
            return
        heads, ids, prim, vecs = (np.concatenate(c) for c in zip(*pending))
        pending.clear()  # the caller's list: let its arrays go before the gathers below
        order = np.argsort(heads, kind="stable")
        bounds = np.flatnonzero(np.diff(heads[order])) + 1
        puts, size = {}, 0
        for part in np.split(order, bounds):
            head = int(heads[part[0]])
            blob = codec.encode(self._capped(head, Posting(ids[part], prim[part], vecs[part]), self.max_posting))
            puts[(head << 24) | seq] = blob
            size += len(blob)
            if size >= self.SPILL_TXN_BYTES:
                grouped.write(puts)
                puts, size = {}, 0
        if puts:
            grouped.write(puts)

    def _capped(self, head: int, p: Posting, limit: int) -> Posting:
        """p cut to max_posting entries once longer than `limit`: every primary entry (flagged
        1 in versions during the seal), then the replicas nearest the head."""
        if len(p) <= max(limit, self.max_posting):
            return p
        d = squared_distances(p.vectors.astype(np.float32), self.heads.vectors[head:head + 1])[:, 0]
        d[p.versions == 1] = -1.0
        keep = np.sort(np.argsort(d, kind="stable")[:max(self.max_posting, int((p.versions == 1).sum()))])
        return p.take(keep)

    def _finish_posting(self, head: int, p: Posting) -> bytes:
        p = self._capped(head, p, self.max_posting)
        live = ~np.isin(p.ids, np.fromiter(self._deleted, np.int64, len(self._deleted))) if self._deleted else None
        self.tenants.note_posting(head, p.ids if live is None else p.ids[live])
        return codec.encode(Posting(p.ids, np.zeros(len(p), np.uint16), self.rows.encode(p.vectors)),
                            self.config.compress)

    def _train_codes(self, sample: np.ndarray) -> None:
        """Train the BEBR binarizer on (a subsample of) the sample the heads were chosen from."""
        from index.binarizer import Binarizer
        from index.binarizer_config import BinarizerConfig

        cfg = self.config
        bc = BinarizerConfig(bits=cfg.code_bits, code_dims=cfg.code_dims, epochs=cfg.code_epochs,
                             train_sample=max(2, min(cfg.code_train_sample, len(sample))), seed=cfg.seed)
        self.rows = BinaryRows(Binarizer(self.dim, bc).fit(sample, self.metric))


def remove_dirs(dirs: list[Path]) -> None:
    """Scratch directories gone (spills; also the index's finalizer for a build never sealed)."""
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
