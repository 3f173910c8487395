"""Adapters for the in-process peers: faiss (flat, IVF, HNSW, on-disk IVF), hnswlib, DiskANN.

Each is the plain, documented way to use the library, with the same parameters its
authors tune, so that a comparison measures the algorithm and not our misuse of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.adapter import Adapter, require

_FAISS_INSTALL = "pip install faiss-cpu"


def _faiss():
    return require("faiss", _FAISS_INSTALL)


class _FaissFileAdapter(Adapter):
    """A faiss index written to one file and read back whole into RAM."""

    file_name = "index.faiss"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._index = None

    @classmethod
    def check_available(cls) -> None:
        _faiss()

    def _metric(self) -> int:
        faiss = _faiss()
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    def _new_index(self, base: np.ndarray, params: dict[str, Any]):
        raise NotImplementedError

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        faiss = _faiss()
        index = self._new_index(base, params)
        if not index.is_trained:
            index.train(base)
        index.add(base)
        self.workdir.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(self.workdir / self.file_name))

    def load(self, params: dict[str, Any]) -> None:
        self._index = _faiss().read_index(str(self.workdir / self.file_name))

    def _search_params(self, params: dict[str, Any]):
        return None

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any], tenant: str | None = None) -> np.ndarray:
        _, ids = self._index.search(queries, k, params=self._search_params(params))
        return ids.astype(np.int64, copy=False)

    def close(self) -> None:
        self._index = None

    def index_files(self) -> list[Path]:
        return [self.workdir / self.file_name]


class FaissFlat(_FaissFileAdapter):
    """Exact search: the speed every approximate index must beat."""

    name = "faiss-flat"

    def _new_index(self, base, params):
        faiss = _faiss()
        return faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)


class FaissIVF(_FaissFileAdapter):
    name = "faiss-ivf"
    build_keys = ("nlist",)
    search_keys = ("nprobe",)

    def _new_index(self, base, params):
        faiss = _faiss()
        quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, int(params.get("nlist", 1024)), self._metric())
        index.own_fields = True
        quantizer.this.disown()  # the IVF index frees its quantizer
        return index

    def _search_params(self, params):
        return _faiss().SearchParametersIVF(nprobe=int(params.get("nprobe", 16)))


class FaissOnDiskIVF(FaissIVF):
    """IVF whose inverted lists live in a memory-mapped file (faiss OnDiskInvertedLists)."""

    name = "faiss-ondisk-ivf"
    lists_name = "lists.ivfdata"

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        faiss = _faiss()
        index = self._new_index(base, params)
        index.train(base)
        index.add(base)
        self.workdir.mkdir(parents=True, exist_ok=True)
        lists_path = self.workdir / self.lists_name
        ondisk = faiss.OnDiskInvertedLists(index.nlist, index.code_size, str(lists_path))
        ondisk.merge_from(index.invlists, 0)  # copies the in-RAM lists into the file (ids + 0)
        index.replace_invlists(ondisk, True)
        ondisk.this.disown()
        faiss.write_index(index, str(self.workdir / self.file_name))

    def load(self, params: dict[str, Any]) -> None:
        faiss = _faiss()
        # SAME_DIR: the lists file is found beside the index file, wherever the dir moved.
        self._index = faiss.read_index(str(self.workdir / self.file_name), faiss.IO_FLAG_ONDISK_SAME_DIR)

    def index_files(self) -> list[Path]:
        return [self.workdir / self.file_name, self.workdir / self.lists_name]


class FaissHNSW(_FaissFileAdapter):
    name = "faiss-hnsw"
    build_keys = ("M", "efConstruction")
    search_keys = ("efSearch",)

    def _new_index(self, base, params):
        index = _faiss().IndexHNSWFlat(self.dim, int(params.get("M", 32)), self._metric())
        index.hnsw.efConstruction = int(params.get("efConstruction", 40))
        return index

    def _search_params(self, params):
        return _faiss().SearchParametersHNSW(efSearch=int(params.get("efSearch", 64)))


class Hnswlib(Adapter):
    name = "hnswlib"
    build_keys = ("M", "ef_construction")
    search_keys = ("ef",)
    file_name = "index.hnsw"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._index = None

    @classmethod
    def check_available(cls) -> None:
        require("hnswlib", "pip install hnswlib")

    def _space(self) -> str:
        return "ip" if self.metric == "ip" else "l2"

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        hnswlib = require("hnswlib", "pip install hnswlib")
        index = hnswlib.Index(space=self._space(), dim=self.dim)
        index.init_index(max_elements=len(base), M=int(params.get("M", 32)),
                         ef_construction=int(params.get("ef_construction", 40)), random_seed=100)
        index.add_items(base, np.arange(len(base)), num_threads=self.threads)
        self.workdir.mkdir(parents=True, exist_ok=True)
        index.save_index(str(self.workdir / self.file_name))

    def load(self, params: dict[str, Any]) -> None:
        hnswlib = require("hnswlib", "pip install hnswlib")
        self._index = hnswlib.Index(space=self._space(), dim=self.dim)
        self._index.load_index(str(self.workdir / self.file_name))
        self._index.set_num_threads(self.threads)

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any], tenant: str | None = None) -> np.ndarray:
        self._index.set_ef(max(k, int(params.get("ef", 64))))
        labels, _ = self._index.knn_query(queries, k=k, num_threads=self.threads)
        return labels.astype(np.int64, copy=False)

    def close(self) -> None:
        self._index = None

    def index_files(self) -> list[Path]:
        return [self.workdir / self.file_name]


_DISKANN_INSTALL = "pip install --no-deps diskannpy"


class DiskANN(Adapter):
    """diskannpy's static disk index: PQ codes in RAM, graph + full vectors on SSD.

    Cosine is not supported by its disk index, so unit-normalised "ip" data (every "cos"
    dataset) is searched with L2, which ranks unit vectors identically; other "ip" data
    uses MIPS. The index is opened with at least two
    search contexts: with one, diskannpy 0.7 deadlocks while loading (seen here).
    """

    name = "diskann"
    build_keys = ("graph_degree", "complexity", "pq_bytes_per_vector", "cache_nodes")
    search_keys = ("L", "beam_width")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._index = None

    @classmethod
    def check_available(cls) -> None:
        require("diskannpy", _DISKANN_INSTALL)

    def _distance(self, base: np.ndarray) -> str:
        if self.metric == "l2":
            return "l2"
        norms = np.linalg.norm(base[:1000], axis=1)
        return "l2" if np.allclose(norms, 1.0, atol=1e-3) else "mips"

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        dap = require("diskannpy", _DISKANN_INSTALL)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The in-RAM PQ budget: bytes per vector times N, in GB as diskannpy wants it.
        pq_bytes = float(params.get("pq_bytes_per_vector", max(8, self.dim // 2)))
        dap.build_disk_index(
            data=np.ascontiguousarray(base, np.float32), distance_metric=self._distance(base),
            index_directory=str(self.workdir), complexity=int(params.get("complexity", 64)),
            graph_degree=int(params.get("graph_degree", 32)),
            search_memory_maximum=max(pq_bytes * len(base) / 1e9, 1e-4), build_memory_maximum=4.0,
            num_threads=self.threads, pq_disk_bytes=0)
        # The raw-vector copy is build input only; the disk index holds full vectors itself.
        (self.workdir / "ann_vectors.bin").unlink(missing_ok=True)

    def load(self, params: dict[str, Any]) -> None:
        dap = require("diskannpy", _DISKANN_INSTALL)
        cache = int(params.get("cache_nodes", 0))
        self._index = dap.StaticDiskIndex(str(self.workdir), num_threads=max(2, self.threads),
                                          num_nodes_to_cache=cache, cache_mechanism=1 if cache else 0)

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any], tenant: str | None = None) -> np.ndarray:
        # batch_search on one row is also the single-query path: its search() misbehaves.
        res = self._index.batch_search(queries, k, max(k, int(params.get("L", 64))), self.threads,
                                       beam_width=int(params.get("beam_width", 2)))
        return np.asarray(res.identifiers, dtype=np.int64)

    def close(self) -> None:
        self._index = None


class DiskANNMemory(DiskANN):
    """diskannpy's static in-memory Vamana index, for contrast with its disk index."""

    name = "diskann-memory"
    build_keys = ("graph_degree", "complexity", "alpha")
    search_keys = ("L",)

    def _distance(self, base: np.ndarray) -> str:
        return "mips" if self.metric == "ip" else "l2"

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        dap = require("diskannpy", _DISKANN_INSTALL)
        self.workdir.mkdir(parents=True, exist_ok=True)  # diskannpy wants it to exist
        dap.build_memory_index(
            data=np.ascontiguousarray(base, np.float32), distance_metric=self._distance(base),
            index_directory=str(self.workdir), complexity=int(params.get("complexity", 64)),
            graph_degree=int(params.get("graph_degree", 32)), num_threads=self.threads,
            alpha=float(params.get("alpha", 1.2)))
        (self.workdir / "ann_vectors.bin").unlink(missing_ok=True)

    def load(self, params: dict[str, Any]) -> None:
        dap = require("diskannpy", _DISKANN_INSTALL)
        self._index = dap.StaticMemoryIndex(str(self.workdir), num_threads=max(2, self.threads),
                                            initial_search_complexity=128)

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any], tenant: str | None = None) -> np.ndarray:
        res = self._index.batch_search(queries, k, max(k, int(params.get("L", 64))), self.threads)
        return np.asarray(res.identifiers, dtype=np.int64)
