"""The preprocessing contract shared by train, export and runtime (docs/DESIGN.md section 2).

Every number of the crop lives in `CropContract`; it travels inside checkpoints and ONNX metadata as JSON.

Conventions:
- Points are 0-based image pixels with pixel centres at integer coordinates (cv2.warpAffine's convention).
- A face box is (x, y, w, h). Training boxes are the tight bounding box of the 68 landmarks
  (`box_from_landmarks`); detector boxes are mapped onto that convention by a `BoxCalibration`.
- The crop is the square of side `scale * max(w, h)` centred on the box, warped by one affine matrix M
  (image -> crop, 2x3) to `size x size` grayscale; outside the image it is `border_value`.
- Network input: `(pixel / 255 - mean) / std`, float32 N x 1 x size x size.
- Network output / target: crop pixel coordinates q as `q / size - 0.5` (about [-0.5, 0.5]), 68 x 2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

Box = tuple[float, float, float, float]  # x, y, w, h in image pixels


def box_from_landmarks(points: np.ndarray) -> Box:
    """The training box convention: the tight bounding box of the landmarks."""
    lo = points.min(axis=0)
    hi = points.max(axis=0)
    return float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points (..., 2) through a 2x3 affine matrix."""
    m = np.asarray(matrix, dtype=np.float64)
    return points @ m[:, :2].T + m[:, 2]


