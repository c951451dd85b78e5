"""Torch-free evaluation: any predictor (eager checkpoint or ONNX model) over annotated faces -> NME report.

The crops go through exactly the runtime's preprocessing (`CropContract.prepare`), never a training cache,
so the figures are those of what is deployed.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from facemark.contract import Box, box_from_landmarks
from facemark.data import FaceRecord
from facemark.errors import ImageError
from facemark.fileio import write_text_atomic
from facemark.imageio import read_gray
from facemark.inference import CropPredictor, predict_faces
from facemark.metrics import DEFAULT_THRESHOLD, nme_per_face, summarize

# Finds the box of `record`'s face in its grayscale image; None when the face is not found.
BoxSource = Callable[[np.ndarray, FaceRecord], Box | None]


def ground_truth_box(gray: np.ndarray, record: FaceRecord) -> Box:
    return box_from_landmarks(record.landmarks)


@dataclass
class Evaluation:
    keys: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)  # NME per evaluated face
    predictions: list[np.ndarray] = field(default_factory=list, repr=False)
    face_scores: list[float] = field(default_factory=list)  # presence score per evaluated face, if any
    missed: list[str] = field(default_factory=list)  # keys whose face the box source did not find
    unreadable: list[str] = field(default_factory=list)  # one line per image that could not be read
    total: int = 0

    def summary(self, threshold: float = DEFAULT_THRESHOLD) -> dict:
        s = summarize(np.asarray(self.errors), threshold)
        readable = self.total - len(self.unreadable)
        s["detection_rate"] = (readable - len(self.missed)) / readable if readable else float("nan")
        s["unreadable"] = len(self.unreadable)
        return s

    def to_csv(self) -> str:
        return per_face_csv(zip(self.keys, self.images, self.errors, strict=True), self.missed)


def per_face_csv(found: Iterable[tuple[str, str, float]], missed: Iterable[str]) -> str:
    """key,image,nme: one row per scored face, then `missed` for each face that was not found."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["key", "image", "nme"])
    for key, image, err in found:
        writer.writerow([key, image, f"{err:.6f}"])
    for key in missed:
        writer.writerow([key, "", "missed"])
    return buf.getvalue()


def evaluate(
    predictor: CropPredictor,
    records: Sequence[FaceRecord],
    box_source: BoxSource = ground_truth_box,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    refine: int = 0,
    flip: bool = False,
) -> Evaluation:
    """Predict every record's face through the deployed preprocessing (facemark.inference: the runtime's
    refinement passes and test-time flip) and measure NME."""
    result = Evaluation(total=len(records))
    pending: list[tuple[FaceRecord, np.ndarray, Box]] = []

    def flush() -> None:
        if not pending:
            return
        faces = predict_faces(predictor, [(gray, box) for _, gray, box in pending], refine, flip)
        for (record, _, _), face in zip(pending, faces, strict=True):
            result.keys.append(record.key)
            result.images.append(str(record.image_path))
            result.errors.append(float(nme_per_face(face.landmarks, record.landmarks)[0]))
            result.predictions.append(face.landmarks.astype(np.float32))
            if face.face_score is not None:
                result.face_scores.append(face.face_score)
        pending.clear()

    for record in records:
        try:
            gray = read_gray(record.image_path)
        except ImageError as exc:  # reported and skipped: the rest of the evaluation goes on
            result.unreadable.append(str(exc))
            if progress:
                progress(1)
            continue
        box = box_source(gray, record)
        if box is None:
            result.missed.append(record.key)
        else:
            pending.append((record, gray, box))
            if len(pending) >= batch_size:
                flush()
        if progress:
            progress(1)
    flush()
    return result


def write_reports(
    doc: dict,
    per_face_csv_text: str,
    errors: Sequence[float],
    json_path: str | os.PathLike | None = None,
    csv_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    label: str = "model",
) -> None:
    """Write the requested report files (atomically): the summary `doc` as JSON, the per-face CSV, the CED plot
    of `errors` (NME per scored face)."""
    from facemark.outputs import utf8_strings, utf8_text

    if json_path:  # file names of any bytes: as UTF-8 text (facemark.outputs), never a failed write
        write_text_atomic(json_path, json.dumps(utf8_strings(doc), indent=2) + "\n")
    if csv_path:
        write_text_atomic(csv_path, utf8_text(per_face_csv_text))
    if plot_path:
        from facemark.plots import plot_ced

        plot_ced({label: np.asarray(errors)}, plot_path)
