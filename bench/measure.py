"""Measuring helpers: resident memory, thread limits and page-cache dropping.

Kept apart from the runner so that the tests can check them and every adapter is
measured by the same code.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

#: Environment variables that size the thread pools of the libraries we benchmark. Set
#: before those libraries load (the runner starts each algo in a fresh process for that).
#: LANCE_IO_THREADS is left alone on purpose: at 1, lancedb 0.40's index build deadlocks
#: (seen here); its I/O threads mostly wait, and CPU affinity bounds them anyway.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
    "RAYON_NUM_THREADS", "LANCE_CPU_THREADS", "TOKIO_WORKER_THREADS", "VECLIB_MAXIMUM_THREADS",
)


def thread_env(threads: int) -> dict[str, str]:
    return {name: str(threads) for name in THREAD_ENV_VARS}


def pin_threads(threads: int) -> None:
    """Confine this process to `threads` CPUs and size the native pools we can reach.

    CPU affinity is what makes a "1 thread" run honest for engines whose own pools we
    cannot size (Rust runtimes, C++ thread pools): they still run on one core.
    """
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[:max(1, threads)])
    os.environ.update(thread_env(threads))
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:
        pass


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def anon_bytes() -> int:
    """Anonymous resident memory (heap, arrays) of this process: what an index holds and
    cannot give back. RSS also counts file pages a disk index has mmap'd, which are page
    cache the kernel reclaims under pressure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss_bytes()


class PeakMemory:
    """Samples anonymous memory in a thread while a block runs; `.peak` is the growth."""

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, anon_bytes() - self._base)

    def __enter__(self) -> "PeakMemory":
        self._base = anon_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_bytes() - self._base)


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS deltas mean something."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def files_under(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(q for q in p.rglob("*") if q.is_file())
    return out


def disk_bytes(paths: Iterable[Path]) -> int:
    return sum(f.stat().st_size for f in files_under(paths))


def drop_page_cache(paths: Iterable[Path]) -> str:
    """Evict the files' pages from the page cache; returns the method that worked.

    drop_caches (root) empties the whole cache; otherwise POSIX_FADV_DONTNEED on each
    file evicts its clean pages. Neither evicts pages a process still has mapped, which
    is why the runner reopens an index after this for cold runs.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for path in files_under(paths):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def latency_percentiles(latencies_s: list[float]) -> tuple[float | None, float | None]:
    """p50 and p99 in milliseconds (None when nothing was timed)."""
    if not latencies_s:
        return None, None
    arr = np.asarray(latencies_s) * 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))
