"""`FaceLandmarker`: one object, one call, numpy in and out (dlib's style), torch-free.

detect(image): detector boxes (Haar by default, or a CNN detector: runtime/detectors.py) -> their calibration
(the model's for Haar, the detector's own for a CNN; identity when there is none) -> crops of
all faces of the image in one batch -> the model (facemark.inference: `refine` extra passes on the landmark
box of the previous pass, optional test-time flip) -> image pixels -> faces whose presence score is below
`min_score` dropped (models with a presence head) -> faces in FACE_ORDER, the first `max_faces` kept.

Its keywords are the command line's options with `_` (docs/DESIGN.md section 7): every field of
facemark.runtime.options (SETTING_NAMES, `preset`) and where the model runs (LANDMARKER_KEYWORDS); the old
keywords (DEPRECATED_KEYWORDS) still work with a DeprecationWarning naming the new one.
"""

from __future__ import annotations

import inspect
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facemark.contract import Box, BoxCalibration, box_from_landmarks, non_max_suppression
from facemark.errors import ClosedError, FacemarkError, ModelError, ModelWarning, SettingError, printable, setting
from facemark.geometry import ARCFACE_SIZE, Pose, Template, aligned_chip, head_pose
from facemark.imageio import color_order, image_to_gray, image_to_gray_and_bgr, to_gray
from facemark.inference import predict_faces
from facemark.runtime.detector import Detection
from facemark.runtime.detectors import FaceDetector, calibration_for, create_detector
from facemark.runtime.options import SETTING_NAMES, DetectorOptions, RuntimeOptions, field_names
from facemark.runtime.session import DEFAULT_MAX_BATCH, LandmarkModel

if TYPE_CHECKING:  # annotations only: facemark.runtime.video loads when track() is called
    from collections.abc import Iterator

    from facemark.runtime.video import FrameResult

DEFAULT_MODEL_NAME = "facemark-68.onnx"
DEFAULT_MODEL_PATH = Path(str(resources.files("facemark") / "assets" / DEFAULT_MODEL_NAME))
IDENTITY = BoxCalibration()
TIMING_KEYS = ("detect", "landmarks")
MAX_DEFAULT_WORKERS = 8
DUPLICATE_IOU = 0.5  # two faces whose landmark boxes overlap this much are one (distinct_faces)
SCORE_DIGITS = 4  # decimals of a face's presence and detector scores in the JSON (FACE_ORDER compares at this)
FACE_ORDER = (f"by presence score as reported ({SCORE_DIGITS} decimals), highest first, when the model has a trusted "
              "presence score; else (and among equal reported scores) in the detector's order, its score highest "
              "first")
# FaceLandmarker's keywords beyond the options of facemark.runtime.options: where and how the model runs.
LANDMARKER_KEYWORDS = ("device", "threads", "trt_fp16", "trt_cache", "max_batch_size", "calibration", "spin")
# Old keyword -> its name now (a DeprecationWarning names it); detector_options's keys -> the option fields.
DEPRECATED_KEYWORDS = {"provider": "device", "flip": "tta", "trt_cache_dir": "trt_cache",
                       "max_batch": "max_batch_size", "detector_options": "the detector's own keywords"}
DETECTOR_OPTION_FIELDS = {"min_face_fraction": "min_face", "min_score": "min_detector_score",
                          "input_side": "detector_input_side", "max_side": "max_side", "cascade": "cascade",
                          "scale_factor": "scale_factor", "min_neighbors": "min_neighbors",
                          "min_face_windows": "min_face_windows", "octaves": "octaves"}


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
            "score": _rounded(self.score, SCORE_DIGITS),
            "detector_score": _rounded(self.detector_score, SCORE_DIGITS),
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
class Detections(Sequence):
    """One image's result: a sequence of its faces (len, iteration, indexing; false when there is none) in
    FACE_ORDER, with step times and problems. `error`: None, or the one line saying why the image could not be
    processed (FaceLandmarker.detect_many; its faces are then empty)."""

    faces: list[Face]
    times: dict[str, float]  # milliseconds: detect, landmarks
    problems: list[str]  # one line each, e.g. faces dropped for non-finite model output
    presence_dropped: int = 0  # detections whose presence score fell below min_score
    error: str | None = None

    @classmethod
    def failed(cls, error: str) -> Detections:
        return cls([], {"detect": 0.0, "landmarks": 0.0}, [], error=error)

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index):
        return self.faces[index]

    def __iter__(self):
        return iter(self.faces)


