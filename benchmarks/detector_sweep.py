"""Detector configurations: recall on validation faces against false faces on face-free background, and time.

    python -m facemark.benchmarks.detector_sweep --data ../shared/data/300w [--model M.onnx] [--json out.json]
    python -m facemark.benchmarks.detector_sweep --data ../shared/data/300w --model M.onnx \
        --grid --scales 1.1,1.2 --windows none,1.5,2 [--neighbors 1] [--pyramids opencv,octaves] \
        [--min-faces 0.08,0.12]

Without --model: the Haar cascade alone (recall = a detection with IoU >= 0.3 to the landmark box; every box
on a face-free background strip of the same photos is a false face). With --model: the whole pipeline per
configuration (facemark.runtime.evaluation: presence score, refinement, NME), at several presence thresholds.
Only validation faces are used (the deterministic split), the split the defaults are tuned on.

Every row also gives the cascade's recall of small faces (--small-faces, on by default): each validation face
shrunk to 8, 10, 13 and 18 % of a 640x480 frame's height on a face-free background, which the split itself
lacks (its faces fill their crops).

--grid: the cascade of the model's defaults (alt2) at every scale step x detection-copy size
(HaarDetector.min_face_windows; "none" = the full image up to max_side), each row also timed on the
composed 640x480 and 1920x1080 one-face scenes of facemark.benchmarks.pipeline (Haar alone and the whole
pipeline, median ms; the pipeline's CPU ms summed over threads too) -- the speed/recall trade-off behind the
detector defaults. --min-faces adds the smallest face searched (HaarDetector.min_face_fraction) to the grid.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from facemark.contract import box_from_landmarks
from facemark.data import load_records, other_faces, split_records
from facemark.imageio import read_gray, read_image
from facemark.runtime.calibration import match_detection
from facemark.runtime.defaults import DEFAULT_MIN_SCORE, DEFAULT_REFINE
from facemark.runtime.detector import DEFAULT_MIN_FACE_FRACTION, HaarDetector
from facemark.runtime.detectors import FaceDetector
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
THRESHOLDS = (0.0, 0.3, 0.5, 0.7, 0.9, DEFAULT_MIN_SCORE)  # the last: the runtime's default


def detector_only(records, detector: FaceDetector) -> dict:
    found, false, crops, ms = 0, 0, 0, []
    for record, others in zip(records, other_faces(records), strict=True):
        image = read_image(record.image_path) if detector.color else read_gray(record.image_path)
        target = box_from_landmarks(record.landmarks)
        t0 = time.perf_counter()
        detections = detector.detect(image)
        ms.append((time.perf_counter() - t0) * 1e3)
        found += match_detection(detections, target) is not None
        h, w = image.shape[:2]
        for x, y, bw, bh in background_boxes(w, h, [target, *others]):
            crops += 1
            false += len(detector.detect(np.ascontiguousarray(image[y:y + bh, x:x + bw])))
    return {"detection_rate": found / len(records), "false_faces": false, "background_crops": crops,
            "false_faces_per_crop": false / max(crops, 1), "detect_ms_median": float(np.median(ms))}


SPEED_SCENES = ((640, 480, 1), (1920, 1080, 1))
# Validation faces fill their crops, so the split alone never tests a face near --min-face (0.08 of the
# shorter side): each face is also shrunk to these fractions of a 640x480 frame (shrunk_face_scenes).
SMALL_FACE_FRACTIONS = (0.08, 0.10, 0.13, 0.18)
SMALL_FACE_FRAME = (640, 480)


def shrunk_face_scenes(records, fraction: float, frame: tuple[int, int] = SMALL_FACE_FRAME, seed: int = 0,
                       color: bool = False) -> list[tuple[np.ndarray, tuple[float, float, float, float]]]:
    """(grayscale frame, landmark box) per record: its face with one face side of its photo around it, shrunk
    until the landmark box's longer side is `fraction` of the frame's shorter side, pasted at a random spot
    (fixed by `seed`) on the blurred background of facemark.benchmarks.pipeline. color: BGR frames (for
    detectors that use colour)."""
    import cv2

    from facemark.benchmarks.pipeline import background_canvas

    width, height = frame
    canvas = background_canvas(width, height)
    if not color:
        canvas = cv2.cvtColor(canvas, cv2.COLOR_BGR2GRAY)
    rng = np.random.default_rng(seed)
    scenes = []
    for record in records:
        gray = read_image(record.image_path) if color else read_gray(record.image_path)
        x, y, w, h = box_from_landmarks(record.landmarks)
        side = max(w, h)
        scale = fraction * min(width, height) / side
        cx, cy = x + w / 2, y + h / 2
        x0, y0 = int(max(0, cx - side)), int(max(0, cy - side))
        x1, y1 = int(min(gray.shape[1], cx + side)), int(min(gray.shape[0], cy + side))
        size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
        tile = cv2.resize(gray[y0:y1, x0:x1], size, interpolation=cv2.INTER_AREA)
        px, py = int(rng.integers(0, width - size[0] + 1)), int(rng.integers(0, height - size[1] + 1))
        scene = canvas.copy()
        scene[py:py + size[1], px:px + size[0]] = tile
        # the tile's scale per axis, as resize rounded it
        sx, sy = size[0] / (x1 - x0), size[1] / (y1 - y0)
        scenes.append((scene, (px + (x - x0) * sx, py + (y - y0) * sy, w * sx, h * sy)))
    return scenes


def small_face_recall(detector: FaceDetector, scenes_by_fraction: dict) -> dict:
    """Share of the shrunk faces the detector finds (IoU >= 0.3 with the landmark box), per fraction."""
    return {str(fraction): sum(match_detection(detector.detect(scene), box) is not None for scene, box in scenes)
            / len(scenes) for fraction, scenes in scenes_by_fraction.items()}


def time_scenes(detector: HaarDetector, landmarker, repeats: int, folder: Path) -> dict:
    """Median ms of Haar alone and of the whole pipeline (decode excluded) on the composed scenes."""
    from facemark.benchmarks.pipeline import compose_scene
    from facemark.imageio import read_image
    from facemark.runtime.evaluation import with_settings

    timed = with_settings(landmarker, detector=detector) if landmarker is not None else None
    row = {}
    for width, height, faces in SPEED_SCENES:
        scene = compose_scene(width, height, faces, folder)
        image = read_image(scene.path)
        gray = read_gray(scene.path)
        haar, whole, cpu, found = [], [], [], 0
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            detector.detect(gray)
            t1, c1 = time.perf_counter(), time.process_time()
            if timed is not None:
                found = len(timed.detect(image))
            t2, c2 = time.perf_counter(), time.process_time()
            if i:  # the first run warms up
                haar.append((t1 - t0) * 1e3)
                whole.append((t2 - t1) * 1e3)
                cpu.append((c2 - c1) * 1e3)
        row[f"haar_ms_{width}x{height}"] = float(np.median(haar))
        if timed is not None:
            row[f"pipeline_ms_{width}x{height}"] = float(np.median(whole))
            row[f"pipeline_cpu_ms_{width}x{height}"] = float(np.median(cpu))  # summed over threads
            row[f"faces_found_{width}x{height}"] = found
    return row


def grid(scales: str, windows: str, neighbors: int, cascade: str, pyramids: str = "opencv",
         min_faces: str = str(DEFAULT_MIN_FACE_FRACTION)) -> list[dict]:
    """Detector settings for --grid: every smallest face searched x scale step x copy size x pyramid (opencv:
    one detectMultiScale call; octaves: HaarDetector(octaves=True))."""
    unknown = {p.strip() for p in pyramids.split(",")} - {"opencv", "octaves"}
    if unknown:
        raise typer.BadParameter(f"--pyramids: {', '.join(sorted(unknown))}? choose opencv and/or octaves")
    return [{"cascade": cascade, "scale_factor": float(s), "min_neighbors": neighbors,
             "min_face_windows": None if w.strip().lower() == "none" else float(w),
             "octaves": p.strip() == "octaves", "min_face_fraction": float(m)}
            for m in min_faces.split(",") for s in scales.split(",") for w in windows.split(",")
            for p in pyramids.split(",")]


def main(data: list[Path] = typer.Option(..., "--data"), model: Path | None = typer.Option(None, "--model"),
         refine: int = typer.Option(DEFAULT_REFINE, "--refine"), json_path: Path | None = typer.Option(None, "--json"),
         configs: str = typer.Option("", "--configs", help="Comma-separated indices into CONFIGS (default all)."),
         use_grid: bool = typer.Option(False, "--grid", help="Scale steps x copy sizes, timed on scenes."),
         scales: str = typer.Option("1.1,1.15,1.2", "--scales"),
         windows: str = typer.Option("none,1.25,1.5,2", "--windows"),
         neighbors: int = typer.Option(1, "--neighbors"),
         pyramids: str = typer.Option("opencv", "--pyramids", help="opencv,octaves (--grid)."),
         min_faces: str = typer.Option(str(DEFAULT_MIN_FACE_FRACTION), "--min-faces",
                                       help="Smallest faces searched, fractions of the shorter side (--grid)."),
         repeats: int = typer.Option(15, "--repeats", help="Timed runs per scene (--grid)."),
         small_faces: bool = typer.Option(True, "--small-faces/--no-small-faces",
                                          help="Also the cascade's recall of validation faces shrunk to "
                                               f"{', '.join(map(str, SMALL_FACE_FRACTIONS))} of a 640x480 frame."),
         ) -> None:
    train, val = split_records(load_records(data, lambda _m: None), 0.1, 0)
    shrunk = {f: shrunk_face_scenes(val, f) for f in SMALL_FACE_FRACTIONS} if small_faces else {}
    if use_grid:
        chosen = grid(scales, windows, neighbors, "haarcascade_frontalface_alt2.xml", pyramids, min_faces)
    else:
        chosen = [{"cascade": c, "scale_factor": s, "min_neighbors": n}
                  for c, s, n in ([CONFIGS[int(i)] for i in configs.split(",")] if configs else CONFIGS)]
    rows = []
    landmarker = None
    if model is not None:
        from facemark.runtime.evaluation import evaluate_pipeline, with_settings
        from facemark.runtime.landmarker import FaceLandmarker

        landmarker = FaceLandmarker(model, device="cpu", refine=refine)
    scenes = Path(tempfile.mkdtemp(prefix="facemark-sweep-"))
    for options in chosen:
        detector = HaarDetector(**options)
        row = dict(options)
        if use_grid:
            row.update(time_scenes(detector, landmarker, repeats, scenes))
        if shrunk:
            row["small_face_recall"] = small_face_recall(detector, shrunk)
        if landmarker is None:
            row.update(detector_only(val, detector))
        else:
            calibration = landmarker.calibration
            if calibration.detector != detector.name:  # boxes of another cascade: its own calibration
                from facemark.data import spread
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
