"""manifest.json: what a datastore directory holds and how it was made.

Written atomically (temp file, fsync, rename, fsync of the directory) so a crash never
leaves half a manifest, and with a checksum of its own content, so a damaged or hand-edited
manifest is refused with its name instead of silently describing another datastore.
`build_key()` is the part that must match for a rerun to resume rather than refuse.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datastore.errors import FailedPrecondition, NotFound
from datastore.integrity import atomic_write, bytes_digest

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
    #: Random id of this datastore, also stamped into each shard's meta database, so a shard
    #: of another datastore put in place of one of ours is refused ("" in older manifests).
    datastore_id: str = ""

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
        d["checksum"] = _content_checksum(d)
        return json.dumps(d, indent=2, sort_keys=True)

    def save(self, directory: Path) -> None:
        atomic_write(Path(directory) / MANIFEST, self.to_json().encode())

    @classmethod
    def from_json(cls, text: str, origin: str = "manifest") -> Manifest:
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ValueError(f"expected a JSON object, got {type(d).__name__}")
            want = d.pop("checksum", None)
            if want is not None and want != _content_checksum(d):
                raise FailedPrecondition(f"{origin} is damaged or was edited: its content does not match its "
                                         f"checksum", hint="restore it from a backup or rebuild the datastore")
            if d.get("format_version") != FORMAT_VERSION:
                raise FailedPrecondition(f"{origin}: format version {d.get('format_version')} is not supported "
                                         f"(this build reads {FORMAT_VERSION})")
            d.pop("shards", None)
            return cls(model=ModelInfo(**d.pop("model")), chunking=ChunkingInfo(**d.pop("chunking")),
                       dedup=DedupInfo(**d.pop("dedup")), index=IndexInfo(**d.pop("index")), **d)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise FailedPrecondition(f"{origin} is damaged: {e}", hint="restore it or rebuild the datastore") from e

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise NotFound(f"{directory} is not a datastore (no {MANIFEST})", resource_type="datastore",
                           resource_name=str(directory), hint="build one with `datastore build INPUT --out DIR`")
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FailedPrecondition(f"{path} is damaged or unreadable: {e}",
                                     hint="restore it or rebuild the datastore") from e
        return cls.from_json(text, str(path))


def _content_checksum(d: dict[str, Any]) -> str:
    """sha256 of the manifest's content without its checksum field, in one canonical form."""
    body = {k: v for k, v in d.items() if k != "checksum"}
    return "sha256:" + bytes_digest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def new_datastore_id() -> str:
    return uuid.uuid4().hex


def shard_dir(i: int) -> str:
    return f"shard-{i:04d}"
