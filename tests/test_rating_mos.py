"""MOS statistics (srcore/rating/mos.py): the rater-clustered t-interval, first showings only,
test-retest agreement, nothing non-finite handed on."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from srcore.rating import mos


def _ratings(rows: list[tuple[str, str, str, int, int]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["rater", "image", "method", "repeat", "score"])
    frame["set"] = "te"
    frame["revisions"] = 0
    return frame


def test_balanced_ratings_give_the_t_interval_of_the_raters_means() -> None:
    scores = {"a": [1, 2, 2], "b": [3, 4, 5], "c": [2, 2, 3], "d": [4, 4, 4]}
    rows = [(r, f"img{i}", "srgan", 0, s) for r, ss in scores.items() for i, s in enumerate(ss)]
    summary = mos.summarise(_ratings(rows))
    means = [np.mean(v) for v in scores.values()]
    low, high = stats.t.interval(0.95, len(means) - 1, loc=np.mean(means),
                                 scale=stats.sem(means))
    row = summary.iloc[0]
    assert (row["set"], row["method"], row["ratings"], row["raters"]) == ("te", "srgan", 12, 4)
    assert row["mos"] == pytest.approx(np.mean([s for v in scores.values() for s in v]))
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low), pytest.approx(high))


def test_unbalanced_ratings_use_the_cluster_robust_standard_error() -> None:
    # a scored 3 images, b only 1: the pooled mean weighs a's scores, the interval has 1 df.
    rows = [("a", "i0", "hr", 0, 5), ("a", "i1", "hr", 0, 4), ("a", "i2", "hr", 0, 3),
            ("b", "i0", "hr", 0, 1)]
    mean, low, high = mos.clustered_interval(pd.Series([5, 4, 3, 1]),
                                             pd.Series(["a", "a", "a", "b"]))
    assert mean == pytest.approx(13 / 4)
    se = math.sqrt(2 / 1 * ((12 - 3 * 3.25) ** 2 + (1 - 3.25) ** 2)) / 4
    assert high - mean == pytest.approx(stats.t.ppf(0.975, 1) * se)
    assert mean - low == pytest.approx(high - mean)
    assert mos.summarise(_ratings(rows)).iloc[0]["mos"] == pytest.approx(3.25)


def test_one_rater_has_no_interval_and_nothing_non_finite_is_handed_on() -> None:
    summary = mos.summarise(_ratings([("a", "i0", "bicubic", 0, 2), ("a", "i1", "bicubic", 0, 3)]))
    assert math.isnan(summary.iloc[0]["ci_low"]) and math.isnan(summary.iloc[0]["ci_high"])
    metrics = mos.as_metrics(summary)
    assert metrics == {"te": {"bicubic": {"mos": 2.5, "mos_ratings": 2.0, "mos_raters": 1.0}}}
    assert "| te | bicubic | 2.50 | - | 1 | 2 |" in mos.table(summary)


def test_repeats_count_for_agreement_only_and_agreement_is_per_rater_and_overall() -> None:
    rows = [("a", "i0", "srgan", 0, 4), ("a", "i0", "srgan", 1, 4),
            ("a", "i1", "srgan", 0, 2), ("a", "i1", "srgan", 1, 3),
            ("b", "i0", "srgan", 0, 5), ("b", "i0", "srgan", 1, 2),
            ("b", "i1", "srgan", 0, 1)]
    frame = _ratings(rows)
    summary = mos.summarise(frame)
    assert summary.iloc[0]["mos"] == pytest.approx((4 + 2 + 5 + 1) / 4)
    assert summary.iloc[0]["ratings"] == 4
    agreement = mos.retest(frame).set_index("rater")
    assert agreement.loc["a", "pairs"] == 2 and agreement.loc["a", "exact"] == 0.5
    assert agreement.loc["a", "within_one"] == 1.0
    assert agreement.loc["b", "mean_abs_diff"] == 3.0
    assert agreement.loc["all", "pairs"] == 3
    assert agreement.loc["all", "mean_abs_diff"] == pytest.approx((0 + 1 + 3) / 3)
    assert "Test-retest" in mos.table(summary, mos.retest(frame))


def test_methods_are_listed_in_the_papers_order_and_versions_get_their_numbers() -> None:
    rows = [("a", "i0", m, 0, s) for m, s in
            (("srgan-v2", 4), ("hr", 5), ("nearest", 1), ("srgan", 3), ("bicubic", 2))]
    summary = mos.summarise(_ratings(rows))
    assert list(summary["method"]) == ["nearest", "bicubic", "srgan", "hr", "srgan-v2"]
    methods = {"srgan": {"model_name": "srgan", "model_version": "1"},
               "srgan-v2": {"model_name": "srgan", "model_version": "2"},
               "hr": {"model_name": None, "model_version": None}}
    tags = mos.versions_of(summary, methods)
    assert tags == {("srgan", "1"): {"te": {"mos": 3.0, "mos_ratings": 1.0, "mos_raters": 1.0}},
                    ("srgan", "2"): {"te": {"mos": 4.0, "mos_ratings": 1.0, "mos_raters": 1.0}}}
