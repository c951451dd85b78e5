"""The field's metrics: NME by the outer-eye-corner distance, failure rate and AUC at a threshold, CED."""

from __future__ import annotations

import numpy as np

from facemark.scheme import interocular_distance

DEFAULT_THRESHOLD = 0.08


def nme_per_face(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Mean point-to-point error of each face divided by its inter-ocular (outer corners) distance."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 68, 2)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 68, 2)
    per_point = np.linalg.norm(pred - gt, axis=-1).mean(axis=-1)
    return per_point / np.maximum(interocular_distance(gt), 1e-6)


def ced(errors: np.ndarray, threshold: float = DEFAULT_THRESHOLD, steps: int = 1000):
    """Cumulative error distribution on [0, threshold]: (x, share of faces with error <= x)."""
    xs = np.linspace(0.0, threshold, steps + 1)
    e = np.sort(np.asarray(errors, dtype=np.float64))
    ys = np.searchsorted(e, xs, side="right") / max(len(e), 1)
    return xs, ys


def summarize(errors: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """NME mean/median (fractions), failure rate and AUC (area under CED up to threshold, normalised)."""
    e = np.asarray(errors, dtype=np.float64)
    if len(e) == 0:
        return {"faces": 0, "nme": float("nan"), "nme_median": float("nan"),
                f"fr@{threshold:g}": float("nan"), f"auc@{threshold:g}": float("nan")}
    xs, ys = ced(e, threshold)
    auc = float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs)) / threshold)
    return {
        "faces": int(len(e)),
        "nme": float(e.mean()),
        "nme_median": float(np.median(e)),
        f"fr@{threshold:g}": float((e > threshold).mean()),
        f"auc@{threshold:g}": auc,
    }


def roc_auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > that of a random negative), ties count half."""
    pos = np.asarray(positive_scores, dtype=np.float64).ravel()
    neg = np.asarray(negative_scores, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = _average_ranks(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank (Mann-Whitney U)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks
