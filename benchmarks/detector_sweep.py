"""Detector configurations: recall on validation faces against false faces on face-free background, and time.

    python -m facemark.benchmarks.detector_sweep --data ../shared/data/300w [--model M.onnx] [--json out.json]

Without --model: the Haar cascade alone (recall = a detection with IoU >= 0.3 to the landmark box; every box
on a face-free background strip of the same photos is a false face). With --model: the whole pipeline per
configuration (facemark.runtime.evaluation: presence score, refinement, NME), at several presence thresholds.
Only validation faces are used (the deterministic split), the split the defaults are tuned on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer

from facemark.contract import box_from_landmarks
from facemark.data import load_records, other_faces, split_records
from facemark.imageio import read_gray
from facemark.runtime.calibration import match_detection
from facemark.runtime.detector import HaarDetector
from facemark.runtime.evaluation import background_boxes

# (cascade, scale factor, min neighbours): the shipped default first, then more permissive ones.
CONFIGS = (
    ("haarcascade_frontalface_alt2.xml", 1.1, 4),
    ("haarcascade_frontalface_alt2.xml", 1.1, 2),
    ("haarcascade_frontalface_alt2.xml", 1.1, 1),
    ("haarcascade_frontalface_alt2.xml", 1.05, 2),
    ("haarcascade_frontalface_alt2.xml", 1.05, 1),
    ("haarcascade_frontalface_default.xml", 1.1, 4),
    ("haarcascade_frontalface_default.xml", 1.1, 2),
    ("haarcascade_frontalface_alt.xml", 1.1, 2),
)
THRESHOLDS = (0.0, 0.3, 0.5, 0.7, 0.9)


def detector_only(records, detector: HaarDetector) -> dict:
    found, false, crops, ms = 0, 0, 0, []
    for record, others in zip(records, other_faces(records), strict=True):
        gray = read_gray(record.image_path)
        target = box_from_landmarks(record.landmarks)
        t0 = time.perf_counter()
        detections = detector.detect(gray)
        ms.append((time.perf_counter() - t0) * 1e3)
        found += match_detection(detections, target) is not None
        h, w = gray.shape
        for x, y, bw, bh in background_boxes(w, h, [target, *others]):
            crops += 1
            false += len(detector.detect(np.ascontiguousarray(gray[y:y + bh, x:x + bw])))
    return {"detection_rate": found / len(records), "false_faces": false, "background_crops": crops,
            "false_faces_per_crop": false / max(crops, 1), "detect_ms_median": float(np.median(ms))}


def main(data: list[Path] = typer.Option(..., "--data"), model: Path | None = typer.Option(None, "--model"),
         refine: int = typer.Option(1, "--refine"), json_path: Path | None = typer.Option(None, "--json"),
         configs: str = typer.Option("", "--configs", help="Comma-separated indices into CONFIGS (default all).")
         ) -> None:
    train, val = split_records(load_records(data, lambda _m: None), 0.1, 0)
    chosen = [CONFIGS[int(i)] for i in configs.split(",")] if configs else list(CONFIGS)
    rows = []
    landmarker = None
    if model is not None:
        from facemark.runtime.evaluation import evaluate_pipeline, with_settings
        from facemark.runtime.landmarker import FaceLandmarker

        landmarker = FaceLandmarker(model, provider="cpu", refine=refine)
    for cascade, scale, neighbors in chosen:
        detector = HaarDetector(scale_factor=scale, min_neighbors=neighbors, cascade=cascade)
        row = {"cascade": cascade, "scale_factor": scale, "min_neighbors": neighbors}
        if landmarker is None:
            row.update(detector_only(val, detector))
        else:
            calibration = landmarker.calibration
            if calibration.detector != detector.name:  # boxes of another cascade: its own calibration
                from facemark.export.exporter import spread
                from facemark.runtime.calibration import fit_calibration

                calibration = fit_calibration(spread(train, 300), detector)
            t0 = time.perf_counter()
            result = evaluate_pipeline(with_settings(landmarker, detector=detector, calibration=calibration), val)
            row["seconds"] = time.perf_counter() - t0
            row["at"] = {str(t): result.summary(t or None) for t in THRESHOLDS}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    typer.run(main)
