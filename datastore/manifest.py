"""manifest.json: what a datastore directory holds and how it was made.

Written atomically (temp file + rename) so a crash never leaves half a manifest.
`build_key()` is the part that must match for a rerun to resume rather than refuse.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datastore.errors import FailedPrecondition, NotFound

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class ModelInfo:
    name: str
    dim: int
    normalize: bool = True
    revision: str = ""


@dataclass
class ChunkingInfo:
    words: int = 256
    overlap: int = 0


@dataclass
class DedupInfo:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    ngram: int = 13
    num_perm: int = 128


@dataclass
class IndexInfo:
    kind: str = "flat"
    metric: str = "ip"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    model: ModelInfo
    chunking: ChunkingInfo
    dedup: DedupInfo
    index: IndexInfo
    num_shards: int
    vector_dtype: str = "float16"
    format_version: int = FORMAT_VERSION
    complete: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    #: Other embedding models whose query vectors this datastore's index can search (binary
    #: codes trained for cross-version compatibility): [{"name", "dim", "binarizer", ...}].
    compat_models: list[dict[str, Any]] = field(default_factory=list)

    @property
    def shard_dirs(self) -> list[str]:
        return [shard_dir(i) for i in range(self.num_shards)]

    def build_key(self) -> dict[str, Any]:
        """Settings and inputs that decide the content: equal keys mean the same build."""
        return {
            "model": self.model.name, "chunking": asdict(self.chunking),
            "dedup": asdict(self.dedup), "index": asdict(self.index), "num_shards": self.num_shards,
            "vector_dtype": self.vector_dtype, "inputs": self.provenance.get("inputs"),
            "seed": self.provenance.get("seed"), "limit_docs": self.provenance.get("limit_docs"),
        }

    def to_json(self) -> str:
        d = asdict(self)
        d["shards"] = [{"id": i, "path": p} for i, p in enumerate(self.shard_dirs)]
        return json.dumps(d, indent=2, sort_keys=True)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        tmp = directory / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(directory / MANIFEST)

    @classmethod
    def from_json(cls, text: str, origin: str = "manifest") -> "Manifest":
        try:
            d = json.loads(text)
            if d.get("format_version") != FORMAT_VERSION:
                raise FailedPrecondition(f"{origin}: format version {d.get('format_version')} is not supported "
                                         f"(this build reads {FORMAT_VERSION})")
            d.pop("shards", None)
            return cls(model=ModelInfo(**d.pop("model")), chunking=ChunkingInfo(**d.pop("chunking")),
                       dedup=DedupInfo(**d.pop("dedup")), index=IndexInfo(**d.pop("index")), **d)
        except (ValueError, TypeError, KeyError) as e:
            raise FailedPrecondition(f"{origin} is damaged: {e}", hint="restore it or rebuild the datastore") from e

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise NotFound(f"{directory} is not a datastore (no {MANIFEST})", resource_type="datastore",
                           resource_name=str(directory), hint="build one with `datastore build INPUT --out DIR`")
        return cls.from_json(path.read_text(), str(path))


def shard_dir(i: int) -> str:
    return f"shard-{i:04d}"
