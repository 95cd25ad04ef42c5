"""`srgan mos`: mean opinion scores per set and method, with a 95% interval, and the
test-retest agreement of raters.

MOS is the mean of all first-showing scores of a set and method (the paper's definition: every
rating counts once); the retest showings only measure agreement.

The interval is clustered by rater, because one rater's scores are not independent (a strict
rater scores everything low): with n raters, S_r and m_r rater r's sum and count of scores and
M = sum of m_r, the cluster-robust standard error of the mean is

    SE^2 = n / (n - 1) * sum_r (S_r - m_r * MOS)^2 / M^2

and the interval is MOS +- t(0.975, n - 1) * SE, a t-interval with n - 1 degrees of freedom.
When every rater scored every image it is exactly the t-interval of the raters' own means.
With one rater there is no interval (NaN, shown as "-", never logged).

Test-retest: for each version a rater scored twice, the two scores; reported as the number of
pairs, the share scored identically, the share within one point and the mean absolute
difference, over all raters and per rater.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from srcore.rating import BUILTIN_METHODS, ratings_path
from srcore.rating.store import Store

#: Columns of `summarise`, and the metric keys `as_metrics` gives them.
METRIC_KEYS = {"mos": "mos", "ci_low": "mos_ci_low", "ci_high": "mos_ci_high",
               "ratings": "mos_ratings", "raters": "mos_raters"}
#: Display order of methods: the built-in ones, then registered versions by name.
ORDER = BUILTIN_METHODS


def load(path: Path) -> pd.DataFrame:
    """Every score in the store at `path` (rater, set, image, method, repeat, score, revisions);
    a missing store says how to make one."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ratings yet; run `srgan rate` and score some "
                                "images (or `dvc pull ratings.dvc`)")
    return _frame(Store(path))


def _frame(store: Store) -> pd.DataFrame:
    return pd.DataFrame(store.ratings(), columns=["rater", "set", "image", "method", "repeat",
                                                  "score", "revisions"])


def clustered_interval(scores: pd.Series, raters: pd.Series,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `scores` and its rater-clustered t-interval (module
    docstring); low and high are NaN with fewer than two raters."""
    frame = pd.DataFrame({"score": scores.astype(float).to_numpy(),
                          "rater": raters.to_numpy()})
    total, count = frame["score"].sum(), len(frame)
    mean = total / count
    per_rater = frame.groupby("rater")["score"].agg(["sum", "count"])
    n = len(per_rater)
    if n < 2:
        return mean, math.nan, math.nan
    resid = per_rater["sum"] - per_rater["count"] * mean
    se = math.sqrt(n / (n - 1) * float((resid**2).sum())) / count
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return mean, mean - half, mean + half


def _method_order(method: str) -> tuple[int, str]:
    return (ORDER.index(method) if method in ORDER else len(ORDER), method)


def summarise(ratings: pd.DataFrame) -> pd.DataFrame:
    """One row per (set, method): mos, ci_low, ci_high, ratings, raters (first showings)."""
    first = ratings[ratings["repeat"] == 0]
    rows = []
    for (set_name, method), group in first.groupby(["set", "method"], sort=False):
        mean, low, high = clustered_interval(group["score"], group["rater"])
        rows.append({"set": set_name, "method": method, "mos": mean, "ci_low": low,
                     "ci_high": high, "ratings": len(group),
                     "raters": group["rater"].nunique()})
    frame = pd.DataFrame(rows, columns=["set", "method", *METRIC_KEYS])
    if frame.empty:
        return frame
    frame["_order"] = [_method_order(m) for m in frame["method"]]
    return frame.sort_values(["set", "_order"]).drop(columns="_order").reset_index(drop=True)


def retest(ratings: pd.DataFrame) -> pd.DataFrame:
    """Test-retest agreement per rater and over all ('all'): pairs, exact, within_one,
    mean_abs_diff (module docstring)."""
    keys = ["rater", "set", "image", "method"]
    first = ratings[ratings["repeat"] == 0].set_index(keys)["score"]
    second = ratings[ratings["repeat"] == 1].set_index(keys)["score"]
    both = pd.concat({"first": first, "second": second}, axis=1, join="inner").reset_index()
    rows = []
    groups = [(str(r), g) for r, g in both.groupby("rater")] + [("all", both)]
    for rater, group in groups:
        diff = (group["first"] - group["second"]).abs()
        rows.append({"rater": rater, "pairs": len(group),
                     "exact": float((diff == 0).mean()) if len(group) else math.nan,
                     "within_one": float((diff <= 1).mean()) if len(group) else math.nan,
                     "mean_abs_diff": float(diff.mean()) if len(group) else math.nan})
    return pd.DataFrame(rows, columns=["rater", "pairs", "exact", "within_one",
                                       "mean_abs_diff"])


def as_metrics(summary: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """summary as {set: {method: {mos, mos_ci_low, mos_ci_high, mos_ratings, mos_raters}}},
    leaving out what is not finite (no interval with one rater): NaN never reaches MLflow."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in summary.itertuples(index=False):
        values = {METRIC_KEYS[c]: float(getattr(row, c)) for c in METRIC_KEYS}
        out.setdefault(row.set, {})[row.method] = {
            k: v for k, v in values.items() if math.isfinite(v)}
    return out


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if not np.isfinite(value) else f"{value:.{digits}f}"


def table(summary: pd.DataFrame, agreement: pd.DataFrame | None = None) -> str:
    """The MOS table (Markdown) and, when there are repeated showings, the agreement table."""
    if summary.empty:
        return "no ratings yet"
    lines = ["| set | method | MOS | 95% CI (rater-clustered t) | raters | ratings |",
             "|---|---|---|---|---|---|"]
    for row in summary.itertuples(index=False):
        ci = ("-" if not np.isfinite(row.ci_low)
              else f"{_fmt(row.ci_low)} - {_fmt(row.ci_high)}")
        lines.append(f"| {row.set} | {row.method} | {_fmt(row.mos)} | {ci} | {row.raters} | "
                     f"{row.ratings} |")
    text = "\n".join(lines)
    if agreement is not None and int(agreement["pairs"].iloc[-1]) > 0:
        text += ("\n\nTest-retest (versions a rater scored twice):\n\n"
                 "| rater | pairs | identical | within one | mean abs. difference |\n"
                 "|---|---|---|---|---|")
        for row in agreement.itertuples(index=False):
            text += (f"\n| {row.rater} | {row.pairs} | {_fmt(row.exact)} | "
                     f"{_fmt(row.within_one)} | {_fmt(row.mean_abs_diff)} |")
    return text


def compute(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]] | None:
    """(summary, agreement, methods) from root/ratings, or None when there is no store or no
    score yet (the evaluate stage then skips MOS)."""
    path = ratings_path(root)
    if not path.is_file():
        return None
    store = Store(path)  # opened once: each opening runs the schema and the WAL set-up
    ratings = _frame(store)
    if ratings.empty:
        return None
    return summarise(ratings), retest(ratings), store.methods()


def versions_of(summary: pd.DataFrame, methods: dict[str, Any]
                ) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """{(model name, version): {set: metrics}} for the methods made by a registered version
    (the model-version tags `srgan models compare` shows and the gate reads)."""
    metrics = as_metrics(summary)
    out: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for method, info in methods.items():
        name, version = info.get("model_name"), info.get("model_version")
        if not name or not version:
            continue
        for set_name, by_method in metrics.items():
            if method in by_method:
                out.setdefault((str(name), str(version)), {})[set_name] = by_method[method]
    return out
