"""Detector box -> training box calibration (docs/DESIGN.md section 2).

Every detector's boxes are mapped the same way (runtime/detectors.py). Haar boxes, for example, are square,
sit higher and are wider than the landmarks' tight bounding box the network was trained on. `fit_calibration`
runs the detector on annotated faces, pairs each face with its best-overlapping detection and fits core
`BoxCalibration` (a robust median of centre shift and size ratios); the export stage stores Haar's in the model
metadata (`facemark.detector_calibration`), `facemark detectors calibrate` a CNN detector's in
runtime/detector_calibrations.json, and the runtime applies it to every box.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from facemark.contract import Box, BoxCalibration, box_from_landmarks, box_iou
from facemark.data import FaceRecord
from facemark.errors import DataError, FacemarkError
from facemark.imageio import read_image
from facemark.runtime.detector import Detection

if TYPE_CHECKING:
    from facemark.runtime.detectors import FaceDetector

DEFAULT_MIN_IOU = 0.3
# A median of a few hundred matched boxes is stable to ~0.002 of the box size; all 1807 cost minutes of Haar.
CALIBRATION_FIT_FACES = 500


def match_detection(detections: Sequence[Detection], target_box: Box, min_iou: float = DEFAULT_MIN_IOU
                    ) -> Detection | None:
    """The detection overlapping `target_box` (a landmark box) best, if its IoU reaches `min_iou`."""
    best, best_iou = None, min_iou
    for detection in detections:
        iou = box_iou(detection.box, target_box)
        if iou >= best_iou:
            best, best_iou = detection, iou
    return best


def haar_box_source(detector: FaceDetector, calibration: BoxCalibration | None = None,
                    min_iou: float = DEFAULT_MIN_IOU) -> Callable[[np.ndarray, FaceRecord], Box | None]:
    """A facemark.evaluation BoxSource: the record's face as the detector finds it (matched to the landmark box),
    mapped by `calibration` (None = raw detector box); None when the detector misses the face."""

    def source(gray: np.ndarray, record: FaceRecord) -> Box | None:
        found = match_detection(detector.detect(gray), box_from_landmarks(record.landmarks), min_iou)
        if found is None:
            return None
        return found.box if calibration is None else calibration.apply(found.box)

    return source


def detect_records(
    records: Sequence[FaceRecord],
    detector: FaceDetector,
    min_iou: float = DEFAULT_MIN_IOU,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[FaceRecord, Detection | None]]:
    """Each record with its matched detection (None when missed). Each image is searched once."""
    cache: dict[str, list[Detection]] = {}
    pairs: list[tuple[FaceRecord, Detection | None]] = []
    for record in records:
        key = str(record.image_path)
        if key not in cache:
            try:
                cache[key] = detector.detect(read_image(record.image_path))  # colour for detectors that use it
            except FacemarkError as exc:
                if warn is None:
                    raise
                warn(str(exc))
                cache[key] = []
        pairs.append((record, match_detection(cache[key], box_from_landmarks(record.landmarks), min_iou)))
        if progress:
            progress(1)
    return pairs


def fit_calibration(
    records: Sequence[FaceRecord],
    detector: FaceDetector,
    min_iou: float = DEFAULT_MIN_IOU,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> BoxCalibration:
    """Fit the detector -> landmark-box calibration on annotated faces (use training faces, not validation)."""
    pairs = [(r, d) for r, d in detect_records(records, detector, min_iou, warn, progress) if d is not None]
    if not pairs:
        raise DataError(f"calibration: the detector found none of the {len(records)} annotated faces")
    return BoxCalibration.fit([d.box for _, d in pairs], [box_from_landmarks(r.landmarks) for r, _ in pairs],
                              detector=detector.name)
