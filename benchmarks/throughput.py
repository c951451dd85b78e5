"""Folder throughput: images per second of `runtime predict`'s runner, one-by-one against pipelined, in one run.

    python -m facemark.benchmarks.throughput --model M.onnx [--data ../shared/data/300w] [--rounds 2]

Three configurations over the same files, in alternating rounds (fair against drifting machine load):
- "previous": the runner before pipelining -- one image after another (workers 1), the detector knobs of then
  (PREVIOUS_DETECTOR: step 1.1, 1 neighbour, no copy sizing), ONNX Runtime's own thread defaults (spinning);
- "one-by-one": today's default settings, workers 1;
- "pipelined": today's defaults (workers = one per core).
The landmarks of "pipelined" are compared with "one-by-one" (same settings): the largest difference in
pixels is reported. Files: the validation photos of --data (the deterministic split), else the bundled
samples repeated. Torch-free.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import typer

from facemark.benchmarks.pipeline import SAMPLES
from facemark.data import FaceRecord, load_records, split_records
from facemark.runtime.detector import HaarDetector
from facemark.runtime.evaluation import with_settings
from facemark.runtime.landmarker import FaceLandmarker, default_workers
from facemark.runtime.predict.inputs import ImageResult
from facemark.runtime.predict.runner import predict_files


def benchmark_files(val_records: Sequence[FaceRecord], limit: int = 200) -> list[Path]:
    """The photos of the validation faces (each once, at most `limit`), else the bundled samples repeated."""
    if val_records:
        return sorted({Path(r.image_path) for r in val_records})[:limit]
    return sorted(SAMPLES.glob("*.jpg")) * 7


# (val_fraction, split seed): training's defaults, so the bench scores the faces training held out.
VALIDATION_SPLIT = (0.1, 0)


def validation_records(data: Sequence[Path]) -> list[FaceRecord]:
    """The deterministic validation split (VALIDATION_SPLIT) of `data`."""
    return split_records(load_records(list(data), lambda _m: None), *VALIDATION_SPLIT)[1] if data else []


# The detector knobs of the runner before the throughput work (a presence model's defaults then): step 1.1,
# faces need 2 hits, the whole image searched up to max_side (no copy sized by the smallest face).
PREVIOUS_DETECTOR = {"scale_factor": 1.1, "min_neighbors": 1, "min_face_windows": None}


def previous_detector(current: HaarDetector) -> HaarDetector:
    """The same cascade, --min-face and max_side with the previous runner's knobs (PREVIOUS_DETECTOR)."""
    options = {k: v for k, v in current.config().items() if k != "name"}
    return HaarDetector(**{**options, **PREVIOUS_DETECTOR}, cascade=current.cascade_path)


def previous_landmarker(model: Path | None, provider: str, current: FaceLandmarker) -> FaceLandmarker:
    """The runner's landmarker before this change: ONNX Runtime's own thread defaults (spinning), the previous
    detector."""
    return with_settings(FaceLandmarker(model, device=provider, spin=True),
                         detector=previous_detector(current.detector))


def max_landmark_difference(a: Sequence[ImageResult], b: Sequence[ImageResult]) -> float:
    """Largest landmark difference (px) between two runs over the same files; inf if the faces differ."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if len(x.faces) != len(y.faces):
            return float("inf")
        for fx, fy in zip(x.faces, y.faces, strict=True):
            worst = max(worst, float(np.abs(fx.landmarks - fy.landmarks).max()))
    return worst


def folder_throughput(model: Path | None, files: Sequence[Path], rounds: int = 2, provider: str = "cpu"
                      ) -> dict:
    """Images/s of the three configurations (module docstring), best round of each, and the identity check."""
    current = FaceLandmarker(model, device=provider)
    previous = previous_landmarker(model, provider, current)
    configs = {"previous": (previous, 1), "one-by-one": (current, 1), "pipelined": (current, default_workers())}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    outputs: dict[str, list[ImageResult]] = {}
    predict_files(current, files[:4], workers=1)  # warm-up: sessions, cascades, page cache
    for _ in range(rounds):
        for name, (landmarker, workers) in configs.items():
            t0 = time.perf_counter()
            outputs[name] = predict_files(landmarker, files, workers=workers)
            seconds[name].append(time.perf_counter() - t0)
    rows = []
    for name, (_landmarker, workers) in configs.items():
        best = min(seconds[name])
        rows.append({"config": name, "workers": workers, "images": len(files), "seconds": best,
                     "images_per_s": len(files) / best,
                     "faces": sum(len(r.faces) for r in outputs[name]),
                     "errors": sum(1 for r in outputs[name] if r.error)})
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_previous"] = row["images_per_s"] / base
    return {"rows": rows, "rounds": rounds, "cores_used_by_pipeline": default_workers(),
            "max_landmark_diff_px": max_landmark_difference(outputs["one-by-one"], outputs["pipelined"]),
            "detector": current.detector.config(), "previous_detector": previous.detector.config()}


def main(model: Path | None = typer.Option(None, "--model"), data: list[Path] = typer.Option([], "--data"),
         rounds: int = typer.Option(2, "--rounds"), limit: int = typer.Option(200, "--limit"),
         json_path: Path | None = typer.Option(None, "--json")) -> None:
    print_json(folder_throughput(model, benchmark_files(validation_records(data), limit), rounds), json_path)


def print_json(result: dict, json_path: Path | None) -> None:
    """A bench module's result on stdout and, with --json, in that file."""
    text = json.dumps(result, indent=1)
    print(text)
    if json_path:
        json_path.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    typer.run(main)
