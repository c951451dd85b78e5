"""Face detection with OpenCV's frontal-face Haar cascade (shipped with OpenCV 4 in `cv2.data`).

Haar is the slow and noisy part of the pipeline (tens to hundreds of ms per photo, next to a few ms for the
landmark model), so the detector ignores faces smaller than `min_face_fraction` of the image's shorter side
and works on a downscaled copy (boxes are mapped back): small enough that the smallest face wanted spans
`min_face_windows` cascade windows (a 38 px face needs no 640x480 copy when the cascade looks at 20x20), and
never longer than `max_side`. Each box carries the
cascade's level weight as `score` (from `detectMultiScale3(..., outputRejectLevels=True)`): higher is more
face-like, and `min_score` drops weak boxes, which are most of the false positives.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facemark.contract import Box, BoxCalibration, non_max_suppression
from facemark.errors import ModelError
from facemark.imageio import to_gray

# Defaults, measured on the 300-W validation split and dlib's example photos (see HaarDetector's docstring).
# alt2 finds about as many faces as the tutorial's frontalface_default but gives far fewer non-face boxes.
DEFAULT_CASCADE = "haarcascade_frontalface_alt2.xml"
TUTORIAL_CASCADE = "haarcascade_frontalface_default.xml"
DEFAULT_SCALE_FACTOR = 1.1
DEFAULT_MIN_NEIGHBORS = 4  # for models without a presence score: nothing downstream rejects a false box
# With a presence score the model rejects false boxes, so the cascade can be permissive: a face hit once is kept
# (min_neighbors 0), which finds the faces a coarse scale step leaves with a single hit, so the step can be 1.25
# on a copy where the smallest face spans 2 windows. Measured with `python -m facemark.benchmarks.detector_sweep`
# (docs/MODEL.md, "Single cascade hits and a coarser step"): Haar about 2x faster than step 1.1 / 1 neighbour /
# 1.5 windows, more faces found at 8 % of the frame, as many of the validation faces (93.2 %).
PRESENCE_SCALE_FACTOR = 1.25
PRESENCE_MIN_NEIGHBORS = 0
PRESENCE_MIN_FACE_WINDOWS = 2.0
DEFAULT_MIN_FACE_FRACTION = 0.08
DEFAULT_MAX_SIDE = 640
SMALLEST_MAX_SIDE = 64  # a smaller --max-side copy leaves no room for the cascade's windows
# The detection copy: the smallest face wanted spans 1.5 cascade windows (640x480 with min_face 0.08 -> a 500x375
# copy). Measured on the validation split with the shipped model (docs/MODEL.md, "Detector speed"): Haar 1.4x
# faster at 640x480 for 1.4 points of detection rate (94.6 -> 93.2 % found at presence >= 0.9, no false face).
DEFAULT_MIN_FACE_WINDOWS: float | None = 1.5
# Video's region-of-interest pass (HaarDetector.detect_near): a tracked face is searched for in a square of
# (1 + 2 * ROI_MARGIN) times its side, at sizes within ROI_SIZE_RANGE of it.
ROI_MARGIN = 0.5
ROI_SIZE_RANGE = 1.6
# HaarDetector(octaves=True): each octave of face sizes is searched on its own halved copy, over faces of 1 to
# OCTAVE_SPAN cascade windows there (2: every scale below OpenCV's switch to a 1-pixel stride).
OCTAVE_SPAN = 2.0
GROUP_ROWS = 512  # group_hits compares this many hits with all the others at a time
DEFAULT_OCTAVES = False  # half the Haar time, 9 points fewer faces found (docs/MODEL.md, "An octave pyramid")


@dataclass(frozen=True)
class Detection:
    box: Box  # x, y, w, h in the pixels of the image given to `detect`
    score: float  # the cascade's level weight (higher = more confident)


def default_detector_options(has_presence_score: bool) -> dict:
    """The detector knobs FaceLandmarker uses unless told otherwise, by whether the model scores presence."""
    if has_presence_score:
        return {"scale_factor": PRESENCE_SCALE_FACTOR, "min_neighbors": PRESENCE_MIN_NEIGHBORS,
                "min_face_windows": PRESENCE_MIN_FACE_WINDOWS}
    return {"scale_factor": DEFAULT_SCALE_FACTOR, "min_neighbors": DEFAULT_MIN_NEIGHBORS,
            "min_face_windows": DEFAULT_MIN_FACE_WINDOWS}


def default_cascade_path(name: str = DEFAULT_CASCADE) -> Path:
    """A cascade shipped with OpenCV (cv2.data.haarcascades), by file name."""
    return Path(cv2.data.haarcascades) / name


class HaarDetector:
    """OpenCV Haar cascade face detector with the tutorial's parameters (scale 1.1, 4 neighbours) as defaults.

    cascade: a cascade file, or the name of one shipped with OpenCV (default haarcascade_frontalface_alt2.xml;
        the tutorial's is haarcascade_frontalface_default.xml).
    min_face_fraction: smallest face searched, as a fraction of the image's shorter side (0 = the cascade's
        own 24 px window). The main speed knob: most of Haar's time goes to the smallest scales.
    max_side: images whose longer side exceeds it are searched on a downscaled copy (None = never).
    min_face_windows: search a copy downscaled until the smallest face wanted (min_face_fraction of the
        shorter side) spans this many cascade windows (None = no such downscale). The cascade's cost grows
        with the copy's pixels; boxes found on a smaller copy are coarser, which the refinement pass repairs.
    min_neighbors: a face needs more than this many raw cascade hits (OpenCV's minNeighbors); 0 keeps a face
        hit once, grouped like the others (OpenCV would return every raw hit): for models whose presence
        score rejects the false boxes that lets in.
    min_score: drop boxes whose level weight is below it (None = keep all).
    octaves: search each octave of face sizes on its own halved copy (`_cascade_octaves`) instead of one
        OpenCV pyramid: about half the time, but faces above 2 windows are searched at coarser positions and
        some are lost (about 9 points of detection rate on the validation split: docs/MODEL.md), so off.
    """

    calibration: BoxCalibration | None = None  # Haar's is fitted at export and embedded in each model
    color = False  # detects on gray (a BGR image is converted)

    def __init__(
        self,
        scale_factor: float = DEFAULT_SCALE_FACTOR,
        min_neighbors: int = DEFAULT_MIN_NEIGHBORS,
        min_face_fraction: float = DEFAULT_MIN_FACE_FRACTION,
        max_side: int | None = DEFAULT_MAX_SIDE,
        cascade: str | os.PathLike | None = None,
        min_score: float | None = None,
        min_face_windows: float | None = DEFAULT_MIN_FACE_WINDOWS,
        octaves: bool = DEFAULT_OCTAVES,
    ) -> None:
        if min_neighbors < 0:
            raise ValueError(f"min_neighbors must be >= 0 (got {min_neighbors})")
        if scale_factor <= 1.0:
            raise ValueError(f"scale_factor must be > 1 (got {scale_factor})")
        if not 0.0 <= min_face_fraction < 1.0:
            raise ValueError(f"min_face_fraction must be in [0, 1) (got {min_face_fraction})")
        if max_side is not None and max_side < SMALLEST_MAX_SIDE:
            raise ValueError(f"max_side must be >= {SMALLEST_MAX_SIDE} or None (got {max_side})")
        if min_face_windows is not None and min_face_windows < 1.0:
            raise ValueError(f"min_face_windows must be >= 1 or None (got {min_face_windows})")
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_face_fraction = min_face_fraction
        self.max_side = max_side
        self.min_score = min_score
        self.min_face_windows = min_face_windows
        self.octaves = octaves
        self.cascade_path = _cascade_path(cascade)
        # OpenCV's CascadeClassifier is not re-entrant (concurrent detectMultiScale calls on one object corrupt
        # each other's scale tables): one classifier per thread, loaded on first use in that thread.
        self._local = threading.local()
        self._local.cascade = _load_cascade(self.cascade_path)  # fail fast on a bad file, in the caller's thread
        self._window = self._local.cascade.getOriginalWindowSize()  # (24, 24) for the frontal-face cascade

    @property
    def name(self) -> str:
        """Identifies the detector a calibration was fitted for (the cascade; its knobs barely move boxes)."""
        return f"opencv-haar:{self.cascade_path.stem}"

    def config(self) -> dict:
        return {"name": self.name, "scale_factor": self.scale_factor, "min_neighbors": self.min_neighbors,
                "min_face_fraction": self.min_face_fraction, "max_side": self.max_side,
                "min_face_windows": self.min_face_windows, "min_score": self.min_score, "octaves": self.octaves}

    def detect(self, gray: np.ndarray) -> list[Detection]:
        """Faces in a grayscale (or BGR) uint8 image, most confident first."""
        if gray.ndim == 3:
            gray = to_gray(gray)
        if gray.ndim != 2:
            raise ValueError(f"HaarDetector.detect expects a grayscale image, got shape {gray.shape}")
        height, width = gray.shape
        if min(height, width) < self._window[0]:
            return []
        factor = self.copy_factor(width, height)
        copy_side = min(height, width) if factor >= 1.0 else max(1, round(min(height, width) * factor))
        return self._scan(gray, (0, 0, width, height), factor, round(self.min_face_fraction * copy_side), None)

    def detect_near(self, gray: np.ndarray, boxes: Sequence[Box], margin: float = ROI_MARGIN) -> list[Detection]:
        """Faces near known faces (video: the tracked faces' landmark boxes), most confident first.

        Each box is searched in a square of (1 + 2 * margin) times its side around its centre, for faces
        between 1/ROI_SIZE_RANGE and ROI_SIZE_RANGE times its side, on a copy where the smallest of those spans
        min_face_windows cascade windows: a fraction of a millisecond instead of a whole-frame scan. A face
        found by two overlapping regions is kept once."""
        if gray.ndim == 3:
            gray = to_gray(gray)
        if gray.ndim != 2:
            raise ValueError(f"HaarDetector.detect_near expects a grayscale image, got shape {gray.shape}")
        height, width = gray.shape
        found: list[Detection] = []
        for x, y, w, h in boxes:
            face = max(w, h)
            half = (0.5 + margin) * face
            cx, cy = x + w / 2, y + h / 2
            x0, y0 = max(0, int(cx - half)), max(0, int(cy - half))
            x1, y1 = min(width, int(math.ceil(cx + half))), min(height, int(math.ceil(cy + half)))
            smallest = face / ROI_SIZE_RANGE
            if min(x1 - x0, y1 - y0) < smallest:
                continue  # the region left the frame
            windows = self.min_face_windows or 1.0
            factor = min(1.0, windows * self._window[0] / smallest)
            found += self._scan(gray, (x0, y0, x1 - x0, y1 - y0), factor, round(smallest * factor),
                                round(face * ROI_SIZE_RANGE * factor))
        return [found[i] for i in non_max_suppression([d.box for d in found], [d.score for d in found])]

    def _scan(self, gray: np.ndarray, region: Box, factor: float, min_side: int, max_side: int | None
              ) -> list[Detection]:
        """The cascade on `region` of `gray` scaled by `factor` (<= 1), faces of min_side..max_side pixels of
        that copy (never below the cascade window); boxes in `gray`'s pixels, most confident first."""
        x0, y0, rw, rh = (int(v) for v in region)
        small = gray[y0 : y0 + rh, x0 : x0 + rw]
        if factor < 1.0:
            size = (max(1, round(rw * factor)), max(1, round(rh * factor)))
            small = cv2.resize(small, size, interpolation=cv2.INTER_AREA)
        if min(small.shape) < self._window[0]:
            return []
        min_side = max(self._window[0], min_side)
        scan = self._cascade_octaves if self.octaves else self._cascade_once
        detections = [
            Detection((x0 + x / factor, y0 + y / factor, w / factor, h / factor), score)
            for (x, y, w, h), score in scan(small, min_side, max_side)
        ]
        if self.min_score is not None:
            detections = [d for d in detections if d.score >= self.min_score]
        return sorted(detections, key=lambda d: d.score, reverse=True)

    def _cascade_once(self, image: np.ndarray, min_side: int, max_side: int | None
                      ) -> list[tuple[tuple[float, float, float, float], float]]:
        """OpenCV's own pyramid: ((x, y, w, h), level weight) of faces of min_side..max_side pixels."""
        if self.min_neighbors == 0:  # OpenCV does not group at 0; every group of hits is a face here
            return group_hits(*self._raw_hits(image, min_side, max_side, 0), 0)
        rects, _levels, weights = self._raw_hits(image, min_side, max_side, self.min_neighbors)
        return list(zip((tuple(r) for r in rects.tolist()), weights.tolist(), strict=True))

    def _raw_hits(self, image: np.ndarray, min_side: int, max_side: int | None, min_neighbors: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """detectMultiScale3 as arrays: rects [N,4] float, reject levels [N], level weights [N]."""
        rects, levels, weights = self._cascade().detectMultiScale3(
            image,
            scaleFactor=self.scale_factor,
            minNeighbors=min_neighbors,
            minSize=(min_side, min_side),
            maxSize=(0, 0) if max_side is None else (max_side, max_side),
            outputRejectLevels=True,
        )
        return (np.asarray(rects, dtype=np.float64).reshape(-1, 4), np.asarray(levels, dtype=np.int64).reshape(-1),
                np.asarray(weights, dtype=np.float64).reshape(-1))

    def _cascade_octaves(self, image: np.ndarray, min_side: int, max_side: int | None
                         ) -> list[tuple[tuple[float, float, float, float], float]]:
        """The same search, one octave of face sizes at a time on a copy halved per octave.

        OpenCV slides its window 2 pixels at a time at scales below 2 windows but 1 pixel at a time above
        (on the scaled image): most of a whole-range call goes to the large faces, at a density they do not
        need. Here every octave sees its faces at 1 to 2 windows (the 2-pixel stride). The raw hits of all
        octaves are grouped together as OpenCV groups them, so a face on an octave boundary is one box."""
        window = self._window[0]
        full_height, full_width = image.shape
        hits: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        octave, low = image, float(min_side)  # the octave's copy; its smallest face (in `image` pixels)
        while True:
            # `image` pixels per octave pixel, per axis (halving an odd side is not exactly 2)
            scale_x, scale_y = full_width / octave.shape[1], full_height / octave.shape[0]
            scale = (scale_x + scale_y) / 2
            high = OCTAVE_SPAN * window * scale  # the octave's largest face (image px)
            last = min(octave.shape) < OCTAVE_SPAN * window or (max_side is not None and high >= max_side)
            top = max_side if last else high
            if top is None or top >= low:
                rects, levels, weights = self._raw_hits(
                    octave, max(window, math.ceil(low / scale)),
                    None if top is None else max(window, math.floor(top / scale)), 0)
                hits.append((rects * (scale_x, scale_y, scale_x, scale_y), levels, weights))
            if last:
                break
            octave = cv2.resize(octave, (max(1, octave.shape[1] // 2), max(1, octave.shape[0] // 2)),
                                interpolation=cv2.INTER_AREA)
            low = max(low, high)
        if not hits:
            return []  # the sizes asked for fit no octave (a region smaller than the cascade window)
        rects, levels, weights = (np.concatenate(parts) for parts in zip(*hits, strict=True))
        return group_hits(rects, levels, weights, self.min_neighbors)

    def copy_factor(self, width: int, height: int) -> float:
        """Scale of the detection copy (<= 1): max_side and min_face_windows, whichever shrinks more."""
        factor = 1.0
        if self.max_side is not None and max(height, width) > self.max_side:
            factor = self.max_side / max(height, width)
        smallest_face = self.min_face_fraction * min(height, width)
        if self.min_face_windows is not None and smallest_face > 0:
            # Never below the cascade window itself: the copy must still hold a face of the window's size.
            wanted = max(self.min_face_windows * self._window[0] / smallest_face, self._window[0] / min(height, width))
            factor = min(factor, wanted)
        return factor

    def _cascade(self) -> cv2.CascadeClassifier:
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = self._local.cascade = _load_cascade(self.cascade_path)
        return cascade

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"HaarDetector({knobs})"


def group_hits(rects: np.ndarray, levels: np.ndarray, weights: np.ndarray, min_neighbors: int, eps: float = 0.2
               ) -> list[tuple[tuple[float, float, float, float], float]]:
    """OpenCV's groupRectangles with reject levels (what detectMultiScale3(..., outputRejectLevels=True) does
    to its raw hits): hits whose corners lie within eps of the smaller side of each other are one face (the
    transitive closure), its box the mean, its score the level weight of its deepest hit; a face is kept
    when it has more than min_neighbors hits and does not sit inside a face of many more hits.

    min_neighbors 0 keeps every group, a single hit too (OpenCV would return the raw hits ungrouped)."""
    if len(rects) == 0:
        return []
    x0, y0, w, h = rects.astype(np.float32).T  # float32: OpenCV's arithmetic, half the memory
    x1, y1 = x0 + w, y0 + h
    near = np.empty((len(rects), len(rects)), dtype=bool)
    # In row blocks: the float temporaries stay GROUP_ROWS x N however many hits a busy photo gives (at
    # min_neighbors 0 every raw hit is grouped; a few hundred on a crowd photo, more without --min-face).
    for start in range(0, len(rects), GROUP_ROWS):
        rows = slice(start, start + GROUP_ROWS)
        delta = eps * (np.minimum.outer(w[rows], w) + np.minimum.outer(h[rows], h)) * 0.5
        near[rows] = ((np.abs(np.subtract.outer(x0[rows], x0)) <= delta)
                      & (np.abs(np.subtract.outer(y0[rows], y0)) <= delta)
                      & (np.abs(np.subtract.outer(x1[rows], x1)) <= delta)
                      & (np.abs(np.subtract.outer(y1[rows], y1)) <= delta))
    labels = _components(near)
    groups = []
    for label in range(labels.max() + 1):
        members = np.flatnonzero(labels == label)
        deepest = levels[members].max()
        best = weights[members][levels[members] == deepest].max()
        # OpenCV's mean: the float32 sum times float32 1/n, rounded half to even
        box = np.rint(rects[members].sum(axis=0).astype(np.float32) * np.float32(1.0 / len(members)))
        groups.append((box, int(deepest), float(best), len(members)))
    kept = []
    for i, (box, _level, score, hits) in enumerate(groups):
        if hits <= min_neighbors:
            continue
        inside = False
        for j, (other, _level, _score, count) in enumerate(groups):
            if j == i or count <= min_neighbors:
                continue
            dx, dy = round(other[2] * eps), round(other[3] * eps)
            if (box[0] >= other[0] - dx and box[1] >= other[1] - dy and box[0] + box[2] <= other[0] + other[2] + dx
                    and box[1] + box[3] <= other[1] + other[3] + dy and (count > max(3, hits) or hits < 3)):
                inside = True
                break
        if not inside:
            kept.append((tuple(float(v) for v in box), score))
    return kept


def _components(adjacent: np.ndarray) -> np.ndarray:
    """Connected-component label of each node of a symmetric boolean adjacency matrix."""
    labels = np.full(len(adjacent), -1, dtype=np.int64)
    label = 0
    for start in range(len(adjacent)):
        if labels[start] >= 0:
            continue
        labels[start] = label
        frontier = [start]
        while frontier:
            node = frontier.pop()
            for neighbour in np.flatnonzero(adjacent[node] & (labels < 0)):
                labels[neighbour] = label
                frontier.append(int(neighbour))
        label += 1
    return labels


def _cascade_path(cascade: str | os.PathLike | None) -> Path:
    """None -> the default; a bare file name (e.g. the tutorial's) -> the one shipped with OpenCV."""
    if cascade is None:
        return default_cascade_path()
    path = Path(cascade)
    if not path.exists() and path.name == str(cascade):
        return default_cascade_path(path.name)
    return path


def _load_cascade(path: Path) -> cv2.CascadeClassifier:
    if not path.is_file():
        raise ModelError(f"{path}: Haar cascade file not found (OpenCV 4's cv2.data ships "
                         f"{DEFAULT_CASCADE}; reinstall opencv-python-headless or pass cascade=...)")
    try:
        cascade = cv2.CascadeClassifier(str(path))
    except (cv2.error, SystemError):  # OpenCV throws on malformed XML instead of returning an empty cascade
        cascade = None
    if cascade is None or cascade.empty():
        raise ModelError(f"{path}: not a loadable OpenCV cascade file")
    return cascade
