"""CNN face detectors on ONNX Runtime (docs/DESIGN.md section 7): CenterFace and FaceBoxesV2.

Each takes the image scaled so that its longer side is `input_side` (padded to a multiple of 32 at the bottom
and right, so boxes only need the one scale back), on the same session options and providers as the landmark
model (runtime/session.py). FaceLandmarker hands them the colour image (on gray copies they lose most small
faces: docs/DETECTORS.md); a grayscale image is given as three equal channels.
Outputs are decoded in numpy, vectorised: CenterFace's stride-4 heatmap / scale / offset maps, FaceBoxesV2's SSD
priors with variance decoding; then non-maximum suppression at IoU 0.3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from facemark.contract import Box, BoxCalibration
from facemark.runtime.detector import ROI_MARGIN, Detection
from facemark.runtime.detector_files import DetectorFile, read_detector_file, with_dynamic_input

STRIDE_MULTIPLE = 32  # both networks downsample by 32: sides are padded to a multiple of it
NMS_IOU = 0.3
MAX_CANDIDATES = 500  # boxes above the score threshold kept for NMS, best first

Decoder = Callable[[list[np.ndarray], tuple[int, int], float], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class CnnSpec:
    """Everything one CNN detector needs; adding a detector is one of these in runtime/detectors.py."""

    file: DetectorFile
    input_name: str
    mean: tuple[float, float, float]  # subtracted per channel, in the channel order below
    rgb: bool  # channel order of the input (False: BGR)
    decode: Decoder  # outputs, (input height, width), score threshold -> (xyxy boxes, scores) in input pixels
    input_side: int  # default longer side of the network input
    min_score: float  # default score threshold
    calibration: BoxCalibration | None  # onto the landmark-box convention (runtime/detector_calibrations.json)
    licence: str
    source: str


def non_max_suppression_xyxy(boxes: np.ndarray, scores: np.ndarray, max_iou: float = NMS_IOU) -> np.ndarray:
    """Indices kept by greedy NMS over (N, 4) x0, y0, x1, y1 boxes, best score first (one vectorised IoU row per
    kept box)."""
    order = np.argsort(-scores, kind="stable")
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    kept = []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(best)
        width = np.clip(np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0]), 0,
                        None)
        height = np.clip(np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1]), 0,
                         None)
        inter = width * height
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        order = rest[iou < max_iou]
    return np.asarray(kept, dtype=np.int64)


def decode_centerface(outputs: list[np.ndarray], size: tuple[int, int], threshold: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """CenterFace's maps (heatmap [1,1,h,w], log-scale [1,2,h,w] as height/width, offset [1,2,h,w] as y/x; all at
    stride 4) -> xyxy boxes and scores in input pixels. The five points (the fourth output) are not needed."""
    heatmap, scale, offset = outputs[0][0, 0], outputs[1][0], outputs[2][0]
    ys, xs = np.nonzero(heatmap > threshold)
    height, width = np.exp(scale[0, ys, xs]) * 4, np.exp(scale[1, ys, xs]) * 4
    cx, cy = (xs + offset[1, ys, xs] + 0.5) * 4, (ys + offset[0, ys, xs] + 0.5) * 4
    boxes = np.stack([cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2], axis=1)
    return boxes.astype(np.float64), heatmap[ys, xs].astype(np.float64)


# FaceBoxesV2 (PIPNet's FaceBoxes): anchors of 32/64/128 px on the stride-32 map (densified 4x4 and 2x2 per
# cell), 256 px at stride 64, 512 px at stride 128; SSD variances 0.1 (centre) and 0.2 (size).
FACEBOXES_ANCHORS = ((32, ((32, 4), (64, 2), (128, 1))), (64, ((256, 1),)), (128, ((512, 1),)))
FACEBOXES_VARIANCE = (0.1, 0.2)


def faceboxes_priors(height: int, width: int) -> np.ndarray:
    """(P, 4) priors cx, cy, w, h in input pixels, in the network's output order (per map; per cell row-major;
    per anchor size; per dense offset row-major)."""
    parts = []
    for step, anchors in FACEBOXES_ANCHORS:
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cell_y, cell_x = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        per_cell = []
        for size, dense in anchors:
            shifts = np.arange(dense) / dense if dense > 1 else np.array([0.5])  # PIPNet's dense offsets
            dy, dx = np.meshgrid(shifts, shifts, indexing="ij")
            cx = (cell_x[..., None] + dx.reshape(-1)) * step
            cy = (cell_y[..., None] + dy.reshape(-1)) * step
            wh = np.full(cx.shape, float(size))
            per_cell.append(np.stack([cx, cy, wh, wh], axis=-1))  # rows, cols, dense^2, 4
        parts.append(np.concatenate(per_cell, axis=2).reshape(-1, 4))
    return np.concatenate(parts)


_PRIORS: dict[tuple[int, int], np.ndarray] = {}


def decode_faceboxes(outputs: list[np.ndarray], size: tuple[int, int], threshold: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """FaceBoxesV2's `loc` [1, P, 4] offsets and softmaxed `conf` [1, P, 2] -> xyxy boxes and scores."""
    priors = _PRIORS.get(size)
    if priors is None:
        priors = _PRIORS[size] = faceboxes_priors(*size)
    loc, scores = outputs[0][0].astype(np.float64), outputs[1][0, :, 1].astype(np.float64)
    keep = np.flatnonzero(scores > threshold)
    loc, scores, priors = loc[keep], scores[keep], priors[keep]
    centre = priors[:, :2] + loc[:, :2] * FACEBOXES_VARIANCE[0] * priors[:, 2:]
    sides = priors[:, 2:] * np.exp(loc[:, 2:] * FACEBOXES_VARIANCE[1])
    return np.concatenate([centre - sides / 2, centre + sides / 2], axis=1), scores


