import pytest

from bench.algos import DEFAULT_GRIDS, NotYetAvailable, UnknownAlgo, grid_for, parse_grid_option, resolve
from bench.peers import FaissIVF


def test_default_grid_splits_build_and_search_points():
    builds, searches = grid_for("faiss-ivf", FaissIVF, None)
    assert builds == [{"nlist": 1024}]
    assert [p["nprobe"] for p in searches] == DEFAULT_GRIDS["faiss-ivf"]["nprobe"]


def test_override_replaces_keys_and_rejects_unknown_ones():
    builds, searches = grid_for("faiss-ivf", FaissIVF, {"nprobe": [1, 4], "nlist": [16, 32]})
    assert builds == [{"nlist": 16}, {"nlist": 32}] and searches == [{"nprobe": 1}, {"nprobe": 4}]
    with pytest.raises(ValueError, match="no parameter 'ef'"):
        grid_for("faiss-ivf", FaissIVF, {"ef": [1]})
    assert grid_for("faiss-ivf", FaissIVF, {"ef": [1]}, lenient=True)[1][0] == {"nprobe": 1}


def test_param_grid_option_forms():
    shared, is_shared = parse_grid_option('{"nprobe": [1, 4, 16, 64]}', ["faiss-ivf", "milvus-lite"])
    assert is_shared and shared["milvus-lite"] == {"nprobe": [1, 4, 16, 64]}
    per, is_shared = parse_grid_option('{"faiss-ivf": {"nprobe": 8}}', ["faiss-ivf", "flat"])
    assert not is_shared and per == {"faiss-ivf": {"nprobe": [8]}}
    for bad in ("[1]", "{nprobe}", '{"nprobe": []}'):
        with pytest.raises(ValueError, match="param-grid"):
            parse_grid_option(bad, ["faiss-ivf"])


def test_names_resolve_through_the_registry():
    assert resolve("flat").kind == "flat"
    assert resolve("faiss-hnsw").name == "faiss-hnsw"
    with pytest.raises(UnknownAlgo, match="known:"):
        resolve("faiss-lsh")
    from index.registry import INDEX_KINDS

    for kind in ("spann", "curator", "binary"):
        if kind not in INDEX_KINDS:
            with pytest.raises(NotYetAvailable):
                resolve(kind)
