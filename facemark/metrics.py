"""The field's metrics: NME by the outer-eye-corner distance, failure rate and AUC at a threshold, CED."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw

from facemark.fileio import write_with_atomic
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


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_ced(curves: Mapping[str, np.ndarray], path: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD) -> None:
    """Draw the CED curves of labelled error arrays to a PNG (Pillow only: no plotting stack needed)."""
    w, h, left, bottom, top, right = 640, 440, 60, 50, 20, 20
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pw, ph = w - left - right, h - top - bottom

    def to_px(x: float, y: float) -> tuple[float, float]:
        return left + x / threshold * pw, top + (1 - y) * ph

    for i in range(5):  # grid and ticks
        gx, gy = threshold * i / 4, i / 4
        d.line([to_px(gx, 0), to_px(gx, 1)], fill=(225, 225, 225))
        d.line([to_px(0, gy), to_px(threshold, gy)], fill=(225, 225, 225))
        d.text((to_px(gx, 0)[0] - 12, h - bottom + 6), f"{gx:.2f}", fill="black")
        d.text((8, to_px(0, gy)[1] - 6), f"{gy:.2f}", fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((left + pw / 2 - 60, h - 22), "NME (inter-ocular)", fill="black")
    for k, (label, errors) in enumerate(curves.items()):
        xs, ys = ced(errors, threshold, steps=200)
        color = _COLORS[k % len(_COLORS)]
        d.line([to_px(x, y) for x, y in zip(xs, ys, strict=True)], fill=color, width=2)
        s = summarize(errors, threshold)
        d.text((left + 10, top + 8 + 14 * k), f"{label}: NME {100 * s['nme']:.2f}%, AUC {s[f'auc@{threshold:g}']:.3f}",
               fill=color)
    write_with_atomic(path, lambda tmp: img.save(tmp, format="PNG"))
