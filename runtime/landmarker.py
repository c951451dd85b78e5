"""`FaceLandmarker`: one object, one call, numpy in and out (dlib's style), torch-free.

detect(image): Haar boxes -> the model's detector calibration (identity when the model has none) ->
CropContract.prepare (all faces of the image in one batch) -> ONE model call -> decode to image pixels.
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
from facemark.imageio import to_gray
from facemark.runtime.detector import HaarDetector
from facemark.runtime.session import DEFAULT_MAX_BATCH, LandmarkModel

DEFAULT_MODEL_NAME = "facemark-68.onnx"
DEFAULT_MODEL_PATH = Path(str(resources.files("facemark") / "assets" / DEFAULT_MODEL_NAME))
IDENTITY = BoxCalibration()
TIMING_KEYS = ("detect", "preprocess", "inference", "postprocess")


@dataclass
class Face:
    box: Box  # the box the crop was made from (calibrated detector box, or the box given)
    landmarks: np.ndarray = field(repr=False)  # (68, 2) float32, image pixels
    score: float | None = None  # detector level weight; None for boxes not from the detector
    detector_box: Box | None = None  # the raw detector box, before calibration

    def to_json(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "landmarks": np.round(self.landmarks.astype(np.float64), 2).tolist(),
            "score": None if self.score is None else round(float(self.score), 4),
            "detector_box": None if self.detector_box is None else [round(float(v), 2) for v in self.detector_box],
        }


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
    ) -> None:
        """calibration: overrides the model's embedded detector calibration. max_faces: keep only the most
        confident detections (None = all)."""
        self.model = LandmarkModel(resolve_model_path(model_path), provider=provider, threads=threads,
                                   trt_fp16=trt_fp16, trt_cache_dir=trt_cache_dir, max_batch=max_batch)
        self.detector = detector if detector is not None else HaarDetector()
        self.calibration = calibration or self.model.info.calibration or IDENTITY
        self.max_faces = max_faces

    @property
    def contract(self):
        return self.model.contract

    @property
    def info(self):
        return self.model.info

    @property
    def providers(self) -> list[str]:
        return self.model.providers

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces of one image (BGR or gray), most confident first; [] when there is none."""
        return self.detect_timed(image)[0]

    def detect_timed(self, image: np.ndarray) -> tuple[list[Face], dict[str, float]]:
        """`detect` plus the milliseconds of each step: detect, preprocess, inference, postprocess."""
        t0 = time.perf_counter()
        gray = to_gray(image)
        detections = self.detector.detect(gray)
        if self.max_faces is not None:
            detections = detections[: self.max_faces]
        t1 = time.perf_counter()
        boxes = [self.calibration.apply(d.box) for d in detections]
        faces, times = self._landmarks(gray, boxes, [d.score for d in detections], [d.box for d in detections])
        times["detect"] = (t1 - t0) * 1000.0
        return faces, {k: times[k] for k in TIMING_KEYS}

    def landmarks_for_boxes(self, image: np.ndarray, boxes: Sequence[Box]) -> list[Face]:
        """Landmarks for given boxes in the training convention (no detector, no calibration): video tracking
        (box_from_landmarks of the previous frame) and evaluation with ground-truth boxes."""
        gray = to_gray(image)
        boxes = [tuple(float(v) for v in b) for b in boxes]
        return self._landmarks(gray, boxes, [None] * len(boxes), [None] * len(boxes))[0]

    def _landmarks(self, gray: np.ndarray, boxes: list[Box], scores: list, detector_boxes: list
                   ) -> tuple[list[Face], dict[str, float]]:
        t0 = time.perf_counter()
        batch, matrices = self.contract.prepare(gray, boxes)
        t1 = time.perf_counter()
        outputs = self.model.predict(batch)  # every face of the image in one call
        t2 = time.perf_counter()
        faces = [
            Face(box=box, landmarks=self.contract.decode_points(out, m).astype(np.float32), score=score,
                 detector_box=raw)
            for box, out, m, score, raw in zip(boxes, outputs, matrices, scores, detector_boxes, strict=True)
        ]
        t3 = time.perf_counter()
        return faces, {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}

    def __repr__(self) -> str:
        return f"FaceLandmarker(model={self.model!r}, detector={self.detector!r})"
