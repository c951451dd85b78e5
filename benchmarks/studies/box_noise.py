"""How calibrated Haar boxes deviate from landmark boxes: the numbers behind training's detector-box jitter.

    python -m facemark.benchmarks.studies.box_noise --data ../shared/data/300w [--faces 600]

Runs the default Haar detector on training-split faces, fits the box calibration on them (as `export` does),
and reports the residuals of the calibrated boxes against the landmark boxes in the crop's own units:
centre error / side and log(side ratio), where side = max(w, h) is what sets the crop (CropContract). Training
samples its box jitter from these (facemark.train.dataset.AugmentConfig.det_*).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from facemark.contract import BoxCalibration, box_from_landmarks
from facemark.data import load_records, split_records, spread
from facemark.runtime.calibration import detect_records
from facemark.runtime.detector import HaarDetector


def box_residuals(detected: list, target: list, calibration: BoxCalibration) -> np.ndarray:
    """(n, 3): centre x / side, centre y / side, log(side ratio) of calibrated detector boxes vs targets."""
    rows = []
    for d, t in zip(detected, target, strict=True):
        x, y, w, h = calibration.apply(d)
        tx, ty, tw, th = t
        side, tside = max(w, h), max(tw, th)
        rows.append(((x + w / 2 - tx - tw / 2) / tside, (y + h / 2 - ty - th / 2) / tside, np.log(side / tside)))
    return np.asarray(rows)


def main(data: list[Path] = typer.Option(..., "--data"), faces: int = typer.Option(600, "--faces"),
         seed: int = typer.Option(0, "--seed")) -> None:
    records = load_records(data, lambda _m: None)
    train, _ = split_records(records, 0.1, seed)
    pairs = [(r, d) for r, d in detect_records(spread(train, faces), HaarDetector()) if d is not None]
    detected = [d.box for _, d in pairs]
    target = [box_from_landmarks(r.landmarks) for r, _ in pairs]
    calibration = BoxCalibration.fit(detected, target, "haar")
    res = box_residuals(detected, target, calibration)
    # Robust spread: 1.4826 * MAD estimates a normal's sigma without the few gross misfits.
    mad = 1.4826 * np.median(np.abs(res - np.median(res, axis=0)), axis=0)
    report = {"faces": faces, "matched": len(pairs), "median": np.median(res, axis=0).round(4).tolist(),
              "std": res.std(axis=0).round(4).tolist(), "robust_sigma": mad.round(4).tolist(),
              "p95_abs": np.percentile(np.abs(res), 95, axis=0).round(4).tolist(),
              "columns": ["centre_x/side", "centre_y/side", "log_side_ratio"]}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    typer.run(main)
