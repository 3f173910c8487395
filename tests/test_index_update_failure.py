"""An index update that fails after its shard committed must not be saved over: the next
open rebuilds the index from LMDB, which holds the write."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from datastore.indexing import SEQ_FILE, index_dir
from datastore.records import Passage
from datastore.store import open_datastore


def test_a_failed_index_update_is_never_saved_and_the_reopened_index_has_the_write(store_copy, encoder):
    ds = open_datastore(store_copy, encoder_factory=lambda name: encoder)
    vec = np.random.default_rng(0).standard_normal((1, ds.dim)).astype(np.float32)
    vec /= np.linalg.norm(vec)
    pid = 10 ** 6  # routes to one shard; find which, and make that index fail as a full disk would
    slot = ds._route(np.array([pid]))[0][0][0]

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    ds.indexes[slot].add = full_disk
    with pytest.raises(Exception):
        ds.upsert([Passage(pid, "a passage whose index update fails")], vec)
    assert not (index_dir(ds.shards[slot]) / SEQ_FILE).exists()  # the saved index is marked stale
    ds.close()  # flushes: must not save the index that misses the write

    with open_datastore(store_copy, encoder_factory=lambda name: encoder) as again:
        assert again.get_passages([pid])[0].text == "a passage whose index update fails"
        top = again.search_vectors(vec, k=1)
        assert int(top.ids[0, 0]) == pid
