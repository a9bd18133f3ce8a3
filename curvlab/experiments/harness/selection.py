"""Best-setting selection over sweep results, and time-to-target read from traces.

One rule serves every study: a setting's score is the seed-mean of a result column (lower is
better; diverged or non-finite runs count as ``+inf``), the best setting of a group has the
lowest score, and ties go to the setting listed first in the summary (the sweep's grid order).

Example:
    >>> df = pd.DataFrame({"opt": ["a", "a"], "hp.lr": [1.0, 0.1], "seed": 0,
    ...                    "final_train_loss": [float("inf"), float("nan")]})
    >>> select_best(df, ["opt"])["hp.lr"].tolist()   # both diverged: the first listed wins
    [1.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

__all__ = ["first_crossing", "select_best"]


def first_crossing(trace: pd.DataFrame, target: float, *, value: str = "train_loss",
                   at: str = "time_s") -> float:
    """``at`` of the first row with ``value <= target`` (NaN if never): time or iterations to
    a target read from a trace.

    Example:
        >>> tr = pd.DataFrame({"time_s": [0, 1, 2], "train_loss": [3.0, 1.0, 0.5]})
        >>> first_crossing(tr, 1.0), first_crossing(tr, 0.1)
        (1.0, nan)
    """
    hit = trace[trace[value] <= target]
    return float(hit[at].iloc[0]) if len(hit) else math.nan


def select_best(summary: pd.DataFrame, by: Sequence[str], score: str = "final_train_loss",
                hyper: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows of the best hyperparameter setting per group ``by``, scored by the seed-mean of
    ``score`` (lower is better; diverged or non-finite runs count as ``+inf``; ties go to the
    setting that appears first in ``summary``).

    ``hyper`` are the hyperparameter columns (default: every column named ``hp.*``, i.e. the
    flattened ``{"hp": {...}}`` part of a run config); ``hyper=["key"]`` makes every run its own
    setting (a grid searched on one seed). Adds a ``mean_score`` column; the rows come sorted
    by ``by``.

    Example:
        >>> df = pd.DataFrame({"opt": ["a", "a", "b"], "hp.lr": [0.1, 1.0, 0.1], "seed": 0,
        ...                    "final_train_loss": [0.5, 0.2, float("nan")]})
        >>> select_best(df, ["opt"])[["opt", "hp.lr"]].values.tolist()
        [['a', 1.0], ['b', 0.1]]
    """
    hyper = [c for c in summary.columns if c.startswith("hp.")] if hyper is None else list(hyper)
    missing = [c for c in [*by, score, *hyper] if c not in summary.columns]
    if missing:
        raise KeyError(f"select_best: summary has no column(s) {missing}; "
                       f"columns: {list(summary.columns)}")
    df = summary.copy()
    scores = pd.to_numeric(df[score], errors="coerce")
    bad = ~scores.apply(math.isfinite)
    if "diverged" in df:
        bad |= df["diverged"].astype(bool)
    df["_score"] = scores.where(~bad, math.inf)
    group = [*by, *[h for h in hyper if h not in by]]
    keyed = df.copy()
    for h in group:  # NaN keys (a hyperparameter another method does not have) -> "-"
        keyed[h] = keyed[h].astype(object).where(keyed[h].notna(), "-")
    means = (keyed.groupby(group, dropna=False, sort=False)["_score"].mean()
             .rename("mean_score").reset_index())
    best = means.sort_values("mean_score", kind="stable").groupby(list(by)).head(1)
    out = keyed.merge(best, on=group).drop(columns="_score")
    return out.sort_values(list(by), kind="stable").reset_index(drop=True)
