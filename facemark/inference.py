"""Faces in boxes -> landmarks in image pixels, with refinement passes and test-time flip (torch-free).

One implementation for every consumer: the runtime (`FaceLandmarker.detect`, video tracking) and evaluation
(`facemark evaluate`, the benchmarks), so a figure measured there is what the runtime does.

- Refinement: after a pass, each face is cropped again on the tight box of its predicted landmarks -- the
  training convention (CropContract) -- and predicted again, `refine` times. A detector box is off by about
  10 % of the face in x (measured: facemark.benchmarks.studies.box_noise); the landmark box of a first pass is not.
- Test-time flip: each crop is also predicted mirrored (one batch for both), the mirrored points are flipped
  back with the scheme's permutation and the two are averaged.
- Scores (`landmark_scores`, `face_score`) come from the last pass, whose crop matches training's best.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from facemark.contract import Box, CropContract, box_from_landmarks
from facemark.metadata import FACE_SCORE, LANDMARK_SCORES, OUTPUT_NAME
from facemark.scheme import FLIP_PERMUTATION


class CropPredictor(Protocol):
    """Normalised crops (N, 1, S, S) float32 -> normalised landmarks (N, 68, 2); models with score outputs
    also offer `predict_outputs(batch) -> {name: array}` (facemark.runtime.session.LandmarkModel)."""

    contract: CropContract

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass
class FacePrediction:
    landmarks: np.ndarray  # (68, 2) float64, image pixels
    box: Box  # the box of the last pass's crop
    landmark_scores: np.ndarray | None = None  # (68,) in [0, 1]
    face_score: float | None = None  # in [0, 1]


def run_outputs(predictor: CropPredictor, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Every output the predictor has, by ONNX name (`landmarks` only for a plain CropPredictor)."""
    extended = getattr(predictor, "predict_outputs", None)
    if extended is not None:
        return extended(batch)
    return {OUTPUT_NAME: predictor.predict(batch)}


def _flip_outputs(outputs: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Outputs of mirrored crops -> the unmirrored face: x' = size - 1 - x in crop pixels, points permuted."""
    perm = np.asarray(FLIP_PERMUTATION)
    out = dict(outputs)
    points = outputs[OUTPUT_NAME][:, perm].copy()
    points[..., 0] = -points[..., 0] - 1.0 / size
    out[OUTPUT_NAME] = points
    if LANDMARK_SCORES in outputs:
        out[LANDMARK_SCORES] = outputs[LANDMARK_SCORES][:, perm]
    return out


def predict_crops(predictor: CropPredictor, batch: np.ndarray, flip: bool = False) -> dict[str, np.ndarray]:
    """Outputs for a batch of network inputs; with `flip`, the mean of the crop and its mirror image."""
    if not flip or len(batch) == 0:
        return run_outputs(predictor, batch)
    both = run_outputs(predictor, np.concatenate([batch, batch[..., ::-1]]))
    n = len(batch)
    plain = {k: v[:n] for k, v in both.items()}
    mirrored = _flip_outputs({k: v[n:] for k, v in both.items()}, predictor.contract.size)
    return {k: (plain[k] + mirrored[k]) / 2 for k in plain}


def predict_faces(predictor: CropPredictor, faces: Sequence[tuple[np.ndarray, Box]], refine: int = 0,
                  flip: bool = False) -> list[FacePrediction]:
    """Landmarks for (grayscale image, box) pairs -- any mix of images -- in one model call per pass."""
    if refine < 0:
        raise ValueError(f"refine must be >= 0 (got {refine})")
    if not faces:
        return []
    contract = predictor.contract
    grays = [g for g, _ in faces]
    boxes = [tuple(float(v) for v in b) for _, b in faces]
    for step in range(refine + 1):
        matrices = [contract.crop_matrix(b) for b in boxes]
        batch = contract.normalize(np.stack([contract.warp(g, m) for g, m in zip(grays, matrices, strict=True)]))
        outputs = predict_crops(predictor, batch, flip)
        points = [contract.decode_points(o, m) for o, m in zip(outputs[OUTPUT_NAME], matrices, strict=True)]
        if step < refine:
            boxes = [box_from_landmarks(p) for p in points]
    scores = outputs.get(LANDMARK_SCORES)
    presence = outputs.get(FACE_SCORE)
    return [FacePrediction(points[i], boxes[i], None if scores is None else scores[i],
                           None if presence is None else float(presence[i])) for i in range(len(points))]
