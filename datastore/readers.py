"""Input documents from JSONL, Parquet, a directory of .txt/.md files, or the default corpus.

Every reader yields `Document`s in a deterministic order (files sorted), so a rerun of a
build sees the same stream and can resume. A malformed record names its file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from datastore.control import TENANT_NAME
from datastore.corpus import DEFAULT_CORPUS, default_corpus_path, iter_default_corpus
from datastore.errors import InvalidArgument, NotFound

TEXT_SUFFIXES = (".txt", ".md")


@dataclass
class Document:
    text: str
    title: str = ""
    source: str = ""
    doc_id: str | None = None
    tenants: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    origin: str = ""  # file:line, for error messages


@dataclass
class ReadStats:
    documents: int = 0
    bad_lines: int = 0


def _from_record(r: Any, origin: str) -> Document:
    if not isinstance(r, dict):
        raise ValueError("a record must be a JSON object")
    text = r.get("text")
    if not isinstance(text, str):
        raise ValueError('field "text" must be a string')
    for name in ("title", "source"):
        if r.get(name) is not None and not isinstance(r[name], str):
            raise ValueError(f'field "{name}" must be a string')
    tenants = r.get("tenants") or []
    if not isinstance(tenants, list) or not all(isinstance(t, str) and TENANT_NAME.match(t) for t in tenants):
        raise ValueError('field "tenants" must be a list of tenant names (letters, digits, _.:-)')
    metadata = r.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError('field "metadata" must be an object')
    doc_id = r.get("id")
    return Document(text=text, title=r.get("title") or "", source=r.get("source") or "",
                    doc_id=None if doc_id is None else str(doc_id), tenants=tuple(sorted(set(tenants))),
                    metadata={str(k): str(v) for k, v in metadata.items()}, origin=origin)


def _read_jsonl(path: Path, stats: ReadStats, skip_bad_lines: bool) -> Iterator[Document]:
    with open(path, encoding="utf-8", errors="strict") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise InvalidArgument(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from e
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                yield _from_record(json.loads(line), f"{path}:{lineno}")
            except ValueError as e:
                if skip_bad_lines:
                    stats.bad_lines += 1
                    continue
                raise InvalidArgument(f"{path}:{lineno}: malformed record: {e}",
                                      hint="fix the line or pass --skip-bad-lines to skip and count it") from e


def _read_parquet(path: Path, stats: ReadStats, skip_bad_lines: bool) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InvalidArgument(f"{path}: not a readable Parquet file: {e}") from e
    if "text" not in pf.schema_arrow.names:
        raise InvalidArgument(f'{path}: Parquet file has no "text" column (columns: {pf.schema_arrow.names})')
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for r in batch.to_pylist():
            row += 1
            try:
                yield _from_record(r, f"{path}:row {row}")
            except ValueError as e:
                if skip_bad_lines:
                    stats.bad_lines += 1
                    continue
                raise InvalidArgument(f"{path}: row {row}: malformed record: {e}",
                                      hint="fix the row or pass --skip-bad-lines") from e


def _read_text_dir(path: Path) -> Iterator[Document]:
    for f in sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()):
        text = f.read_text(encoding="utf-8", errors="replace")
        title = f.stem
        first = text.lstrip().split("\n", 1)[0]
        if f.suffix == ".md" and first.startswith("# "):
            title = first[2:].strip()
        yield Document(text=text, title=title, source=str(f.relative_to(path)), doc_id=str(f.relative_to(path)),
                       origin=str(f))


def check_inputs(inputs: list[str]) -> None:
    """Fail before any work if an input is missing or of an unknown kind."""
    if not inputs:
        raise InvalidArgument("no input given", hint=f"name JSONL/Parquet files, a text directory or {DEFAULT_CORPUS}")
    for spec in inputs:
        if spec == DEFAULT_CORPUS:
            continue
        p = Path(spec)
        if not p.exists():
            raise NotFound(f"input {spec} does not exist", resource_type="file", resource_name=spec,
                           hint="check the path; inputs are JSONL/Parquet files, text directories or `wiki`")
        if p.is_file() and p.suffix not in (".jsonl", ".parquet"):
            raise InvalidArgument(f"input {spec}: unknown file type {p.suffix!r}",
                                  hint="use .jsonl, .parquet or a directory of .txt/.md files")


def iter_documents(inputs: list[str], stats: ReadStats, skip_bad_lines: bool = False,
                   limit: int | None = None) -> Iterator[Document]:
    """All documents of all inputs, in order, at most `limit`."""
    check_inputs(inputs)

    def stream() -> Iterator[Document]:
        for spec in inputs:
            p = Path(spec)
            if spec == DEFAULT_CORPUS:
                yield from (Document(d.text, d.title, d.source, d.doc_id, (), d.metadata, d.origin)
                            for d in iter_default_corpus())
            elif p.is_dir():
                yield from _read_text_dir(p)
            elif p.suffix == ".parquet":
                yield from _read_parquet(p, stats, skip_bad_lines)
            else:
                yield from _read_jsonl(p, stats, skip_bad_lines)

    for doc in stream():
        if limit is not None and stats.documents >= limit:
            return
        stats.documents += 1
        yield doc


def count_documents(inputs: list[str], limit: int | None = None) -> int | None:
    """Documents the inputs hold (cheaply: lines, rows, files), for the progress bar's ETA."""
    total = 0
    for spec in inputs:
        p = Path(spec)
        if spec == DEFAULT_CORPUS:
            total += sum(1 for _ in iter_default_corpus())
        elif p.is_dir():
            total += sum(1 for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES)
        elif p.suffix == ".parquet":
            import pyarrow.parquet as pq
            total += pq.ParquetFile(p).metadata.num_rows
        else:
            with open(p, "rb") as f:
                total += sum(1 for line in f if line.strip())
    return min(total, limit) if limit is not None else total


__all__ = ["Document", "ReadStats", "iter_documents", "count_documents", "check_inputs", "default_corpus_path"]
