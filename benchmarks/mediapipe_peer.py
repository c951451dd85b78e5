"""The MediaPipe peer row of `facemark bench`: Face Mesh (468 points) beside dlib's predictor, same faces, same run.

MediaPipe 0.10.21 (its wheel carries the Face Mesh model files and runs offline) needs numpy < 2 and its own
OpenCV, so it lives in a virtual environment of its own: `make bench` creates `.venv-mediapipe`
(`FACEMARK_MEDIAPIPE_PYTHON` names another interpreter). facemark runs `mediapipe_worker.py` with that
interpreter and reads the points back.

NME needs the 68 iBUG points: `MESH_TO_IBUG68` picks, for each iBUG point, the mesh vertex nearest to it on
average over training faces (never validation ones), fitted by `python -m facemark.benchmarks.mediapipe_peer
--fit-map --data ../shared/data/300w`. The mesh has no vertex on the iBUG jaw contour (which follows the visible
outline, not a fixed surface point) nor exactly on the iBUG brow points, so Face Mesh's NME through this map is
an upper bound of its accuracy, not the same definition as a 68-point model's.

Two protocols, each timed at the same thread budget (the worker's cores): "face regions" (Face Mesh on a region
twice the face's landmark box, like dlib on the mapped box: ms per face) and "own detector" (Face Mesh on the
whole photo with its BlazeFace detector: ms per photo, faces matched to the annotation by IoU >= 0.3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facemark.contract import box_from_landmarks, box_iou
from facemark.data import FaceRecord
from facemark.metrics import nme_per_face, summarize

MEDIAPIPE_VERSION = "0.10.21"
VENV = Path(".venv-mediapipe")
WORKER = Path(__file__).with_name("mediapipe_worker.py")
MIN_IOU = 0.3
WORKER_TIMEOUT_S = 1800

# iBUG point k -> Face Mesh vertex, fitted on 300 of the 1807 training faces of ../shared/data/300w (split seed 0;
# Face Mesh found all 300) by `python -m facemark.benchmarks.mediapipe_peer --fit-map --data ../shared/data/300w`.
MESH_TO_IBUG68: tuple[int, ...] = (
    127, 227, 177, 215, 172, 136, 149, 148, 152, 377, 378, 365, 397, 435, 401, 447, 356,  # jaw 0-16
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,  # brows 17-26
    168, 197, 195, 4, 75, 97, 2, 326, 460,  # nose 27-35
    7, 159, 158, 155, 153, 144, 382, 385, 387, 249, 373, 380,  # eyes 36-47
    61, 39, 37, 0, 267, 304, 291, 321, 314, 17, 84, 181,  # outer lips 48-59
    62, 38, 13, 268, 292, 317, 14, 87,  # inner lips 60-67
)


def find_mediapipe_python() -> Path | str:
    """The interpreter of MediaPipe's environment, or the reason the row is skipped."""
    named = os.environ.get("FACEMARK_MEDIAPIPE_PYTHON")
    python = Path(named) if named else VENV / "bin" / "python"
    if not python.is_file():
        return (f"{python} not found: `make bench` creates it (python3 -m venv {VENV} && {VENV}/bin/pip install "
                f"mediapipe=={MEDIAPIPE_VERSION})")
    probe = subprocess.run([str(python), "-c", "import mediapipe, sys; sys.stdout.write(mediapipe.__version__)"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{python} cannot import mediapipe ({last})"
    return python


def run_worker(python: Path, mode: str, records: Sequence[FaceRecord], cores: int, repeats: int = 1) -> dict:
    """Face Mesh on `records` ("faces": each face's region; "photos": each whole photo) in MediaPipe's env."""
    items = [{"path": str(r.image_path), "box": list(map(float, box_from_landmarks(r.landmarks)))} for r in records]
    job = json.dumps({"mode": mode, "cores": cores, "repeats": repeats, "items": items})
    done = subprocess.run([str(python), str(WORKER)], input=job, capture_output=True, text=True,
                          timeout=WORKER_TIMEOUT_S)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise RuntimeError(f"MediaPipe worker failed: {last}")
    return json.loads(done.stdout)


def matched_mesh(faces: list, record: FaceRecord) -> np.ndarray | None:
    """The mesh (468, 2) whose bounding box overlaps the annotated face most (IoU >= MIN_IOU), if any."""
    target = box_from_landmarks(record.landmarks)
    best, best_iou = None, MIN_IOU
    for face in faces:
        mesh = np.asarray(face, dtype=np.float32)
        iou = box_iou(box_from_landmarks(mesh), target)
        if iou >= best_iou:
            best, best_iou = mesh, iou
    return best


def fit_index_map(meshes: Sequence[np.ndarray], records: Sequence[FaceRecord]) -> tuple[int, ...]:
    """For each iBUG point, the mesh vertex with the smallest mean distance to it (in inter-ocular units)."""
    from facemark.scheme import interocular_distance

    total = None
    for mesh, record in zip(meshes, records, strict=True):
        iod = float(interocular_distance(np.asarray(record.landmarks)[None])[0])
        d = np.linalg.norm(mesh[:, None, :] - record.landmarks[None, :, :], axis=-1) / max(iod, 1e-6)  # (468, 68)
        total = d if total is None else total + d
    return tuple(int(v) for v in np.argmin(total, axis=0))


def to_ibug68(mesh: np.ndarray, index_map: Sequence[int] = MESH_TO_IBUG68) -> np.ndarray:
    return mesh[list(index_map)]


def mediapipe_rows(python: Path, records: Sequence[FaceRecord], cores: int, repeats: int = 3) -> list[dict]:
    """Both protocols on `records`: median ms (per face / per photo), NME over the faces found, share found."""
    rows = []
    for mode, protocol, unit in (("faces", "face regions", "ms per face (Face Mesh on a region of 2x the landmark "
                                                            "box)"),
                                 ("photos", "own detector", "ms per photo (BlazeFace + Face Mesh on every face)")):
        out = run_worker(python, mode, records, cores, repeats)
        errors, times = [], []
        for result, record in zip(out["results"], records, strict=True):
            times.append(float(np.median(result["ms"])))
            mesh = matched_mesh(result["faces"], record)
            if mesh is not None:
                errors.append(float(nme_per_face(to_ibug68(mesh), record.landmarks)[0]))
        summary = summarize(np.asarray(errors)) if errors else {"nme": None, "faces": 0}
        rows.append({"protocol": protocol, "unit": unit, "threads": cores, "ms": float(np.median(times)),
                     "p90_ms": float(np.percentile(times, 90)), "nme": summary["nme"], "nme_faces": summary["faces"],
                     "found": len(errors) / len(records) if records else None, "version": out["version"],
                     "nme_note": "468 -> 68 through a fixed nearest-vertex map: an upper bound (jaw and brow "
                                 "points are not the same definition)"})
    return rows


def mediapipe_document(records: Sequence[FaceRecord], cores: int, repeats: int = 3) -> dict:
    """The bench's MediaPipe section: rows, or why it was skipped."""
    if not MESH_TO_IBUG68:
        return {"skipped": "no 468 -> 68 map fitted (python -m facemark.benchmarks.mediapipe_peer --fit-map)"}
    python = find_mediapipe_python()
    if isinstance(python, str):
        return {"skipped": python}
    if not records:
        return {"skipped": "no validation faces (give --data)"}
    try:
        return {"rows": mediapipe_rows(python, records, cores, repeats)}
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        return {"skipped": f"{exc.__class__.__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from facemark.data import load_records, split_records

    parser = argparse.ArgumentParser(prog="python -m facemark.benchmarks.mediapipe_peer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--fit-map", action="store_true", help="fit MESH_TO_IBUG68 on training faces and print it")
    parser.add_argument("--faces", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    python = find_mediapipe_python()
    if isinstance(python, str):
        print(python, file=sys.stderr)
        return 2
    train, val = split_records(load_records([args.data], lambda _m: None), 0.1, 0)
    if args.fit_map:
        picked = train[:: max(1, len(train) // args.faces)][: args.faces]
        out = run_worker(python, "faces", picked, args.threads)
        pairs = [(m, r) for res, r in zip(out["results"], picked, strict=True)
                 if (m := matched_mesh(res["faces"], r)) is not None]
        index_map = fit_index_map([m for m, _ in pairs], [r for _, r in pairs])
        print(f"# fitted on {len(pairs)} of {len(picked)} training faces")
        print(f"MESH_TO_IBUG68 = {index_map}")
        return 0
    print(json.dumps(mediapipe_document(val, args.threads), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
