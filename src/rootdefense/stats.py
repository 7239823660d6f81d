"""Statistics shared by probe training, probe evaluation, the harm judge and the
evaluation summary: rates, their intervals, AUROC and thresholds at a false-positive rate."""

from __future__ import annotations

import math

import numpy as np


def rate(s: np.ndarray, t: float) -> float | None:
    """Share of scores ``s`` flagged at threshold ``t`` (flag: s >= t); None without scores."""
    s = np.asarray(s)
    return float((s >= t).mean()) if len(s) else None


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a rate k/n."""
    if n == 0:
        return None
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [round(max(0.0, mid - half), 4), round(min(1.0, mid + half), 4)]


def auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    """Area under the ROC curve of scores ``s`` for labels ``y``; None with one class only."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(set(y.tolist())) < 2:
        return None
    return float(roc_auc_score(y, s))


def threshold_at_fpr(benign_scores: np.ndarray, fpr: float) -> float:
    """Lowest threshold flagging at most ``fpr`` of these benign scores (flag: s >= t)."""
    s = np.sort(np.asarray(benign_scores, dtype=np.float64))
    k = int(np.floor(fpr * len(s)))  # how many benign scores may be flagged
    return float(np.nextafter(s[len(s) - k - 1], np.inf))
