"""Blob storage: large LMDB values are located from their B-tree node, prefetched and viewed
in the map without py-lmdb's page-by-page preload. What comes back must be exactly what
was written, and a store that cannot place a value must fall back to LMDB's own reads,
never return other bytes."""

import numpy as np

from index.storage import LmdbBlobStore


def _values(rng: np.random.Generator, n: int, most: int = 100_000) -> dict[int, bytes]:
    return {i: rng.bytes(int(s)) for i, s in enumerate(rng.integers(8, most, n))}


def test_large_values_are_located_directly_and_match_what_was_written(tmp_path):
    rng = np.random.default_rng(0)
    store = LmdbBlobStore.open(tmp_path / "s")
    values = _values(rng, 120)
    store.write(values)
    with store.viewing() as read:
        got = read(list(values) + [10_000])
    assert got[-1] is None
    assert all(bytes(blob) == values[i] for i, blob in enumerate(got[:-1]))
    direct = store._direct
    assert direct.checked and not direct.disabled  # the node reading agreed with LMDB's
    store.close()


def test_reads_stay_right_after_rewrites_and_after_the_map_grows(tmp_path):
    rng = np.random.default_rng(1)
    store = LmdbBlobStore.open(tmp_path / "s", map_size=1 << 22)
    values = _values(rng, 20)
    store.write(values)
    with store.viewing() as read:
        read(list(values))
    values.update(_values(rng, 10))  # rewritten: new overflow pages
    values.update({1000 + i: rng.bytes(200_000) for i in range(60)})  # past the 4 MB map: it grows
    store.write(values)
    with store.viewing() as read:
        got = read(list(values))
    assert all(bytes(g) == values[k] for g, k in zip(got, values))
    assert not store._direct.disabled
    store.close()


def test_a_store_whose_map_cannot_be_found_reads_through_lmdb(tmp_path):
    rng = np.random.default_rng(3)
    store = LmdbBlobStore.open(tmp_path / "s")
    values = _values(rng, 6)
    store.write(values)
    store._direct_values().inode = -1  # no mapping of "this file" will be found
    with store.viewing() as read:
        got = read(list(values))
    assert all(bytes(g) == values[i] for i, g in enumerate(got))
    assert store._direct.disabled
    store.close()


def test_a_misread_node_is_caught_by_the_check_against_lmdb(tmp_path):
    rng = np.random.default_rng(4)
    store = LmdbBlobStore.open(tmp_path / "s")
    values = {i: rng.bytes(50_000) for i in range(6)}
    store.write(values)
    direct = store._direct_values()
    direct.PAGE_HEADER = 24  # as if LMDB's page header were another size
    with store.viewing() as read:
        got = read(list(values))
    assert all(bytes(g) == values[i] for i, g in enumerate(got))
    assert direct.disabled and not direct.checked
    store.close()


def test_readers_on_threads_see_whole_values_while_a_writer_rewrites_them(tmp_path):
    """Each read returns one complete version of a value (the one its transaction sees),
    never a mix, while another thread keeps rewriting them onto new overflow pages."""
    import threading

    store = LmdbBlobStore.open(tmp_path / "s")
    versions = {k: [bytes([k]) * 40_000] for k in range(8)}
    store.write({k: v[0] for k, v in versions.items()})
    stop, errors = threading.Event(), []

    def writer() -> None:
        for n in range(1, 60):
            puts = {k: bytes([k, n % 256]) * (20_000 + 500 * n) for k in range(8)}
            for k, v in puts.items():
                versions[k].append(v)
            store.write(puts)
        stop.set()

    def reader() -> None:
        while not stop.is_set():
            with store.viewing() as read:
                for k, blob in enumerate(read(list(range(8)))):
                    if bytes(blob) not in versions[k]:
                        errors.append(k)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert store._direct.checked and not store._direct.disabled
    store.close()


def test_places_remembered_in_a_snapshot_are_dropped_when_another_process_commits(tmp_path):
    """Located places hold for one snapshot only: a write by another process (a second shard
    writer, a CLI) moves the snapshot on, and the next reads find the new values."""
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    store = LmdbBlobStore.open(tmp_path / "s")
    values = _values(rng, 30, most=60_000)
    store.write(values)
    for _ in range(2):  # the second read of the snapshot comes from the remembered places
        with store.viewing() as read:
            assert [bytes(b) for b in read(list(values))] == list(values.values())
    assert 0 < len(store._located[1]) <= len(values)
    writer = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[2]);"
        "from index.storage import LmdbBlobStore;"
        "s = LmdbBlobStore.open(sys.argv[1]); rng = np.random.default_rng(9);"
        "s.write({k: bytes([k % 251]) * int(n) for k, n in zip(range(30), rng.integers(5000, 90_000, 30))}); s.close()"
    )
    subprocess.run([sys.executable, "-c", writer, str(tmp_path / "s"), str(__import__("pathlib").Path(__file__).parents[1])],
                   check=True)
    with store.viewing() as read:
        got = read(list(range(30)))
    assert all(len(b) >= 5000 and bytes(b) == bytes([k % 251]) * len(b) for k, b in enumerate(got))
    store.close()


def test_a_standalone_index_leaves_no_scratch_directory_at_exit(tmp_path):
    """An index built without storage keeps its lists in a temporary LMDB; a script that
    exits without closing it (the usual notebook or benchmark) must not leave it behind."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]);"
        "from index.spann import SpannIndex;"
        "x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32);"
        "index = SpannIndex(16, 'l2'); index.add(np.arange(3000), x); index.search(x[:2], 5);"
        "print(index._scratch)"
    )
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parents[1])], check=True,
                         capture_output=True, text=True, env={**__import__("os").environ, "TMPDIR": str(tmp_path)})
    scratch = Path(out.stdout.strip().splitlines()[-1])
    assert scratch.parent == tmp_path
    assert not scratch.exists()
    assert not list(tmp_path.iterdir())
