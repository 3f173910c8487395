import numpy as np
import pytest

from bench.datasets import recall_at_k


def test_perfect_and_partial_recall():
    gt = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at_k(gt, gt, k=4) == 1.0
    found = np.array([[4, 3, 9, 9], [5, 0, 0, 0]])  # order does not matter, repeats count once
    assert recall_at_k(found, gt, k=4) == pytest.approx(3 / 8)


def test_only_top_k_of_each_side_counts():
    gt = np.array([[1, 2, 3, 4]])
    assert recall_at_k(np.array([[9, 9, 1, 2]]), gt, k=2) == 0.0
    assert recall_at_k(np.array([[2, 1, 7, 7]]), gt, k=2) == 1.0


def test_padding_never_matches_and_short_truth_is_the_denominator():
    gt = np.array([[1, 2, -1, -1]])  # a tenant that can see only two vectors
    assert recall_at_k(np.array([[2, 1, -1, -1]]), gt, k=4) == 1.0
    assert recall_at_k(np.array([[-1, -1, -1, -1]]), gt, k=4) == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="equal Q"):
        recall_at_k(np.zeros((2, 10)), np.zeros((3, 10)))
