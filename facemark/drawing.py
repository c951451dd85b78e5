"""Annotated pictures: points as in the tutorial, or the face contours of the 68-point scheme."""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from facemark.contract import Box
from facemark.scheme import CONTOURS

DrawMode = Literal["points", "contours", "none"]


def draw_face(image: np.ndarray, landmarks: np.ndarray, box: Box | None = None, mode: DrawMode = "points") -> None:
    """Draw one face in place on a BGR image; sizes follow the face so they read at any resolution."""
    if mode == "none":
        return
    pts = np.asarray(landmarks, dtype=np.float64)
    span = float(np.ptp(pts[:, 0]) + np.ptp(pts[:, 1])) / 2 if len(pts) else 100.0
    thickness = max(1, int(round(span / 150)))
    if box is not None:
        x, y, w, h = (int(round(v)) for v in box)
        cv2.rectangle(image, (x, y), (x + w, y + h), (255, 160, 0), thickness, cv2.LINE_AA)
    if mode == "contours":
        for indices, closed in CONTOURS:
            poly = np.round(pts[list(indices)] * 16).astype(np.int32)  # 4 fractional bits
            cv2.polylines(image, [poly], closed, (0, 255, 255), thickness, cv2.LINE_AA, shift=4)
    radius = max(1, int(round(span / 120)))
    for x, y in pts:
        cv2.circle(image, (int(round(x * 16)), int(round(y * 16))), radius * 16, (0, 255, 0), -1, cv2.LINE_AA,
                   shift=4)
