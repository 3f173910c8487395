"""index.base helpers that every kind leans on."""

import numpy as np

from index.base import MISSING_ID, distinct_top


def _reference(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    best: dict[int, float] = {}
    for i, s in zip(ids.tolist(), scores.tolist()):
        if i != MISSING_ID and np.isfinite(s):
            best[i] = max(best.get(i, -np.inf), s)
    top = sorted(best.items(), key=lambda t: -t[1])[:k]
    return [i for i, _ in top], [s for _, s in top]


def test_distinct_top_keeps_each_rows_best_k_distinct_ids():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, (50, 60))
    scores = np.zeros((50, 60), np.float32)
    for row in range(50):  # an id has one score per row, as a replica does
        scores[row] = rng.standard_normal(40).astype(np.float32)[ids[row]]
    ids[:, -5:] = MISSING_ID  # padding the scan leaves
    scores[:, -5:] = -np.inf
    copies = int(max(np.bincount(r, minlength=40).max() for r in ids[:, :-5]))
    got_ids, got_scores = distinct_top(ids, scores, 10, copies=copies)
    for row in range(50):
        want_ids, want_scores = _reference(ids[row], scores[row], 10)
        one_ids, one_scores = distinct_top(ids[row:row + 1], scores[row:row + 1], 10, copies=copies)
        for got_i, got_s in ((got_ids[row], got_scores[row]), (one_ids[0], one_scores[0])):  # batch, single row
            np.testing.assert_allclose(got_s[:len(want_scores)], want_scores)
            assert got_i[:len(want_ids)].tolist() == want_ids
            assert (got_i[len(want_ids):] == MISSING_ID).all()


def test_distinct_top_pads_short_rows():
    ids = np.array([[5, 5, MISSING_ID, 7]])
    scores = np.array([[1.0, 1.0, -np.inf, 0.5]], np.float32)
    got_ids, got_scores = distinct_top(ids, scores, 3, copies=2)
    assert got_ids.tolist() == [[5, 7, MISSING_ID]]
    assert got_scores[0, 2] == -np.inf
    got_ids, _ = distinct_top(np.concatenate([ids, ids]), np.concatenate([scores, scores]), 3, copies=2)
    assert got_ids.tolist() == [[5, 7, MISSING_ID]] * 2
