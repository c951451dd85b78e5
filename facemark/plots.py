"""Figures with matplotlib (Agg, no display): the CED curve of `facemark evaluate --plot` and the latency chart
of `facemark bench`. matplotlib comes with the train extra; a runtime-only install gets a clear error."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from facemark.errors import FacemarkError
from facemark.fileio import write_with_atomic
from facemark.metrics import DEFAULT_THRESHOLD, ced, summarize


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FacemarkError("plots need matplotlib: pip install 'facemark[train]' (or matplotlib)") from None
    return plt


def _save(figure, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    write_with_atomic(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def plot_ced(curves: Mapping[str, np.ndarray], path: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD
             ) -> None:
    """CED curves (share of faces with NME <= x) of labelled error arrays, with NME, AUC and FR in the legend."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for label, errors in curves.items():
        xs, ys = ced(np.asarray(errors), threshold, steps=400)
        s = summarize(np.asarray(errors), threshold)
        axes.plot(xs, ys, linewidth=2, label=f"{label}: NME {100 * s['nme']:.2f} %, "
                                              f"AUC@{threshold:g} {s[f'auc@{threshold:g}']:.3f}, "
                                              f"FR@{threshold:g} {100 * s[f'fr@{threshold:g}']:.1f} %")
    axes.set_xlim(0, threshold)
    axes.set_ylim(0, 1)
    axes.set_xlabel("NME (normalised by the outer-eye-corner distance)")
    axes.set_ylabel("share of faces")
    axes.set_title("Cumulative error distribution")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    _save(figure, path)


def plot_latency(bars: Sequence[tuple[str, float, float | None, str]], path: str | os.PathLike,
                 title: str = "Latency per face") -> None:
    """Horizontal bars (label, median ms, p90 ms, kind): median as the bar, p90 as an error whisker."""
    plt = _pyplot()
    colors = {"torch": "#787878", "ort": "#1f77b4", "dlib": "#d62728"}
    figure, axes = plt.subplots(figsize=(8, 0.45 * max(len(bars), 1) + 1.2))
    labels = [b[0] for b in bars]
    medians = [b[1] if b[1] is not None and math.isfinite(b[1]) else 0.0 for b in bars]
    whiskers = [max(0.0, (b[2] or m) - m) if b[2] is not None and math.isfinite(b[2]) else 0.0
                for b, m in zip(bars, medians, strict=True)]
    y = np.arange(len(bars))
    axes.barh(y, medians, xerr=[np.zeros(len(bars)), whiskers], capsize=3,
              color=[colors.get(b[3], "#1f77b4") for b in bars])
    for yi, median in zip(y, medians, strict=True):
        axes.text(median, yi, f" {median:.2f}", va="center", fontsize=8)
    axes.set_yticks(y, labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("ms per face (median; whisker to p90), lower is better")
    axes.set_title(title)
    axes.grid(True, axis="x", alpha=0.3)
    _save(figure, path)
