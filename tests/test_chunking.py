import pytest

from datastore.chunking import ChunkConfig, chunk_words
from datastore.build import BuildConfig, build
from datastore.store import open_datastore
from tests.conftest import write_jsonl


def test_fixed_windows_cover_every_word_once_without_overlap():
    words = [f"w{i}" for i in range(600)]
    chunks = chunk_words(" ".join(words), ChunkConfig(256, 0))
    assert [len(c.split()) for c in chunks] == [256, 256, 88]
    assert " ".join(chunks).split() == words


def test_overlap_repeats_the_tail_and_never_emits_a_pure_overlap_chunk():
    words = [f"w{i}" for i in range(20)]
    chunks = chunk_words(" ".join(words), ChunkConfig(8, 3))
    assert chunks[0].split() == words[0:8]
    assert chunks[1].split()[:3] == words[5:8]
    assert chunks[-1].split()[-1] == "w19"
    assert len(chunks) == 4  # starts 0, 5, 10, 15
    # 18 words: the window at 10 reaches the end, so no window holds only overlap
    assert len(chunk_words(" ".join(words[:18]), ChunkConfig(8, 3))) == 3


def test_whitespace_is_normalised_and_empty_text_gives_no_chunk():
    assert chunk_words("  a\n\tb   c ", ChunkConfig(2, 0)) == ["a b", "c"]
    assert chunk_words(" \n ", ChunkConfig(4, 0)) == []


@pytest.mark.parametrize("words,overlap", [(0, 0), (4, 4), (4, -1)])
def test_bad_chunk_config_is_rejected(words, overlap):
    with pytest.raises(ValueError):
        ChunkConfig(words, overlap)


def test_every_passage_keeps_its_document_title(tmp_path, encoder):
    text = " ".join(f"word{i}" for i in range(50))
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "d1", "title": "Long Title", "text": text}])
    build(BuildConfig([str(src)], tmp_path / "ds", chunk=ChunkConfig(20, 5), progress=False),
          encoder_factory=lambda: encoder)
    with open_datastore(tmp_path / "ds", encoder_factory=lambda n: encoder) as ds:
        passages = ds.get_passages(list(range(3)))
    assert [p.title for p in passages] == ["Long Title"] * 3
    assert [p.metadata["chunk"] for p in passages] == ["0", "1", "2"]
    assert all(p.metadata["doc_id"] == "d1" for p in passages)
    assert passages[1].text.split()[0] == "word15"
    # the title is part of what the encoder embedded
    assert passages[0].embedding_input().startswith("Long Title\n")