def network_input(gray_or_bgr: np.ndarray, spec: CnnSpec, side: int) -> tuple[np.ndarray, float]:
    """The (1, 3, H, W) float32 input (H, W multiples of 32) and the image -> input scale. The padding is the
    mean colour, so it is 0 after the mean is subtracted. Each channel plane is converted and mean-shifted
    straight into the blob (one pass per plane: OpenCV's blobFromImage took 2-4 ms at 960x720, a fifth of
    FaceBoxesV2's whole detection, docs/DETECTORS.md)."""
    height, width = gray_or_bgr.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(gray_or_bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    bottom = -(-size[1] // STRIDE_MULTIPLE) * STRIDE_MULTIPLE - size[1]
    right = -(-size[0] // STRIDE_MULTIPLE) * STRIDE_MULTIPLE - size[0]
    planes = [small] * 3 if small.ndim == 2 else list(cv2.split(small))  # B, G, R
    if spec.rgb:
        planes.reverse()
    blob = np.empty((1, 3, size[1] + bottom, size[0] + right), dtype=np.float32)
    for channel, (plane, mean) in enumerate(zip(planes, spec.mean, strict=True)):
        padded = cv2.copyMakeBorder(plane, 0, bottom, 0, right, cv2.BORDER_CONSTANT, value=mean)
        np.subtract(padded, np.float32(mean), out=blob[0, channel], casting="unsafe")
    return blob, scale


class CnnDetector:
    """One CNN detector (`spec`) on ONNX Runtime: the FaceDetector of runtime/detectors.py.

    input_side: the longer side of the network input (the speed knob; smaller faces need a larger side).
    min_score: boxes scoring below it are dropped before NMS (the landmark model's presence score removes most
        of the false boxes left). provider / threads / trt_*: as for the landmark model (runtime/session.py)."""

    color = True  # trained on colour photos: FaceLandmarker gives it the BGR image (gray only loses small faces)

    def __init__(self, name: str, spec: CnnSpec, provider: str = "auto", threads: int | None = None,
                 input_side: int | None = None, min_score: float | None = None, trt_fp16: bool = False,
                 trt_cache_dir=None, spin: bool = False) -> None:
        from facemark.runtime.session import resolve_providers, session_options, started_session

        self.name, self.spec = name, spec
        self.input_side = int(input_side or spec.input_side)
        if self.input_side < STRIDE_MULTIPLE:
            raise ValueError(f"input_side must be >= {STRIDE_MULTIPLE} (got {self.input_side})")
        self.min_score = spec.min_score if min_score is None else float(min_score)
        self.calibration = spec.calibration
        side = -(-self.input_side // STRIDE_MULTIPLE) * STRIDE_MULTIPLE
        shapes = (f"{spec.input_name}:1x3x{STRIDE_MULTIPLE}x{STRIDE_MULTIPLE}",
                  f"{spec.input_name}:1x3x{side * 3 // 4}x{side}", f"{spec.input_name}:1x3x{side}x{side}")
        providers = resolve_providers(provider, trt_fp16=trt_fp16, trt_cache_dir=trt_cache_dir, shapes=shapes)
        data = with_dynamic_input(read_detector_file(name, spec.file), spec.input_name)
        self.session = started_session(data, session_options(threads, spin), providers, name)
        self.providers: list[str] = self.session.get_providers()

    def config(self) -> dict:
        return {"name": self.name, "input_side": self.input_side, "min_score": self.min_score,
                "sha256": self.spec.file.sha256}

    def detect(self, gray: np.ndarray) -> list[Detection]:
        """Faces in a grayscale (or BGR) uint8 image, most confident first."""
        if gray.ndim not in (2, 3) or gray.size == 0:
            raise ValueError(f"{self.name}: expected a gray or BGR image, got shape {gray.shape}")
        blob, scale = network_input(gray, self.spec, self.input_side)
        outputs = self.session.run(None, {self.spec.input_name: blob})
        boxes, scores = self.spec.decode(outputs, blob.shape[2:], self.min_score)
        top = np.argsort(-scores, kind="stable")[:MAX_CANDIDATES]
        boxes, scores = boxes[top] / scale, scores[top]
        kept = non_max_suppression_xyxy(boxes, scores)
        return [Detection((float(x0), float(y0), float(x1 - x0), float(y1 - y0)), float(s))
                for (x0, y0, x1, y1), s in zip(boxes[kept], scores[kept], strict=True)]

    def detect_near(self, gray: np.ndarray, boxes: Sequence[Box], margin: float = ROI_MARGIN) -> list[Detection]:
        """Video's search around tracked faces: the whole frame costs what a region would (one fixed-size
        input), so this is `detect` keeping the faces centred in a tracked face's search square."""
        def near(d: Detection) -> bool:
            cx, cy = d.box[0] + d.box[2] / 2, d.box[1] + d.box[3] / 2
            return any(abs(cx - (x + w / 2)) <= (0.5 + margin) * max(w, h)
                       and abs(cy - (y + h / 2)) <= (0.5 + margin) * max(w, h) for x, y, w, h in boxes)

        return [d for d in self.detect(gray) if near(d)]

    def __repr__(self) -> str:
        return f"CnnDetector({self.name}, input_side={self.input_side}, min_score={self.min_score})"
