import random

from datastore.dedup import DedupConfig, Deduplicator, normalize


def _text(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(['river', 'stone', 'cloud', 'lamp', 'field'])}{rng.randint(0, 500)}"
                    for _ in range(n))


def test_exact_duplicates_ignore_case_punctuation_and_spacing():
    d = Deduplicator()
    assert d.check(0, "The Quick brown fox.")
    assert not d.check(1, "the quick,  brown fox")
    assert d.exact_dropped == 1 and d.near_dropped == 0
    assert normalize("A-b  C!") == "a b c"


def test_near_duplicate_with_one_changed_word_is_dropped():
    base = _text(1)
    words = base.split()
    words[150] = "changed"
    d = Deduplicator()
    assert d.check(0, base)
    assert not d.check(1, " ".join(words))
    assert d.near_dropped == 1


def test_distinct_texts_are_all_kept():
    d = Deduplicator()
    kept = [d.check(i, _text(i)) for i in range(200)]
    assert all(kept)
    assert d.exact_dropped == d.near_dropped == 0


def test_half_overlapping_texts_are_kept_at_threshold_0_8():
    a, b = _text(7).split(), _text(8).split()
    mixed = a[:150] + b[150:]
    d = Deduplicator()
    assert d.check(0, " ".join(a))
    assert d.check(1, " ".join(mixed))


def test_dedup_can_be_switched_off():
    d = Deduplicator(DedupConfig(exact=False, near=False))
    assert d.check(0, "same text") and d.check(1, "same text")
