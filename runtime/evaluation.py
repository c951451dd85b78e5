"""End-to-end evaluation of the deployed pipeline: what `FaceLandmarker.detect` gives a user, scored.

For each annotated face: run the whole pipeline on its photo (Haar, calibration, refinement passes, test-time
flip, presence score), match the annotated face to a detection (raw Haar box IoU >= 0.3 with the landmark
box, as the calibration fit does), NME of the matched face. Detections are kept *before* the presence
threshold, so one run gives the figures at any threshold.

False faces are counted on face-free background crops of the same photos: the strips left, right, above and
below every annotated face of the photo (other faces of a 300-W photo via facemark.data.other_faces), at
least `MIN_BACKGROUND_SIDE` pixels on each side. Every detection there is a false face. The presence score's
ROC AUC is measured between matched true faces and those false faces.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from facemark.contract import Box, box_from_landmarks
from facemark.data import FaceRecord, other_faces
from facemark.errors import ImageError
from facemark.evaluation import per_face_csv
from facemark.imageio import read_image
from facemark.metrics import DEFAULT_THRESHOLD, nme_per_face, roc_auc, summarize
from facemark.runtime.calibration import DEFAULT_MIN_IOU, match_detection
from facemark.runtime.detector import Detection
from facemark.runtime.landmarker import Face, FaceLandmarker

MIN_BACKGROUND_SIDE = 48
BACKGROUND_MARGIN = 0.15  # keep this share of the face size clear around every face


@dataclass
class PipelineEvaluation:
    errors: list[float] = field(default_factory=list)  # NME of each found face
    found: list[tuple[str, str]] = field(default_factory=list)  # (key, image) of each found face
    missed: list[str] = field(default_factory=list)  # keys of the annotated faces no detection matched
    true_scores: list[float | None] = field(default_factory=list)  # presence of each found face (None: no head)
    false_scores: list[float | None] = field(default_factory=list)  # one per false face (None: no presence head)
    faces: int = 0  # annotated faces evaluated (readable photos)
    background_crops: int = 0
    unreadable: list[str] = field(default_factory=list)

    def summary(self, min_score: float | None = None, threshold: float = DEFAULT_THRESHOLD) -> dict:
        """Detection rate, NME of found faces and false faces per background crop at a presence threshold."""
        errors = np.asarray(self.kept_errors(min_score))
        false = sum(1 for s in self.false_scores if _kept(s, min_score))
        positives = [s for s in self.true_scores if s is not None]
        negatives = [s for s in self.false_scores if s is not None]
        scored = bool(positives) and bool(negatives)
        return {
            **summarize(errors, threshold),
            "annotated_faces": self.faces,
            "detection_rate": len(errors) / self.faces if self.faces else float("nan"),
            "background_crops": self.background_crops,
            "false_faces": false,
            "false_faces_per_crop": false / self.background_crops if self.background_crops else float("nan"),
            "presence_auc": roc_auc(positives, negatives) if scored else None,
            "min_score": min_score,
        }

    def to_csv(self, min_score: float | None = None) -> str:
        """Per-face NME (facemark.evaluation.per_face_csv); a face whose presence is below `min_score` is
        missed, as the runtime drops it."""
        kept = [(key, image, err) for (key, image), err, s in zip(self.found, self.errors, self.true_scores,
                                                                  strict=True) if _kept(s, min_score)]
        dropped = [key for (key, _), s in zip(self.found, self.true_scores, strict=True) if not _kept(s, min_score)]
        return per_face_csv(kept, [*self.missed, *dropped])

    def kept_errors(self, min_score: float | None = None) -> list[float]:
        """NME of the found faces that pass the presence threshold."""
        return [e for e, s in zip(self.errors, self.true_scores, strict=True) if _kept(s, min_score)]



def _kept(score: float | None, min_score: float | None) -> bool:
    """A face survives the presence threshold (always, without a threshold or a presence head)."""
    return min_score is None or score is None or score >= min_score


def background_boxes(width: int, height: int, faces: Sequence[Box]) -> list[tuple[int, int, int, int]]:
    """Face-free strips (x, y, w, h) of an image: left/right/above/below the union of its faces (+ margin)."""
    if not faces:
        return [(0, 0, width, height)]
    boxes = np.asarray(faces, dtype=np.float64)
    pad = BACKGROUND_MARGIN * np.maximum(boxes[:, 2], boxes[:, 3])
    x0 = int(max(0, np.floor((boxes[:, 0] - pad).min())))
    y0 = int(max(0, np.floor((boxes[:, 1] - pad).min())))
    x1 = int(min(width, np.ceil((boxes[:, 0] + boxes[:, 2] + pad).max())))
    y1 = int(min(height, np.ceil((boxes[:, 1] + boxes[:, 3] + pad).max())))
    strips = [(0, 0, x0, height), (x1, 0, width - x1, height), (0, 0, width, y0), (0, y1, width, height - y1)]
    return [s for s in strips if min(s[2], s[3]) >= MIN_BACKGROUND_SIDE]


def evaluate_pipeline(landmarker: FaceLandmarker, records: Sequence[FaceRecord],
                      progress: Callable[[int], None] | None = None) -> PipelineEvaluation:
    """Run `landmarker` (a copy with its presence threshold off) on each record's photo and background."""
    result = PipelineEvaluation()
    landmarker = with_settings(landmarker, min_score=None)
    siblings = other_faces(records)
    for record, others in zip(records, siblings, strict=True):
        try:
            image = read_image(record.image_path)
        except ImageError as exc:
            result.unreadable.append(str(exc))
            if progress:
                progress(1)
            continue
        result.faces += 1
        target = box_from_landmarks(record.landmarks)
        faces = landmarker.detect(image)
        matched = _match(faces, target)
        if matched is None:
            result.missed.append(record.key)
        else:
            result.errors.append(float(nme_per_face(matched.landmarks, record.landmarks)[0]))
            result.true_scores.append(matched.score)
            result.found.append((record.key, str(record.image_path)))
        height, width = image.shape[:2]
        for x, y, w, h in background_boxes(width, height, [target, *others]):
            result.background_crops += 1
            for face in landmarker.detect(np.ascontiguousarray(image[y:y + h, x:x + w])):
                result.false_scores.append(face.score)
        if progress:
            progress(1)
    return result


def _match(faces: Sequence[Face], target: Box) -> Face | None:
    """The face whose raw detector box overlaps the annotated landmark box best (IoU >= 0.3)."""
    detections = [Detection(f.detector_box, 1.0) for f in faces if f.detector_box is not None]
    best = match_detection(detections, target, DEFAULT_MIN_IOU)
    if best is None:
        return None
    return next(f for f in faces if f.detector_box == best.box)


def with_settings(landmarker: FaceLandmarker, **changes) -> FaceLandmarker:
    """A shallow copy of `landmarker` that shares its model (one ONNX session) with other settings:
    `refine`, `flip`, `min_score`, `detector`."""
    unknown = set(changes) - {"refine", "flip", "min_score", "detector", "calibration"}
    if unknown:
        raise TypeError(f"cannot change {sorted(unknown)}")
    clone = copy.copy(landmarker)
    for name, value in changes.items():
        setattr(clone, name, value)
    return clone
