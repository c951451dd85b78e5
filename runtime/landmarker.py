"""`FaceLandmarker`: one object, one call, numpy in and out (dlib's style), torch-free.

detect(image): detector boxes (Haar by default, or a CNN detector: runtime/detectors.py) -> their calibration
(the model's for Haar, the detector's own for a CNN; identity when there is none) -> crops of
all faces of the image in one batch -> the model (facemark.inference: `refine` extra passes on the landmark
box of the previous pass, optional test-time flip) -> image pixels -> faces whose presence score is below
`min_score` dropped (models with a presence head).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from facemark.contract import Box, BoxCalibration, box_from_landmarks, non_max_suppression
from facemark.errors import ModelError, ModelWarning
from facemark.geometry import ARCFACE_SIZE, Pose, Template, aligned_chip, head_pose
from facemark.imageio import image_to_gray, image_to_gray_and_bgr, to_gray
from facemark.inference import predict_faces
from facemark.runtime.defaults import DEFAULT_MIN_SCORE, DEFAULT_REFINE
from facemark.runtime.detector import Detection
from facemark.runtime.detectors import HAAR, FaceDetector, calibration_for, create_detector
from facemark.runtime.options import RuntimeOptions
from facemark.runtime.session import DEFAULT_MAX_BATCH, LandmarkModel

DEFAULT_MODEL_NAME = "facemark-68.onnx"
DEFAULT_MODEL_PATH = Path(str(resources.files("facemark") / "assets" / DEFAULT_MODEL_NAME))
IDENTITY = BoxCalibration()
TIMING_KEYS = ("detect", "landmarks")
MAX_DEFAULT_WORKERS = 8
DUPLICATE_IOU = 0.5  # two faces whose landmark boxes overlap this much are one (distinct_faces)



@dataclass
class Face:
    box: Box  # the box the (last) crop was made from: the calibrated detector box, or the box given, refined
    landmarks: np.ndarray = field(repr=False)  # (68, 2) float32, image pixels
    score: float | None = None  # face presence in [0, 1] (models with a presence head; else None)
    detector_score: float | None = None  # the detector's score (Haar: a level weight, not a probability); None if none
    detector_box: Box | None = None  # the raw detector box, before calibration
    landmark_scores: np.ndarray | None = field(default=None, repr=False)  # (68,) in [0, 1] (pip head)
    image_size: tuple[int, int] | None = None  # (width, height) of the image the face was found in

    @property
    def pose(self) -> Pose:
        """Head pose (yaw, pitch, roll in degrees) from the landmarks: facemark.geometry.head_pose, with the
        camera of the image the face was found in."""
        if self.image_size is None:
            raise ValueError("Face.pose needs the image size (faces from FaceLandmarker carry it)")
        return head_pose(self.landmarks, self.image_size)

    def aligned(self, image: np.ndarray, size: int = ARCFACE_SIZE, template: Template = "arcface") -> np.ndarray:
        """The similarity-aligned `size` x `size` chip of this face from `image` (the array it was found in,
        any channels): dlib's get_face_chips / InsightFace's norm_crop (facemark.geometry)."""
        return aligned_chip(image, self.landmarks, size, template)

    def to_json(self, pose: bool = False) -> dict:
        extra = {"pose": self.pose.to_json()} if pose else {}
        return {
            "box": _rounded(self.box, 2),
            "landmarks": _rounded(self.landmarks, 2),
            "score": _rounded(self.score, 4),
            "detector_score": _rounded(self.detector_score, 4),
            "detector_box": _rounded(self.detector_box, 2),
            "landmark_scores": _rounded(self.landmark_scores, 3),
            **extra,
        }


@dataclass(frozen=True)
class Found:
    """An image after detection, before the landmark model (FaceLandmarker.find)."""

    gray: np.ndarray
    detections: list[Detection]
    detect_ms: float


def default_workers() -> int:
    """Threads for decoding and Haar when processing many images: one per core (measured in docs/MODEL.md)."""
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


@dataclass
class Detections:
    faces: list[Face]
    times: dict[str, float]  # milliseconds: detect, landmarks
    problems: list[str]  # one line each, e.g. faces dropped for non-finite model output
    presence_dropped: int = 0  # detections whose presence score fell below min_score


def distinct_faces(faces: Sequence[Face]) -> list[Face]:
    """One face per face: two detector boxes on one face (a single-hit box around a well-hit one, which grouping
    keeps apart) converge to the same landmarks under refinement; of faces whose landmark boxes overlap by
    DUPLICATE_IOU or more, the one with the higher presence score (then the earlier) is kept, in input order."""
    kept = non_max_suppression([box_from_landmarks(face.landmarks) for face in faces],
                               [face.score or 0.0 for face in faces], DUPLICATE_IOU)
    return [faces[i] for i in sorted(kept)]


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
        detector: FaceDetector | str | None = None,
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
        spin: bool = False,
        options: RuntimeOptions | None = None,
    ) -> None:
        """calibration: overrides the model's embedded detector calibration. max_faces: keep only the most
        confident detections (None = all). refine: extra passes re-cropped on the previous pass's landmarks
        (facemark.inference). flip: test-time flip. min_score: drop detections whose face presence score is
        below it (models with a presence head; None or 0 keeps every detection). detector: a ready detector, or
        a name from runtime.detectors.DETECTOR_NAMES (default "haar") made with `detector_options` over its
        defaults (Haar's: a permissive cascade when the model scores presence; a CNN detector runs on this
        model's provider, threads and TensorRT settings). spin: see LandmarkModel. options: the detector and
        pipeline options as one object (facemark.runtime.options.RuntimeOptions); when given it sets detector,
        detector_options, refine, flip, min_score and max_faces, which are then left at their defaults."""
        if options is not None:
            picked = options.landmarker_kwargs()
            detector = detector if not isinstance(detector, str | None) else picked["detector"]
            detector_options, refine, flip = picked["detector_options"], picked["refine"], picked["flip"]
            min_score, max_faces = picked["min_score"], picked["max_faces"]
        self.model = LandmarkModel(resolve_model_path(model_path), provider=provider, threads=threads,
                                   trt_fp16=trt_fp16, trt_cache_dir=trt_cache_dir, max_batch=max_batch,
                                   spin=spin)
        if detector is None or isinstance(detector, str):
            detector = create_detector(detector or HAAR, self.model.has_face_score, detector_options,
                                       provider=provider, threads=threads, trt_fp16=trt_fp16,
                                       trt_cache_dir=trt_cache_dir, spin=spin)
        self.detector = detector
        self.calibration = calibration or calibration_for(detector, self.model.info.calibration) or IDENTITY
        self.max_faces = max_faces
        if refine < 0:
            raise ValueError(f"refine must be >= 0 (got {refine})")
        self.refine, self.flip = refine, flip
        # A presence score the export found untrustworthy (an undertrained model) would drop real faces.
        trusted = self.model.info.presence_trusted
        self.min_score = min_score if self.model.has_face_score and trusted else None
        for line in self.model.info.notices():  # once per landmarker; the CLI prints them as one line each
            warnings.warn(f"{self.model.path or 'model'}: {line}", ModelWarning, stacklevel=2)

    @property
    def contract(self):
        return self.model.contract

    @property
    def info(self):
        return self.model.info

    @property
    def providers(self) -> list[str]:
        return self.model.providers

    def describe(self) -> dict:
        """The header of predict's JSON document: the model (metadata summary, path, providers), the detector
        and pipeline settings (a server hands this to its clients)."""
        path = self.model.path
        model = {**self.info.summary(), "path": None if path is None else str(path),
                 "providers": list(self.providers)}
        return {"model": model, "detector": self.detector.config(), "pipeline": self.pipeline_settings()}

    def pipeline_settings(self) -> dict:
        """The landmark settings that change results, as recorded in every output (JSON, JSONL, serving)."""
        return {"refine": self.refine, "tta": "flip" if self.flip else "none", "min_score": self.min_score}

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
        return self.landmarks_for_found([self.find(image, color)])[0]

    def detect_many(self, images: Iterable, color: str = "bgr", workers: int | None = None) -> list[Detections]:
        """`detect_full` of several images, in input order and equal to one-by-one calls: conversion and Haar
        run on `workers` threads (OpenCV releases the GIL; default: the core count), the landmark model once
        per pass for the faces of all images together (batches of up to the model's max_batch).

        An image that cannot be converted raises, as `detect` does; facemark.runtime.predict.predict_files
        reports bad files one by one instead."""
        items = list(images)
        if not items:
            return []
        count = max(1, min(workers or default_workers(), len(items)))
        if count == 1:
            found = [self.find(item, color) for item in items]
        else:
            with ThreadPoolExecutor(count, thread_name_prefix="facemark-detect") as pool:
                found = list(pool.map(lambda item: self.find(item, color), items))
        return self.landmarks_for_found(found)

    def find(self, image, color: str = "bgr", near: Sequence[Box] | None = None) -> Found:
        """The first half of `detect_full`: the grayscale image and its detections (no model call);
        `near`: search only around these boxes."""
        t0 = time.perf_counter()
        gray, seen = image_to_gray_and_bgr(image, color) if self.detector.color else (image_to_gray(image, color),) * 2
        detections = self.detector.detect(seen) if near is None else self.detector.detect_near(seen, near)
        if self.max_faces is not None and self.min_score is None:
            detections = detections[: self.max_faces]
        return Found(gray, detections, (time.perf_counter() - t0) * 1e3)

    def landmarks_for_found(self, found: Sequence[Found]) -> list[Detections]:
        """The second half of `detect_full` for several images at once: calibrated boxes -> one batched model
        call per pass over every face -> per image, faces above min_score. The landmark time is shared among
        the images by their number of faces."""
        t0 = time.perf_counter()
        entries = [(f.gray, self.calibration.apply(d.box), d) for f in found for d in f.detections]
        predicted = self._faces(entries, self.refine)
        seconds = time.perf_counter() - t0
        results, start = [], 0
        for f in found:
            mine = predicted[start : start + len(f.detections)]
            start += len(f.detections)
            faces = [face for face in mine if face is not None]
            dropped = len(mine) - len(faces)
            below = 0
            if self.min_score is not None:
                kept = [face for face in faces if face.score is not None and face.score >= self.min_score]
                below, faces = len(faces) - len(kept), kept
            if self.model.has_face_score:  # its permissive detector defaults can put two boxes on one face
                faces = distinct_faces(faces)
            if self.min_score is not None and self.max_faces is not None:
                faces = faces[: self.max_faces]
            share = len(mine) / len(entries) if entries else 0.0
            problems = [f"{dropped} face(s) dropped: the model returned non-finite values (NaN/Inf) for them"] \
                if dropped else []
            results.append(Detections(faces, {"detect": f.detect_ms, "landmarks": seconds * 1e3 * share}, problems,
                                      below))
        return results

    def landmarks_for_boxes(self, image: np.ndarray, boxes: Sequence[Box], refine: int = 0) -> list[Face]:
        """Landmarks for given boxes in the training convention (no detector, no calibration, no score
        threshold): video tracking (box_from_landmarks of the previous frame) and evaluation with
        ground-truth boxes. `refine` extra passes (default 0: these boxes are landmark boxes already)."""
        gray = to_gray(image)
        faces = self._faces([(gray, tuple(float(v) for v in b), None) for b in boxes], refine)
        return [face for face in faces if face is not None]

    def _faces(self, entries: Sequence[tuple[np.ndarray, Box, Detection | None]], refine: int
               ) -> list[Face | None]:
        """One Face per (image, box, detection) entry, None where the model returned non-finite values."""
        predictions = predict_faces(self.model, [(gray, box) for gray, box, _ in entries], refine, self.flip)
        faces: list[Face | None] = []
        for (gray, _, detection), p in zip(entries, predictions, strict=True):
            values = [p.landmarks, p.landmark_scores, p.face_score]
            if not all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in values if v is not None):
                faces.append(None)
                continue
            faces.append(Face(box=p.box, landmarks=p.landmarks.astype(np.float32), score=p.face_score,
                              detector_score=detection.score if detection else None,
                              detector_box=detection.box if detection else None,
                              landmark_scores=p.landmark_scores, image_size=(gray.shape[1], gray.shape[0])))
        return faces

    def __repr__(self) -> str:
        return f"FaceLandmarker(model={self.model!r}, detector={self.detector!r})"