def distinct_faces(faces: Sequence[Face]) -> list[Face]:
    """One face per face: two detector boxes on one face (a single-hit box around a well-hit one, which grouping
    keeps apart) converge to the same landmarks under refinement; of faces whose landmark boxes overlap by
    DUPLICATE_IOU or more, the one with the higher presence score (then the earlier) is kept, in input order."""
    kept = non_max_suppression([box_from_landmarks(face.landmarks) for face in faces],
                               [face.score or 0.0 for face in faces], DUPLICATE_IOU)
    return [faces[i] for i in sorted(kept)]


def presence_rank(score: float) -> int:
    """A presence score as FACE_ORDER compares it: at the JSON's precision, so that scores the JSON shows as equal
    (most clear faces saturate near 1.0, differing in the last float bits from one backend to another: CPU, WASM)
    keep the detector's order. Rounds half up, as facemark.js does."""
    return math.floor(score * 10**SCORE_DIGITS + 0.5)


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
        how = {False: "FaceLandmarker('model.onnx')", True: "--model model.onnx"}  # in Python, on the command line
        raise ModelError.worded(lambda cli: f"{DEFAULT_MODEL_PATH}: the default model is not installed; pass a model "
                                f"exported with `facemark export` ({how[cli]})")
    return DEFAULT_MODEL_PATH


def _current_keywords(settings: dict[str, Any]) -> dict[str, Any]:
    """FaceLandmarker's extra keywords with the deprecated ones renamed (one DeprecationWarning each); TypeError
    for a keyword that is neither an option nor a deprecated name."""
    current: dict[str, Any] = {}
    for name, value in settings.items():
        if name not in DEPRECATED_KEYWORDS:
            current[name] = value
            continue
        warnings.warn(f"FaceLandmarker({name}=...) is deprecated: use {DEPRECATED_KEYWORDS[name]}"
                      f"{'=' if name != 'detector_options' else ''}", DeprecationWarning, stacklevel=3)
        if name == "flip":
            current["tta"] = "flip" if value else "none"
        elif name == "detector_options":
            current.update(_detector_fields(value or {}))
        else:
            current[DEPRECATED_KEYWORDS[name]] = value
    unknown = sorted(set(current) - {*SETTING_NAMES, *LANDMARKER_KEYWORDS})
    if unknown:
        valid = ", ".join(("model_path", "preset", *LANDMARKER_KEYWORDS, *SETTING_NAMES, "options"))
        raise TypeError(f"FaceLandmarker got unknown keyword(s) {', '.join(unknown)}; the keywords are: {valid}")
    return current


def _detector_fields(detector_options: dict[str, Any]) -> dict[str, Any]:
    """The old `detector_options` (runtime.detectors.create_detector's names) as option fields."""
    unknown = sorted(set(detector_options) - set(DETECTOR_OPTION_FIELDS))
    if unknown:
        raise TypeError(f"detector_options: unknown key(s) {', '.join(unknown)}")
    values = {DETECTOR_OPTION_FIELDS[k]: v for k, v in detector_options.items()}
    if "max_side" in values and values["max_side"] is None:  # create_detector's None is the option's 0 (off)
        values["max_side"] = 0
    return values


class _Closed:
    """What a closed FaceLandmarker holds instead of its model and detector: every use is one clear error."""

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy, pickle and hasattr probes: not a use
            raise AttributeError(name)
        raise ClosedError("this FaceLandmarker is closed (close() or the end of its `with` block released its "
                          "model); make a new one")

    def __repr__(self) -> str:
        return "<closed>"


