"""End-to-end rows: the whole runtime pipeline per image, broken down into its stages.

Test images are composed from real face photos (the package's sample photos with their landmarks): faces
are cut out with a margin, resized and placed on a blurred real photo, so OpenCV's Haar cascade finds real
faces and the background has real texture without faces of its own.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facemark.contract import Box, box_from_landmarks
from facemark.data import FaceRecord, load_records
from facemark.imageio import read_gray, read_image, write_image

SAMPLES = Path(__file__).resolve().parents[1] / "facemark" / "assets" / "samples"
SAMPLE_XML = SAMPLES / "landmarks.xml"
STAGES = ("decode", "detect", "landmarks")  # landmarks: crops + model + decode, every refinement pass


@dataclass(frozen=True)
class Scene:
    name: str  # e.g. "640x480-1face"
    path: Path
    width: int
    height: int
    faces_placed: int


def face_tile(record: FaceRecord, side: int, margin: float = 2.0) -> np.ndarray:
    """A square cut of `margin` x the landmark box around the face, resized to `side` pixels."""
    image = read_image(record.image_path)
    x, y, w, h = box_from_landmarks(record.landmarks)
    half = margin * max(w, h) / 2
    cx, cy = x + w / 2, y + h / 2
    s = side / (2 * half)
    matrix = np.array([[s, 0, -s * (cx - half)], [0, s, -s * (cy - half)]], dtype=np.float64)
    return cv2.warpAffine(image, matrix, (side, side), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)


def background_canvas(width: int, height: int) -> np.ndarray:
    """A real photo stretched to the canvas and blurred so it holds no detectable face."""
    photo = read_image(SAMPLES / "dogs.jpg")
    canvas = cv2.resize(photo, (width, height), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(canvas, (0, 0), sigmaX=max(width, height) / 80)


def largest_sample_faces(count: int) -> list[FaceRecord]:
    """The sample faces with the biggest landmark boxes (they upscale with the least blur)."""
    records = load_records([SAMPLE_XML], warn=lambda _msg: None)
    records.sort(key=lambda r: -max(box_from_landmarks(r.landmarks)[2:]))
    return records[:count]


def sample_face_pairs() -> list[tuple[np.ndarray, Box]]:
    """Every bundled sample face as (gray photo, landmark box), biggest first: what timed peers run on."""
    return [(read_gray(r.image_path), box_from_landmarks(r.landmarks)) for r in largest_sample_faces(10_000)]


def compose_scene(width: int, height: int, faces: int, out_dir: Path) -> Scene:
    """One JPEG of `faces` real faces on a blurred real background (one face: centred; several: a grid)."""
    canvas = background_canvas(width, height)
    records = largest_sample_faces(faces)
    if faces == 1:
        tile = int(height * 0.55)
        positions = [((width - tile) // 2, (height - tile) // 2)]
    else:
        cols = int(np.ceil(np.sqrt(faces)))
        rows = int(np.ceil(faces / cols))
        tile = int(min(height * 0.9 / rows, width * 0.9 / cols))
        x0, y0 = (width - cols * tile) // 2, (height - rows * tile) // 2
        positions = [(x0 + (i % cols) * tile, y0 + (i // cols) * tile) for i in range(faces)]
    for record, (px, py) in zip(records, positions, strict=False):
        canvas[py : py + tile, px : px + tile] = face_tile(record, tile)
    name = f"{width}x{height}-{faces}face{'s' if faces > 1 else ''}"
    path = out_dir / f"{name}.jpg"
    write_image(path, canvas, jpeg_quality=90)
    return Scene(name, path, width, height, min(faces, len(records)))


DEFAULT_SCENES = ((640, 480, 1), (640, 480, 4), (1920, 1080, 1), (1920, 1080, 4))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def time_pipeline(landmarker, scene: Scene, repeats: int, warmup: int = 1) -> dict:
    """Median ms per stage over `repeats` runs of decode + `landmarker.detect_full` on one scene (its two halves,
    `find` and `landmarks_for_found`, called here one after the other so that each is timed on its own).

    Also the CPU time per image summed over all threads (`cpu_ms`, and per stage `<stage>_cpu_ms`) and the frame
    rate it allows even with every core always busy (`fps_bound` = cores x 1000 / cpu_ms): wall time tells how
    fast it runs, CPU time how far any scheduling of the same work could go on this machine."""
    samples: dict[str, list[float]] = {key: [] for stage in STAGES for key in (stage, f"{stage}_cpu")}
    samples.update(total=[], cpu=[])
    found = 0
    for i in range(warmup + repeats):
        clocks = [(time.perf_counter(), time.process_time())]
        image = read_image(scene.path)
        clocks.append((time.perf_counter(), time.process_time()))
        detections = landmarker.find(image)
        clocks.append((time.perf_counter(), time.process_time()))
        result = landmarker.landmarks_for_found([detections])[0]
        clocks.append((time.perf_counter(), time.process_time()))
        found = len(result.faces)
        if i < warmup:
            continue
        for stage, (start, stop) in zip(STAGES, zip(clocks, clocks[1:], strict=False), strict=True):
            samples[stage].append((stop[0] - start[0]) * 1000.0)
            samples[f"{stage}_cpu"].append((stop[1] - start[1]) * 1000.0)
        samples["total"].append((clocks[-1][0] - clocks[0][0]) * 1000.0)
        samples["cpu"].append((clocks[-1][1] - clocks[0][1]) * 1000.0)
    medians = {f"{key}_ms": float(np.median(v)) for key, v in samples.items()}
    cores = usable_cores()
    return {
        "scene": scene.name,
        "width": scene.width,
        "height": scene.height,
        "faces_placed": scene.faces_placed,
        "faces_found": found,
        **medians,
        "p90_total_ms": float(np.percentile(samples["total"], 90)),
        "fps": 1000.0 / medians["total_ms"] if medians["total_ms"] > 0 else float("nan"),
        "cores": cores,
        "fps_bound": cores * 1000.0 / medians["cpu_ms"] if medians["cpu_ms"] > 0 else float("nan"),
        "repeats": repeats,
    }
