"""`FaceLandmarker`: one object, one call, numpy in and out (dlib's style), torch-free.

detect(image): Haar boxes -> the model's detector calibration (identity when the model has none) -> crops of
all faces of the image in one batch -> the model (facemark.inference: `refine` extra passes on the landmark
box of the previous pass, optional test-time flip) -> image pixels -> faces whose presence score is below
`min_score` dropped (models with a presence head).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from facemark.contract import Box, BoxCalibration
from facemark.errors import ModelError
from facemark.imageio import image_to_gray, to_gray
from facemark.inference import predict_faces
from facemark.runtime.defaults import DEFAULT_MIN_SCORE, DEFAULT_REFINE
from facemark.runtime.detector import Detection, HaarDetector, default_detector_options
from facemark.runtime.session import DEFAULT_MAX_BATCH, LandmarkModel

DEFAULT_MODEL_NAME = "facemark-68.onnx"
DEFAULT_MODEL_PATH = Path(str(resources.files("facemark") / "assets" / DEFAULT_MODEL_NAME))
IDENTITY = BoxCalibration()
TIMING_KEYS = ("detect", "landmarks")



@dataclass
class Face:
    box: Box  # the box the (last) crop was made from: the calibrated detector box, or the box given, refined
    landmarks: np.ndarray = field(repr=False)  # (68, 2) float32, image pixels
    score: float | None = None  # face presence in [0, 1] (models with a presence head; else None)
    detector_score: float | None = None  # the Haar cascade's level weight (not a probability); None if no detector
    detector_box: Box | None = None  # the raw detector box, before calibration
    landmark_scores: np.ndarray | None = field(default=None, repr=False)  # (68,) in [0, 1] (pip head)

    def to_json(self) -> dict:
        return {
            "box": _rounded(self.box, 2),
            "landmarks": _rounded(self.landmarks, 2),
            "score": _rounded(self.score, 4),
            "detector_score": _rounded(self.detector_score, 4),
            "detector_box": _rounded(self.detector_box, 2),
            "landmark_scores": _rounded(self.landmark_scores, 3),
        }


@dataclass
class Detections:
    faces: list[Face]
    times: dict[str, float]  # milliseconds: detect, landmarks
    problems: list[str]  # one line each, e.g. faces dropped for non-finite model output


def _rounded(value, digits: int):
    """JSON-safe rounding of a number / sequence / array (None stays None; JSON never holds NaN)."""
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError("non-finite value in a face record")
    return np.round(array, digits).tolist()


def resolve_model_path(model_path: str | os.PathLike | bytes | None) -> str | os.PathLike | bytes:
    if model_path is not None:
        return model_path
    if not DEFAULT_MODEL_PATH.is_file():
        raise ModelError(f"{DEFAULT_MODEL_PATH}: the default model is not installed; pass a model exported with "
                         "`facemark export` (FaceLandmarker('model.onnx') or --model model.onnx)")
    return DEFAULT_MODEL_PATH


class FaceLandmarker:
    """68-point landmarks for every face in an image.

    >>> landmarker = FaceLandmarker("facemark-68.onnx")      # doctest: +SKIP
    >>> for face in landmarker.detect(cv2.imread("photo.jpg")):  # doctest: +SKIP
    ...     print(face.box, face.landmarks.shape)
    """

    def __init__(
        self,
        model_path: str | os.PathLike | bytes | None = None,
        provider: str = "auto",
        detector: HaarDetector | None = None,
        threads: int | None = None,
        trt_fp16: bool = False,
        trt_cache_dir: str | os.PathLike | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        calibration: BoxCalibration | None = None,
        max_faces: int | None = None,
        refine: int = DEFAULT_REFINE,
        flip: bool = False,
        min_score: float | None = DEFAULT_MIN_SCORE,
        detector_options: dict | None = None,
    ) -> None:
        """calibration: overrides the model's embedded detector calibration. max_faces: keep only the most
        confident detections (None = all). refine: extra passes re-cropped on the previous pass's landmarks
        (facemark.inference). flip: test-time flip. min_score: drop detections whose face presence score is
        below it (models with a presence head; None or 0 keeps every detection). detector: a ready detector;
        else a HaarDetector with `detector_options` over the defaults for this model (a permissive cascade when
        the model scores presence: runtime.detector.default_detector_options)."""
        self.model = LandmarkModel(resolve_model_path(model_path), provider=provider, threads=threads,
                                   trt_fp16=trt_fp16, trt_cache_dir=trt_cache_dir, max_batch=max_batch)
        if detector is None:
            options = {**default_detector_options(self.model.has_face_score), **(detector_options or {})}
            detector = HaarDetector(**options)
        self.detector = detector
        self.calibration = calibration or self.model.info.calibration or IDENTITY
        self.max_faces = max_faces
        if refine < 0:
            raise ValueError(f"refine must be >= 0 (got {refine})")
        self.refine, self.flip = refine, flip
        self.min_score = min_score if self.model.has_face_score else None

    @property
    def contract(self):
        return self.model.contract

    @property
    def info(self):
        return self.model.info

    @property
    def providers(self) -> list[str]:
        return self.model.providers

    def detect(self, image, color: str = "bgr") -> list[Face]:
        """All faces of one image, most confident first; [] when there is none.

        `image`: a numpy array in `color` order ("bgr" as cv2.imread gives, "rgb", "gray"), a PIL image, or a
        file path (facemark.imageio.image_to_gray)."""
        return self.detect_timed(image, color)[0]

    def detect_timed(self, image, color: str = "bgr") -> tuple[list[Face], dict[str, float]]:
        """`detect` plus the milliseconds of each step: detect, landmarks (every pass, all faces batched)."""
        result = self.detect_full(image, color)
        return result.faces, result.times

    def detect_full(self, image, color: str = "bgr") -> Detections:
        """`detect` with step times and problems (faces dropped because the model returned non-finite values).

        Thread-safe: one FaceLandmarker may serve many threads (per-thread Haar classifiers, one shared ONNX
        Runtime session, no state changed by a call)."""
        t0 = time.perf_counter()
        gray = image_to_gray(image, color)
        detections = self.detector.detect(gray)
        if self.max_faces is not None and self.min_score is None:
            detections = detections[: self.max_faces]
        t1 = time.perf_counter()
        boxes = [self.calibration.apply(d.box) for d in detections]
        faces, problems = self._landmarks(gray, boxes, self.refine, detections)
        if self.min_score is not None:
            faces = [f for f in faces if f.score is not None and f.score >= self.min_score]
            if self.max_faces is not None:
                faces = faces[: self.max_faces]
        t2 = time.perf_counter()
        return Detections(faces, {"detect": (t1 - t0) * 1e3, "landmarks": (t2 - t1) * 1e3}, problems)

    def landmarks_for_boxes(self, image: np.ndarray, boxes: Sequence[Box], refine: int = 0) -> list[Face]:
        """Landmarks for given boxes in the training convention (no detector, no calibration, no score
        threshold): video tracking (box_from_landmarks of the previous frame) and evaluation with
        ground-truth boxes. `refine` extra passes (default 0: these boxes are landmark boxes already)."""
        gray = to_gray(image)
        return self._landmarks(gray, [tuple(float(v) for v in b) for b in boxes], refine, None)[0]

    def _landmarks(self, gray: np.ndarray, boxes: list[Box], refine: int,
                   detections: Sequence[Detection] | None) -> tuple[list[Face], list[str]]:
        predictions = predict_faces(self.model, [(gray, b) for b in boxes], refine, self.flip)
        faces, dropped = [], 0
        for i, p in enumerate(predictions):
            values = [p.landmarks, p.landmark_scores, p.face_score]
            if not all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in values if v is not None):
                dropped += 1
                continue
            detection = detections[i] if detections is not None else None
            faces.append(Face(box=p.box, landmarks=p.landmarks.astype(np.float32), score=p.face_score,
                              detector_score=detection.score if detection else None,
                              detector_box=detection.box if detection else None,
                              landmark_scores=p.landmark_scores))
        problems = [f"{dropped} face(s) dropped: the model returned non-finite values (NaN/Inf) for them"] \
            if dropped else []
        return faces, problems

    def __repr__(self) -> str:
        return f"FaceLandmarker(model={self.model!r}, detector={self.detector!r})"
