"""Distillation targets: a teacher model's most accurate predictions blended into the training targets.

`train --teacher MODEL.onnx --distill W` runs the teacher's `accurate` preset (facemark.runtime.options.PRESETS:
two landmark passes with test-time flip, about 0.1 NME points better than one pass) once on every cached training
face, starting from its landmark box, and trains a one-pass student towards
(1 - W) x the annotation + W x the teacher's points. The points live in the face cache's coordinates, so every
augmentation (rotation, zoom, flip, detector-like crops) carries the blended target with the pixels, as it carries
the annotation. Validation still scores against the annotation.
"""

from __future__ import annotations

import numpy as np

from facemark.contract import box_from_landmarks
from facemark.inference import predict_faces
from facemark.runtime.options import PRESETS
from facemark.runtime.session import LandmarkModel
from facemark.train.dataset import FaceCache

TEACHER_BATCH = 64


def teacher_points(cache: FaceCache, teacher: str) -> np.ndarray:
    """(N, 68, 2): the teacher's accurate-preset landmarks of every cached face, in cache pixels."""
    model = LandmarkModel(teacher, provider="cpu")
    preset = PRESETS["accurate"]
    faces = [(crop, box_from_landmarks(points)) for crop, points in zip(cache.crops, cache.points, strict=True)]
    out = np.empty_like(cache.points)
    for start in range(0, len(faces), TEACHER_BATCH):
        chunk = predict_faces(model, faces[start : start + TEACHER_BATCH], refine=preset["refine"],
                              flip=preset["tta"] == "flip")
        out[start : start + len(chunk)] = [p.landmarks for p in chunk]
    return out


def distill_targets(cache: FaceCache, teacher: str, weight: float) -> np.ndarray:
    """The cache's targets blended with the teacher's points: (1 - weight) x annotation + weight x teacher."""
    return ((1.0 - weight) * cache.points + weight * teacher_points(cache, teacher)).astype(np.float32)
