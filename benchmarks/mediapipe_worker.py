"""MediaPipe Face Mesh, run for `facemark bench` in MediaPipe's own virtual environment.

This file is executed by path with that environment's interpreter (MediaPipe 0.10.21 pins numpy < 2 and its own
OpenCV), so it imports nothing from facemark. It reads one JSON job on stdin and writes one JSON document on
stdout:

job: {"mode": "faces" | "photos", "cores": N, "repeats": R,
      "items": [{"path": str, "box": [x, y, w, h] (faces mode: the face's box in the photo)}]}
out: {"version": str, "results": [{"faces": [[[x, y], ... 468], ...], "ms": [R timings]}]}

faces: Face Mesh on a square region of twice the box side around the box (its detector needs context), points
mapped back to the photo; photos: Face Mesh on the whole photo, every face it finds. Points are photo pixels.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from PIL import Image, ImageOps

REGION = 2.0  # faces mode: region side / box side


def read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def face_region(rgb: np.ndarray, box: list[float]) -> tuple[np.ndarray, float, float]:
    x, y, w, h = box
    side = REGION * max(w, h)
    x0 = int(max(0, round(x + w / 2 - side / 2)))
    y0 = int(max(0, round(y + h / 2 - side / 2)))
    x1 = int(min(rgb.shape[1], round(x + w / 2 + side / 2)))
    y1 = int(min(rgb.shape[0], round(y + h / 2 + side / 2)))
    return np.ascontiguousarray(rgb[y0:y1, x0:x1]), float(x0), float(y0)


def mesh_points(result, width: int, height: int, dx: float, dy: float) -> list[list[list[float]]]:
    faces = []
    for face in result.multi_face_landmarks or []:
        faces.append([[p.x * width + dx, p.y * height + dy] for p in face.landmark])
    return faces


def main() -> int:
    job = json.load(sys.stdin)
    cores = int(job.get("cores", 1))
    if hasattr(os, "sched_setaffinity"):  # the thread budget: TFLite's pool sees only these cores
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    import mediapipe as mp

    photos = job["mode"] == "photos"
    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=8 if photos else 1,
                                           refine_landmarks=False, min_detection_confidence=0.5)
    results = []
    for item in job["items"]:
        rgb = read_rgb(item["path"])
        dx = dy = 0.0
        if not photos:
            rgb, dx, dy = face_region(rgb, item["box"])
        timings = []
        result = None
        for _ in range(max(1, int(job.get("repeats", 1)))):
            start = time.perf_counter()
            result = mesh.process(rgb)
            timings.append((time.perf_counter() - start) * 1000.0)
        results.append({"faces": mesh_points(result, rgb.shape[1], rgb.shape[0], dx, dy), "ms": timings})
    json.dump({"version": mp.__version__, "results": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