class FaceLandmarker:
    """68-point landmarks for every face in an image.

    >>> landmarker = FaceLandmarker("facemark-68.onnx")      # doctest: +SKIP
    >>> for face in landmarker.detect(cv2.imread("photo.jpg")):  # doctest: +SKIP
    ...     print(face.box, face.landmarks.shape)
    """

    def __init__(
        self,
        model_path: str | os.PathLike | bytes | None = None,
        *,
        preset: str | None = None,
        device: str = "auto",
        threads: int | None = None,
        detector: FaceDetector | str | None = None,
        options: RuntimeOptions | None = None,
        trt_fp16: bool = False,
        trt_cache: str | os.PathLike | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH,
        calibration: BoxCalibration | None = None,
        spin: bool = False,
        **settings: Any,
    ) -> None:
        """The keywords are those of `facemark runtime predict` with `_` (docs/CLI.md): preset ("fast",
        "default", "accurate"), device ("auto", "cpu", "cuda", "tensorrt"), threads, trt_fp16, trt_cache, and
        every detector and landmark option (facemark.runtime.options.SETTING_NAMES: refine, tta, min_score,
        max_faces, min_face, scale_factor, ...). detector: a name (haar, the default, or a CNN detector) or a
        ready FaceDetector. options: the options as one RuntimeOptions; the preset's values go over it, the
        keywords over both. max_batch_size: the model's largest batch (TensorRT's profile; larger batches run
        in chunks). calibration: overrides the model's embedded detector calibration. spin: see LandmarkModel.
        An unknown keyword is a TypeError naming the valid ones; a value out of range a SettingError (ValueError).
        Use it as a context manager, or call close(), to release the model at once."""
        named = _current_keywords(settings)
        detector_given = sorted(set(named) & set(field_names(DetectorOptions)))
        if detector is not None and not isinstance(detector, str) and detector_given:
            raise SettingError.worded(lambda cli: f"{', '.join(setting(n, cli=cli) for n in detector_given)}: "
                                      "options of a detector made by name, not of a ready FaceDetector")
        device = named.pop("device", device)
        trt_cache = named.pop("trt_cache", trt_cache)
        max_batch_size = named.pop("max_batch_size", max_batch_size)
        ready = detector if detector is not None and not isinstance(detector, str) else None
        if isinstance(detector, str):
            named["detector"] = detector
        if named.get("min_score", 0.0) is None:  # None and 0 both keep every face
            named["min_score"] = 0.0
        self.options = RuntimeOptions.from_settings(preset, options, **named)
        picked = self.options.landmarker_kwargs()
        self.model = LandmarkModel(resolve_model_path(model_path), provider=device, threads=threads,
                                   trt_fp16=trt_fp16, trt_cache_dir=trt_cache, max_batch=max_batch_size, spin=spin)
        self.detector = ready or create_detector(picked["detector"], self.model.has_face_score,
                                                 picked["detector_options"], provider=device, threads=threads,
                                                 trt_fp16=trt_fp16, trt_cache_dir=trt_cache, spin=spin)
        self.calibration = calibration or calibration_for(self.detector, self.model.info.calibration) or IDENTITY
        self.max_faces, self.refine, self.flip = picked["max_faces"], picked["refine"], picked["flip"]
        # A presence score the export found untrustworthy (an undertrained model) would drop real faces.
        trusted = self.model.has_face_score and self.model.info.presence_trusted
        self.min_score = picked["min_score"] if trusted else None
        self.by_presence = trusted  # FACE_ORDER
        for line in self.model.info.notices():  # once per landmarker; the CLI prints them as one line each
            warnings.warn(f"{self.model.path or 'model'}: {line}", ModelWarning, stacklevel=2)

    def close(self) -> None:
        """Release the ONNX Runtime sessions (the model's, a CNN detector's) and the detector; any later use
        raises ClosedError. Closing twice is harmless."""
        self.model = self.detector = _Closed()

    @property
    def closed(self) -> bool:
        return isinstance(self.model, _Closed)

    def __enter__(self) -> FaceLandmarker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

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
        """All faces of one image in FACE_ORDER (`max_faces`: the first N); [] when there is none.

        `image`: a numpy array in `color` order ("bgr" as cv2.imread gives, "rgb", "gray"; any case), a PIL
        image, or a file path (facemark.imageio.image_to_gray; a URL is not fetched)."""
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
        """`detect_full` of several images: one Detections per image, in input order, each a sequence of its
        faces equal to a one-by-one call. Conversion and Haar run on `workers` threads (OpenCV releases the
        GIL; default: the core count), the landmark model once per pass for the faces of all images together
        (batches of up to the model's max_batch_size).

        An image that cannot be read or converted (None, a wrong dtype or shape, a missing or corrupt file)
        does not fail the others: its result is empty with `.error`, the one-line reason."""
        items = list(images)
        color = color_order(color)  # a wrong color is the caller's, not one image's: it raises
        count = max(1, min(workers or default_workers(), len(items)))
        if count <= 1:
            outcomes = [self._find_or_error(item, color) for item in items]
        else:
            with ThreadPoolExecutor(count, thread_name_prefix="facemark-detect") as pool:
                outcomes = list(pool.map(lambda item: self._find_or_error(item, color), items))
        done = iter(self.landmarks_for_found([o for o in outcomes if isinstance(o, Found)]))
        return [next(done) if isinstance(o, Found) else Detections.failed(o) for o in outcomes]

    def _find_or_error(self, image, color: str) -> Found | str:
        """`find`, or the one-line reason the image cannot be used."""
        try:
            return self.find(image, color)
        except ClosedError:
            raise
        except FacemarkError as exc:
            return printable(str(exc))

    def track(self, source, *, smooth: bool = True, detect_every: int = 10, full_scan_every: int | None = None,
              max_frames: int | None = None, fps: float = 30.0) -> Iterator[FrameResult]:
        """The faces of every frame of a video, as `facemark runtime video` finds them: one FrameResult per
        frame (a sequence of Face like `detect` returns, with `.index`, `.time` in seconds and `.detected`).

        `source`: a video file, a camera index (0), an rtsp:// or http(s):// URL, or an iterable of BGR frames
        (numpy arrays; their times are index / `fps`). Faces are followed from frame to frame; the detector runs
        every `detect_every` frames (every `full_scan_every`-th of those scans the whole frame, default 3) and
        when a face is lost; `smooth`: One-Euro smoothing of the points (facemark.runtime.video).

        >>> for frame_faces in landmarker.track("clip.mp4"):  # doctest: +SKIP
        ...     print(frame_faces.index, len(frame_faces))
        """
        from facemark.runtime.video import DEFAULT_FULL_SCAN_EVERY, track

        return track(self, source, smooth=smooth, detect_every=detect_every, max_frames=max_frames, fps=fps,
                     full_scan_every=DEFAULT_FULL_SCAN_EVERY if full_scan_every is None else full_scan_every)

    def find(self, image, color: str = "bgr", near: Sequence[Box] | None = None) -> Found:
        """The first half of `detect_full`: the grayscale image and its detections (no model call);
        `near`: search only around these boxes."""
        t0 = time.perf_counter()
        detector, color = self.detector, color_order(color)
        gray, seen = image_to_gray_and_bgr(image, color) if detector.color else (image_to_gray(image, color),) * 2
        found = detector.detect(seen) if near is None else detector.detect_near(seen, near)
        detections = sorted(found, key=lambda d: -d.score)  # FACE_ORDER's ties (stable: equal scores as found)
        if self.max_faces is not None and not self.by_presence:  # no model call for faces max_faces drops
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
            if self.by_presence:  # FACE_ORDER (a stable sort: equal scores keep the detector's order)
                faces = sorted(faces, key=lambda face: -presence_rank(face.score))
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


def _documented_signature() -> inspect.Signature:
    """FaceLandmarker's signature as help() and editors show it: its own keywords, then every option (one
    source: facemark.runtime.options) with its default, instead of **settings."""
    own = [p for p in inspect.signature(FaceLandmarker.__init__).parameters.values() if p.kind != p.VAR_KEYWORD]
    defaults = RuntimeOptions()
    options = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                 default=getattr(defaults.detection if hasattr(defaults.detection, name)
                                                 else defaults.pipeline, name))
               for name in SETTING_NAMES if name != "detector"]
    return inspect.Signature([*own, *options])


FaceLandmarker.__init__.__signature__ = _documented_signature()
