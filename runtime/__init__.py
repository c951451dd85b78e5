"""facemark.runtime: the torch-free pipeline (a face detector: OpenCV's Haar cascade or an ONNX CNN; the ONNX Runtime
landmark model).

Names are imported on first use, so `facemark runtime --help` does not load onnxruntime.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FaceLandmarker": "landmarker",
    "Face": "landmarker",
    "DEFAULT_MODEL_PATH": "landmarker",
    "FaceTracker": "video",
    "FrameResult": "video",
    "LandmarkModel": "session",
    "available_providers": "session",
    "resolve_providers": "session",
    "HaarDetector": "detector",
    "Detection": "detector",
    "FaceDetector": "detectors",
    "create_detector": "detectors",
    "DETECTOR_NAMES": "detectors",
    "match_detection": "calibration",
    "fit_calibration": "calibration",
    "Detections": "landmarker",  # detect_many's per-image result: a sequence of faces with .error
    "RuntimeOptions": "options",
    "DetectorOptions": "options",
    "PipelineOptions": "options",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"facemark.runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'facemark.runtime' has no attribute {name!r}")
