"""Detector rows of `facemark bench --model`: Haar against every fetched CNN detector, in one run.

    python -m facemark.benchmarks.detector_bench --model facemark/assets/facemark-68.onnx \
        --data ../shared/data/300w [--json out.json] [--quick] [--variant faceboxes:min_score=0.3 ...]

Per detector (runtime/detectors.py, its defaults): ms per 640x480 frame at 1 and 2 threads (the composed
one-face scene of facemark.benchmarks.pipeline; detectors alternate round by round, so a machine's drifting load
hits them alike); recall of validation faces shrunk to 8 / 12 / 21 % of the frame's shorter side
(detector_sweep.shrunk_face_scenes, in colour); recall and false boxes on the face-free strips of the validation
photos (detector_sweep.detector_only); end to end: the photo's fps at --refine 0 and 1 (alternating the same way)
and validation NME / detection rate through the whole pipeline (facemark.runtime.evaluation). A CNN detector
that is not fetched is skipped with the reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import typer

from facemark.benchmarks import pipeline as pipeline_mod
from facemark.benchmarks.detector_sweep import detector_only, shrunk_face_scenes, small_face_recall
from facemark.errors import ModelError
from facemark.imageio import read_image, to_gray
from facemark.runtime.defaults import DEFAULT_REFINE
from facemark.runtime.detectors import CNN_DETECTORS, HAAR, calibration_for, create_detector
from facemark.runtime.evaluation import evaluate_pipeline, with_settings
from facemark.runtime.landmarker import IDENTITY, FaceLandmarker

FRACTIONS = (0.08, 0.12, 0.21)
THREADS = (1, 2)
# Photo fps at one and two landmark passes (and the default's); NME at the runtime's default passes.
REFINES = tuple(sorted({0, 1, DEFAULT_REFINE}))
VARIANT_KEYS = ("input_side", "min_score")  # the CnnDetector settings a --variant may change


def parse_variant(text: str) -> tuple[str, dict]:
    """"faceboxes:min_score=0.3,input_side=640" -> ("faceboxes", {"min_score": 0.3, "input_side": 640.0})."""
    name, _, settings = text.partition(":")
    try:
        pairs = (item.split("=") for item in settings.split(",") if item)
        options = {key.strip(): float(value) for key, value in pairs}
    except ValueError:
        raise typer.BadParameter(f"--variant {text!r}: expected NAME:key=number,... such as faceboxes:min_score=0.3"
                                 ) from None
    if name not in CNN_DETECTORS:
        raise typer.BadParameter(f"--variant {text!r}: {name!r} is not a CNN detector ({', '.join(CNN_DETECTORS)})")
    unknown = set(options) - set(VARIANT_KEYS)
    if unknown:
        raise typer.BadParameter(f"--variant {text!r}: {', '.join(sorted(unknown))}? settings: "
                                 f"{', '.join(VARIANT_KEYS)}")
    return name, options


def _detectors(has_presence: bool, threads: int, notes: list[str], variants: Sequence[str] = ()) -> dict:
    """Haar, every CNN detector that loads and each `variants` entry (a CNN detector with other settings), at
    `threads` (Haar: OpenCV's thread count, set when timed)."""
    found = {HAAR: create_detector(HAAR, has_presence)}
    for label in [*CNN_DETECTORS, *variants]:
        name, options = parse_variant(label)
        try:
            found[label] = create_detector(name, has_presence, options, provider="cpu", threads=threads)
        except ModelError as exc:
            if threads == THREADS[0]:
                notes.append(f"detector {label} skipped: {exc}")
    return found


def _alternating_medians(runs: dict, rounds: int, block: int) -> dict:
    """(median wall ms, median CPU ms summed over threads) per call of each runner, `block` calls per runner per
    round, runners alternating. CPU time moves less than wall time when other work shares the machine."""
    samples: dict = {key: ([], []) for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            run()  # warm: caches, thread pool
            for _ in range(block):
                t0, c0 = time.perf_counter(), time.process_time()
                run()
                samples[key][0].append((time.perf_counter() - t0) * 1e3)
                samples[key][1].append((time.process_time() - c0) * 1e3)
    return {key: (float(np.median(wall)), float(np.median(cpu))) for key, (wall, cpu) in samples.items()}


def _with_threads(threads: int, run: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        previous = cv2.getNumThreads()
        cv2.setNumThreads(threads)  # Haar's parallel scan; a CNN detector has its own session threads
        try:
            run()
        finally:
            cv2.setNumThreads(previous)

    return call


def detector_rows(model: Path, val: Sequence, scenes_dir: Path, quick: bool = False,
                  progress: Callable[[str], None] = lambda _m: None, variants: Sequence[str] = ()
                  ) -> tuple[list[dict], list[str]]:
    """The rows (one per detector, then one per variant such as "faceboxes:min_score=0.3") and notes; see the
    module docstring."""
    notes: list[str] = []
    rounds, block = (2, 3) if quick else (5, 10)
    scene = pipeline_mod.compose_scene(640, 480, 1, scenes_dir)
    image = read_image(scene.path)
    gray = to_gray(image)
    base = FaceLandmarker(model, device="cpu")
    by_threads = {t: _detectors(base.model.has_face_score, t, notes, variants) for t in THREADS}
    names = list(by_threads[THREADS[0]])
    rows = {name: {"detector": name} for name in names}
    progress("detector speed")
    for threads, detectors in by_threads.items():
        runs = {n: _with_threads(threads, lambda d=d: d.detect(image if d.color else gray))
                for n, d in detectors.items()}
        for name, (ms, cpu_ms) in _alternating_medians(runs, rounds, block).items():
            rows[name].update({f"ms_{threads}t": ms, f"cpu_ms_{threads}t": cpu_ms})
    progress("end to end")
    pipelines = {}
    for name, detector in by_threads[max(THREADS)].items():
        calibration = calibration_for(detector, base.model.info.calibration) or IDENTITY
        for refine in REFINES:
            pipelines[(name, refine)] = with_settings(base, detector=detector, calibration=calibration, refine=refine)
    runs = {key: lambda lm=lm: lm.landmarks_for_found([lm.find(read_image(scene.path))]) for key, lm in
            pipelines.items()}
    for (name, refine), (ms, cpu_ms) in _alternating_medians(runs, rounds, block).items():
        rows[name].update({f"fps_refine{refine}": 1000.0 / ms, f"cpu_ms_refine{refine}": cpu_ms})
    if val:
        records = val[::8] if quick else val  # quick: a harness check, 26 of the 205 faces
        shrunk = {f: shrunk_face_scenes(records, f, color=True) for f in FRACTIONS}
        for name in names:
            progress(f"recall: {name}")
            detector = by_threads[max(THREADS)][name]
            rows[name]["small_face_recall"] = small_face_recall(detector, shrunk)
            only = detector_only(records, detector)
            rows[name].update(recall=only["detection_rate"], false_boxes_per_crop=only["false_faces_per_crop"])
            summary = evaluate_pipeline(pipelines[(name, DEFAULT_REFINE)], records).summary(base.min_score)
            rows[name].update(nme=summary["nme"], nme_refine=DEFAULT_REFINE, detection_rate=summary["detection_rate"],
                              false_faces=summary["false_faces"], faces=summary["annotated_faces"])
    for name, detector in by_threads[THREADS[0]].items():
        rows[name]["config"] = detector.config()
    return list(rows.values()), notes


def main(model: Path = typer.Option(..., "--model"), data: list[Path] = typer.Option([], "--data"),
         json_path: Path | None = typer.Option(None, "--json"), quick: bool = typer.Option(False, "--quick"),
         variants: list[str] = typer.Option([], "--variant", help="Also a CNN detector with other settings, e.g. "
                                            "faceboxes:min_score=0.3,input_side=640; repeatable.")) -> None:
    import tempfile

    from facemark.benchmarks.throughput import validation_records

    for variant in variants:
        parse_variant(variant)  # refused before any work
    rows, notes = detector_rows(model, validation_records(data), Path(tempfile.mkdtemp(prefix="facemark-det-")),
                                quick, progress=lambda m: print(m, flush=True), variants=variants)
    text = json.dumps({"rows": rows, "notes": notes}, indent=1)
    print(text)
    if json_path:
        from facemark.fileio import write_text_atomic

        write_text_atomic(json_path, text + "\n")


if __name__ == "__main__":
    typer.run(main)