@dataclass(frozen=True)
class CropContract:
    size: int = 224
    scale: float = 1.25
    mean: float = 0.5
    std: float = 0.5
    border_value: int = 0
    # Sources downscaled by more than this factor are first shrunk with INTER_AREA (anti-aliasing),
    # so that a big face in a 4K photo and a small one in a 480 px crop look alike to the network.
    max_linear_shrink: float = 2.0

    # --- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> CropContract:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> CropContract:
        return cls.from_dict(json.loads(text))

    # --- geometry ------------------------------------------------------------------------------------
    def crop_matrix(self, box: Box) -> np.ndarray:
        """The affine matrix M (2x3, image -> crop) of the square crop around `box`."""
        x, y, w, h = box
        side = self.scale * max(w, h, 1.0)
        s = self.size / side
        cx, cy = x + w / 2.0, y + h / 2.0
        # Crop pixel i covers [i - 0.5, i + 0.5]: the square's left edge maps to -0.5.
        return np.array(
            [[s, 0.0, -s * (cx - side / 2.0) - 0.5], [0.0, s, -s * (cy - side / 2.0) - 0.5]],
            dtype=np.float64,
        )

    def warp(self, gray: np.ndarray, matrix: np.ndarray, out_size: int | None = None) -> np.ndarray:
        """Warp a grayscale uint8 image by `matrix` to a square of `out_size` (default: `size`)."""
        out = self.size if out_size is None else out_size
        m = np.asarray(matrix, dtype=np.float64)
        shrink = 1.0 / max(np.sqrt(abs(np.linalg.det(m[:, :2]))), 1e-12)
        if shrink > self.max_linear_shrink:
            gray, m = _preshrink(gray, m, shrink, out)
        return cv2.warpAffine(
            gray,
            m,
            (out, out),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=self.border_value,
        )

    def normalize(self, crops: np.ndarray) -> np.ndarray:
        """uint8 crops (N, S, S) or (S, S) -> float32 network input (N, 1, S, S)."""
        c = np.asarray(crops)
        if c.ndim == 2:
            c = c[None]
        return ((c.astype(np.float32) / 255.0 - self.mean) / self.std)[:, None]

    def encode_points(self, points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """Image points (..., 68, 2) -> normalised network targets."""
        return (apply_affine(matrix, points) / self.size - 0.5).astype(np.float32)

    def decode_points(self, output: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """Normalised network output (68, 2) -> image points, through the inverse of `matrix`."""
        crop_points = (np.asarray(output, dtype=np.float64) + 0.5) * self.size
        return apply_affine(invert_affine(matrix), crop_points)

    def prepare(self, gray: np.ndarray, boxes: Sequence[Box]) -> tuple[np.ndarray, list[np.ndarray]]:
        """All faces of one image -> one network batch (N, 1, S, S) and their matrices."""
        matrices = [self.crop_matrix(b) for b in boxes]
        if not matrices:
            return np.zeros((0, 1, self.size, self.size), np.float32), []
        crops = np.stack([self.warp(gray, m) for m in matrices])
        return self.normalize(crops), matrices


def _preshrink(gray: np.ndarray, m: np.ndarray, shrink: float, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Shrink only the source region the crop needs with INTER_AREA, and adjust M to match."""
    inv = invert_affine(m)
    corners = apply_affine(inv, np.array([[-1, -1], [out, -1], [-1, out], [out, out]], np.float64))
    h, w = gray.shape[:2]
    x0, y0 = np.floor(corners.min(axis=0)).astype(int)
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return gray, m
    factor = 1.0 / shrink
    roi = gray[y0:y1, x0:x1]
    rw, rh = max(int(round(roi.shape[1] * factor)), 1), max(int(round(roi.shape[0] * factor)), 1)
    small = cv2.resize(roi, (rw, rh), interpolation=cv2.INTER_AREA)
    fx, fy = rw / roi.shape[1], rh / roi.shape[0]
    # small pixel (u, v) <- roi pixel ((u + 0.5) / f - 0.5): compose M with that map.
    to_roi = np.array([[1 / fx, 0, 0.5 / fx - 0.5 + x0], [0, 1 / fy, 0.5 / fy - 0.5 + y0]], np.float64)
    m_small = m[:, :2] @ to_roi[:, :2]
    t_small = m[:, :2] @ to_roi[:, 2] + m[:, 2]
    return small, np.hstack([m_small, t_small[:, None]])


@dataclass(frozen=True)
class BoxCalibration:
    """Maps a detector's box onto the training box convention (landmark bounding box).

    centre' = centre + (dx * w, dy * h); size' = (sw * w, sh * h). Identity by default.
    """

    dx: float = 0.0
    dy: float = 0.0
    sw: float = 1.0
    sh: float = 1.0
    detector: str = "identity"
    samples: int = 0

    def apply(self, box: Box) -> Box:
        x, y, w, h = box
        cx, cy = x + w / 2 + self.dx * w, y + h / 2 + self.dy * h
        nw, nh = self.sw * w, self.sh * h
        return cx - nw / 2, cy - nh / 2, nw, nh

    @classmethod
    def fit(cls, detected: Sequence[Box], target: Sequence[Box], detector: str) -> BoxCalibration:
        """Robust (median) fit of the four parameters from matched detector / target box pairs."""
        d = np.asarray(detected, dtype=np.float64).reshape(-1, 4)
        t = np.asarray(target, dtype=np.float64).reshape(-1, 4)
        if len(d) == 0 or len(d) != len(t):
            raise ValueError("calibration needs matched, non-empty box lists")
        dcx, dcy = d[:, 0] + d[:, 2] / 2, d[:, 1] + d[:, 3] / 2
        tcx, tcy = t[:, 0] + t[:, 2] / 2, t[:, 1] + t[:, 3] / 2
        return cls(
            dx=float(np.median((tcx - dcx) / d[:, 2])),
            dy=float(np.median((tcy - dcy) / d[:, 3])),
            sw=float(np.median(t[:, 2] / d[:, 2])),
            sh=float(np.median(t[:, 3] / d[:, 3])),
            detector=detector,
            samples=len(d),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BoxCalibration:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def box_iou(a: Box, b: Box) -> float:
    ax1, ay1, aw, ah = a
    bx1, by1, bw, bh = b
    ix = max(0.0, min(ax1 + aw, bx1 + bw) - max(ax1, bx1))
    iy = max(0.0, min(ay1 + ah, by1 + bh) - max(ay1, by1))
    inter = ix * iy
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def non_max_suppression(boxes: Sequence[Box], scores: Sequence[float], max_iou: float = 0.5) -> list[int]:
    """Greedy non-maximum suppression: indices of the boxes kept, highest score first (ties: the earlier box);
    a box overlapping an already kept one by IoU `max_iou` or more is dropped."""
    kept: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(box_iou(boxes[i], boxes[k]) < max_iou for k in kept):
            kept.append(i)
    return kept
