"""Small seeded datasets for the harness's own tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.prepare import SyntheticConfig, prepare_synthetic


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """2,000 x 16 clustered L2 vectors, 50 queries; gt not yet computed."""
    return prepare_synthetic(SyntheticConfig(out=tmp_path_factory.mktemp("tiny"), n=2000, dim=16, queries=50,
                                             clusters=20, seed=7))


def write_dataset(directory: Path, base: np.ndarray, queries: np.ndarray, metric: str = "l2", **files) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "base.npy", base.astype(np.float32))
    np.save(directory / "queries.npy", queries.astype(np.float32))
    (directory / "dataset.json").write_text(f'{{"metric": "{metric}", "name": "t"}}')
    for name, arr in files.items():
        np.save(directory / name, arr)
    return directory
