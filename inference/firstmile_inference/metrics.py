"""Classification figures in plain numpy: rank-based ROC AUC and a threshold for a target precision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties get average ranks).

    ``nan`` when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length ({s.size} vs {y.size})")
    positives = int(y.sum())
    negatives = int(y.size - positives)
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks over runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s.size]))
    average = (starts + ends + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(average, ends - starts)
    u = ranks[y].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


@dataclass(frozen=True)
class Operating:
    """A decision threshold and its precision and recall on the data it was chosen on."""

    threshold: float
    precision: float
    recall: float
    met: bool  # whether the target precision was reached


def precision_recall(predicted: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Precision and recall of boolean predictions (precision 0 when nothing is predicted)."""
    p = np.asarray(predicted, dtype=bool).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    tp = float(np.sum(p & y))
    precision = tp / float(p.sum()) if p.any() else 0.0
    recall = tp / float(y.sum()) if y.any() else 0.0
    return precision, recall


def threshold_for_precision(scores: ArrayLike, labels: ArrayLike, target: float) -> Operating:
    """The lowest threshold whose precision is at least ``target`` (the highest recall at that precision).

    ``score >= threshold`` predicts positive. When no threshold reaches the target, the one with the
    best precision among those predicting at least 1% of the rows is returned with ``met=False``.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.size == 0 or not y.any():
        return Operating(1.0, 0.0, 0.0, False)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    flagged = np.arange(1, s.size + 1)
    # only cut between distinct scores: the last index of each run of equal scores
    last = np.concatenate((np.flatnonzero(np.diff(s_sorted) != 0), [s.size - 1]))
    precision = tp[last] / flagged[last]
    recall = tp[last] / float(y.sum())
    ok = np.flatnonzero(precision >= target)
    if ok.size:
        best = ok[np.argmax(recall[ok])]
        return Operating(float(s_sorted[last[best]]), float(precision[best]), float(recall[best]), True)
    enough = np.flatnonzero(flagged[last] >= max(1, int(0.01 * s.size)))
    candidates = enough if enough.size else np.arange(last.size)
    best = candidates[np.argmax(precision[candidates])]
    return Operating(float(s_sorted[last[best]]), float(precision[best]), float(recall[best]), False)


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")
