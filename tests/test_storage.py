"""Blob storage: large LMDB values are read from the data file with pread (one I/O instead of
a page fault per 4 KiB); what comes back must be exactly what the map holds, and a reader
that cannot place a value in the file must fall back to the map, never return other bytes."""

import numpy as np

from index.storage import DIRECT_READ_BYTES, LmdbBlobStore


def _values(rng: np.random.Generator, n: int) -> dict[int, bytes]:
    sizes = rng.integers(8, 6 * DIRECT_READ_BYTES, n)
    return {i: rng.bytes(int(s)) for i, s in enumerate(sizes)}


def test_large_values_come_from_the_file_and_match_what_was_written(tmp_path):
    rng = np.random.default_rng(0)
    store = LmdbBlobStore.open(tmp_path / "s")
    values = _values(rng, 120)
    store.write(values)
    for threads in (1, 3):
        with store.viewing(threads) as read:
            got = read(list(values) + [10_000])
        assert got[-1] is None
        for i, blob in enumerate(got[:-1]):
            assert bytes(blob) == values[i]
            # a pread buffer is ours (writable); a view of the map is read-only
            assert (not blob.readonly) == (len(values[i]) >= DIRECT_READ_BYTES), i
    assert not store._files.disabled
    store.close()


def test_reads_stay_right_after_the_map_grows(tmp_path):
    rng = np.random.default_rng(1)
    store = LmdbBlobStore.open(tmp_path / "s", map_size=1 << 22)
    values = _values(rng, 20)
    store.write(values)
    with store.viewing() as read:
        read(list(values))
    more = {1000 + i: rng.bytes(200_000) for i in range(60)}  # past the 4 MB map: it is resized
    store.write(more)
    values.update(more)
    with store.viewing() as read:
        got = read(list(values))
    assert all(bytes(g) == values[k] for g, k in zip(got, values))
    assert not store._files.disabled
    store.close()


def test_a_reader_that_misplaces_the_map_falls_back_to_it(tmp_path):
    rng = np.random.default_rng(2)
    store = LmdbBlobStore.open(tmp_path / "s")
    values = {i: rng.bytes(3 * DIRECT_READ_BYTES) for i in range(8)}
    store.write(values)
    with store.viewing() as read:
        read([0])
        files = store._files
        files.base -= 4096  # as if the base were wrong: offsets now point one page off
        got = read(list(values))
    assert all(bytes(g) == values[i] for i, g in enumerate(got))
    assert files.disabled
    store.close()


def test_a_reader_for_a_file_not_mapped_falls_back_to_the_map(tmp_path):
    rng = np.random.default_rng(3)
    store = LmdbBlobStore.open(tmp_path / "s")
    values = {i: rng.bytes(2 * DIRECT_READ_BYTES) for i in range(4)}
    store.write(values)
    store._file_reader().inode = -1  # no mapping of "this file" will be found
    with store.viewing() as read:
        got = read(list(values))
    assert all(bytes(g) == values[i] for i, g in enumerate(got))
    assert store._files.disabled
    store.close()
