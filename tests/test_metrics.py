"""Metric code against hand-computed cases, ties included (expected values under random tie-breaking)."""

import math

import numpy as np
import pytest

from seminar_ray.metrics import (
    auc,
    by_history_length,
    evaluate_scores,
    gauc,
    history_bucket,
    paired_difference,
    ranking_metrics,
    target_ndcg,
)


def test_hr_ndcg_mrr_of_clear_ranks():
    # positive ranked 1st, 3rd and 12th (last) of 12
    scores = np.array([[9.0] + list(range(8, -3, -1)), [7.0, 9, 8] + [0] * 9, [-1.0] + [0] * 11])
    m = ranking_metrics(scores, ks=(1, 5, 10))
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@5"] == pytest.approx(2 / 3) and m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 3)


def test_ties_count_as_expected_values_under_random_tie_breaking():
    # positive tied with 3 negatives, 1 negative above: rank uniform over {2, 3, 4, 5}
    scores = np.array([[1.0, 2.0, 1.0, 1.0, 1.0, 0.0]])
    m = ranking_metrics(scores, ks=(1, 3, 5))
    assert m["hr@1"] == 0.0
    assert m["hr@3"] == pytest.approx(2 / 4)
    assert m["hr@5"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 4)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)
    # all candidates equal: a constant scorer is exactly random
    flat = ranking_metrics(np.zeros((1, 100)), ks=(10,))
    assert flat["hr@10"] == pytest.approx(0.1)


def test_auc_and_user_grouped_gauc_ignore_one_class_users():
    assert auc([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.3]) == 1.0
    assert auc([1, 0, 1, 0], [0.1, 0.9, 0.2, 0.3]) == 0.0
    assert auc([1, 0], [0.5, 0.5]) == 0.5
    assert auc([1, 0, 0], [0.5, 0.5, 0.1]) == pytest.approx(0.75)
    # user 0 perfect (3 samples), user 1 reversed (2 samples), user 2 one class only (ignored)
    users = [0, 0, 0, 1, 1, 2]
    value = gauc(users, [1, 0, 0, 1, 0, 1], [0.9, 0.1, 0.2, 0.1, 0.9, 0.5])
    assert value == pytest.approx((1.0 * 3 + 0.0 * 2) / 5)


def test_evaluate_scores_splits_by_target_type():
    scores = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    queries = np.array([[5, 5, 5], [0, 0, 0]])
    out = evaluate_scores(np.array([1, 2]), queries, scores)
    assert out["search"]["hr@1"] == 1.0 and out["browse"]["hr@1"] == 0.0 and out["targets"] == 2


def test_metrics_by_history_length_bucket_each_target_by_the_behaviours_before_it():
    assert [history_bucket(n) for n in (0, 4, 5, 99, 100, 1999, 2000, 5000)] == [
        "0-4",
        "0-4",
        "5-9",
        "50-99",
        "100-199",
        "1000-1999",
        "2000+",
        "2000+",
    ]
    scores = np.array([[2.0, 1.0], [0.0, 1.0], [3.0, 1.0]])  # hit, miss, hit
    out = evaluate_scores(np.array([1, 2, 3]), np.zeros((3, 2), dtype=int), scores, np.array([3, 60, 70]))
    assert list(out["by_history_length"]) == ["0-4", "50-99"], "shortest first, empty buckets left out"
    assert out["by_history_length"]["0-4"] == {**ranking_metrics(scores[:1]), "targets": 1}
    assert out["by_history_length"]["50-99"]["hr@1"] == 0.5 and "by_history_length" not in evaluate_scores(
        np.array([1, 2, 3]), np.zeros((3, 2), dtype=int), scores
    )
    with pytest.raises(ValueError, match="2 entries for 3 targets"):
        by_history_length(scores, np.array([1, 2]))


def test_nan_or_one_dimensional_scores_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        ranking_metrics(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        ranking_metrics(np.array([1.0, 2.0]))


def test_per_target_ndcg_averages_to_the_table_figure_and_pairs_two_models():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=(300, 20)).astype(float)  # many ties
    b = a + rng.normal(0, 1.0, size=a.shape)
    per_a, per_b = target_ndcg(a), target_ndcg(b)
    assert per_a.shape == (300,) and per_a.mean() == pytest.approx(ranking_metrics(a)["ndcg@10"])
    assert target_ndcg(np.array([[1.0, 1.0, 0.0]]))[0] == pytest.approx((1 + 1 / math.log2(3)) / 2)  # a tie of two
    diff, se = paired_difference(per_a, per_b)
    assert diff == pytest.approx(per_a.mean() - per_b.mean())
    assert se == pytest.approx(np.std(per_a - per_b, ddof=1) / math.sqrt(300))
    assert paired_difference(per_a, per_a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="≥ 2 targets"):
        paired_difference(per_a[:1], per_b[:1])
