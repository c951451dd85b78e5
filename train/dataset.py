"""Training data: decoded face crops cached once (with margin), then one affine warp per sample.

Each face is decoded from its photo once, cut out with `margin` times the contract's crop side around the
landmark box and kept in memory as uint8 (about 130 KB per face at 224 px). Augmentation composes rotation,
zoom, shift and horizontal flip into ONE affine matrix from that cache to the network crop, so the landmarks
follow the pixels by construction; photometric changes (brightness/contrast, gamma, blur, noise, occlusion)
act on the warped crop. Validation never uses the cache: it goes through `CropContract.prepare`, exactly as
the runtime does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from facemark.contract import Box, CropContract, apply_affine, box_from_landmarks, box_iou
from facemark.data import FaceRecord, other_faces
from facemark.imageio import read_gray
from facemark.scheme import FLIP_PERMUTATION

# Room for the largest augmentation: 30 deg rotation (x1.37) with 10 % zoom out fits inside 1.6; the rarer
# larger detector-like zooms and shifts see the contract's constant border there, as they would at the image edge.
CACHE_MARGIN = 1.6
# Real first-pass boxes (train --first-pass-boxes) sit further off and larger than the modelled error: up to 0.3
# box sides off centre and 1.3x the side on the training faces, which with 30 deg, 10 % zoom and 8 % shift needs
# about 2.7 crop sides of room (half-extent 0.89 x 1.37 + 0.36 box sides); with 1.6 a few % of such crops showed
# the constant border where the runtime's crop of the photo shows the face's surroundings.
FIRST_PASS_CACHE_MARGIN = 2.8


# Calibrated Haar box vs landmark box on 533 training faces (`python -m facemark.benchmarks.studies.box_noise --data
# ../shared/data/300w`): robust sigma of the centre error in box sides (x, y) and of log(side ratio).
HAAR_SHIFT_X, HAAR_SHIFT_Y, HAAR_LOG_SCALE = 0.10, 0.046, 0.09


@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 15.0  # uniform in [-r, r]; the tutorial uses 10, PIPNet 30
    zoom: float = 0.1  # crop side x uniform [1 - z, 1 + z]: robustness to detector box size
    shift: float = 0.08  # crop centre moves by up to this share of the side
    flip: bool = True
    # Detector-like boxes: with probability det_p the box is jittered like a calibrated Haar box instead
    # (normal centre error in units of the landmark box side, log-normal side ratio), measured with
    # `python -m facemark.benchmarks.studies.box_noise` (docs/MODEL.md). 0 = off.
    det_p: float = 0.0
    det_shift_x: float = 0.0
    det_shift_y: float = 0.0
    det_log_scale: float = 0.0
    brightness: float = 0.25  # the tutorial's brightness/contrast jitter
    contrast: float = 0.25
    gamma: float = 0.3  # log-uniform gamma in [1/(1+g), 1+g]
    blur_p: float = 0.15  # blur a crop with this probability: Gaussian, or motion blur (motion_blur's share)
    motion_blur: float = 0.0  # share of the blurred crops blurred along a line (camera or head motion)
    noise_p: float = 0.15
    occlude_p: float = 0.15  # a random rectangle (15-40 % of the side) of one random grey

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(rotate_deg=0.0, zoom=0.0, shift=0.0, flip=False, brightness=0.0, contrast=0.0, gamma=0.0,
                   blur_p=0.0, noise_p=0.0, occlude_p=0.0)


class FaceCache:
    """Every face cut out once, at the network's pixel density, with room for augmentation."""

    def __init__(self, records: Sequence[FaceRecord], contract: CropContract,
                 progress: Callable[[int], None] | None = None,
                 first_pass_boxes: Mapping[str, Box | None] | None = None) -> None:
        """first_pass_boxes: face key -> the box the runtime's first pass crops on (None: the detector missed
        it), as `facemark detectors boxes` writes them; kept per face as `first_pass_offset`, and the cache is cut
        wider (FIRST_PASS_CACHE_MARGIN) so that crops on those boxes stay inside it."""
        self.margin = FIRST_PASS_CACHE_MARGIN if first_pass_boxes else CACHE_MARGIN
        side = int(math.ceil(contract.size * self.margin))
        self.side = side
        # Same centre as the contract's crop, `side` pixels for `scale * margin` of the box size.
        self.cache_contract = CropContract(size=side, scale=contract.scale * side / contract.size,
                                           border_value=contract.border_value)
        self.crops = np.empty((len(records), side, side), np.uint8)
        self.points = np.empty((len(records), 68, 2), np.float32)
        self.first_pass_offset = np.full((len(records), 3), np.nan, np.float32)
        for i, record in enumerate(records):
            box = (first_pass_boxes or {}).get(record.key)
            if box is not None:
                self.first_pass_offset[i] = box_offset(box, box_from_landmarks(record.landmarks))
            gray = read_gray(record.image_path)
            m = self.cache_contract.crop_matrix(box_from_landmarks(record.landmarks))
            self.crops[i] = self.cache_contract.warp(gray, m)
            self.points[i] = apply_affine(m, record.landmarks)
            if progress:
                progress(1)

    def __len__(self) -> int:
        return len(self.crops)


def box_offset(box: Box, landmark_box: Box) -> np.ndarray:
    """(centre x, centre y, log side ratio) of `box` against `landmark_box`, in landmark-box sides: the crop's
    own units (CropContract crops a square of scale * max(w, h) around the centre)."""
    x, y, w, h = box
    lx, ly, lw, lh = landmark_box
    side, lside = max(w, h, 1.0), max(lw, lh, 1.0)
    return np.array([(x + w / 2 - lx - lw / 2) / lside, (y + h / 2 - ly - lh / 2) / lside,
                     math.log(side / lside)], np.float32)


def augment_matrix(rng: np.random.Generator, cache_side: int, size: int, aug: AugmentConfig,
                   crop_scale: float = 1.25, first_pass: np.ndarray | None = None,
                   margin: float = CACHE_MARGIN) -> tuple[np.ndarray, bool]:
    """Cache -> crop affine of one random rotation/zoom/shift (+flip). Identity augmentation = nominal crop.

    `crop_scale` (the contract's crop side / box side) converts detector-like errors, measured in box sides,
    into shares of the crop. With probability det_p the crop is a detector-like one: on the face's real
    first-pass box when `first_pass` (its box_offset) is given and finite, with the mild zoom/shift on top,
    else with the modelled error (det_shift_*, det_log_scale)."""
    angle = math.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg)) if aug.rotate_deg else 0.0
    detector_like = bool(aug.det_p and rng.random() < aug.det_p)
    real_box = detector_like and first_pass is not None and bool(np.isfinite(first_pass).all())
    if detector_like and not real_box:
        zoom = math.exp(rng.normal(0.0, aug.det_log_scale))
        shift = rng.normal(0.0, [aug.det_shift_x, aug.det_shift_y]) / crop_scale * size
    else:
        zoom = rng.uniform(1 - aug.zoom, 1 + aug.zoom) if aug.zoom else 1.0
        shift = rng.uniform(-aug.shift, aug.shift, size=2) * size if aug.shift else np.zeros(2)
    if real_box:
        k = math.exp(float(first_pass[2]))
        zoom *= k
        # The face centre sits opposite the box's offset, in pixels of a crop k times the nominal one.
        shift = shift - first_pass[:2].astype(np.float64) / (crop_scale * k) * size
    flip = bool(aug.flip and rng.random() < 0.5)
    if flip and real_box:
        shift = shift * np.array([-1.0, 1.0])  # the mirrored photo's detector box, mirrored
    k = size * margin / cache_side / zoom  # cache pixels -> crop pixels (the cache holds `margin` crops)
    c, s = math.cos(angle) * k, math.sin(angle) * k
    linear = np.array([[c, -s], [s, c]])
    if flip:
        linear = np.array([[-1.0, 0.0], [0.0, 1.0]]) @ linear
    src_centre = np.full(2, (cache_side - 1) / 2.0)
    dst_centre = np.full(2, (size - 1) / 2.0) + shift
    return np.hstack([linear, (dst_centre - linear @ src_centre)[:, None]]), flip


def photometric(crop: np.ndarray, rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray:
    """uint8 crop -> float32 crop in [0, 255] with brightness/contrast, gamma, blur, noise and occlusion."""
    x = crop.astype(np.float32)
    if aug.blur_p and rng.random() < aug.blur_p:
        # The draw for the kind of blur is made only when motion blur is asked for: the default stream is unchanged.
        if aug.motion_blur and rng.random() < aug.motion_blur:
            x = motion_blur(x, rng)
        else:
            x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 1.5))
    if aug.gamma:
        g = math.exp(rng.uniform(-1, 1) * math.log1p(aug.gamma))
        x = 255.0 * np.power(x / 255.0, g)
    if aug.contrast or aug.brightness:
        alpha = 1 + rng.uniform(-aug.contrast, aug.contrast)
        beta = rng.uniform(-aug.brightness, aug.brightness) * 255
        x = (x - x.mean()) * alpha + x.mean() + beta
    if aug.noise_p and rng.random() < aug.noise_p:
        x = x + rng.normal(0, rng.uniform(2, 8), x.shape).astype(np.float32)
    if aug.occlude_p and rng.random() < aug.occlude_p:
        h, w = x.shape
        ow, oh = int(w * rng.uniform(0.15, 0.4)), int(h * rng.uniform(0.15, 0.4))
        ox, oy = int(rng.integers(0, w - ow)), int(rng.integers(0, h - oh))
        x[oy:oy + oh, ox:ox + ow] = rng.uniform(0, 255)
    return np.clip(x, 0, 255)


def motion_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur along a line of random direction, 2-7 % of the crop side long (a moving head or camera)."""
    length = max(3, int(round(x.shape[0] * rng.uniform(0.02, 0.07))) | 1)
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0
    turn = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), rng.uniform(0, 180), 1.0)
    kernel = cv2.warpAffine(kernel, turn, (length, length))
    return cv2.filter2D(x, -1, kernel / max(float(kernel.sum()), 1e-6), borderType=cv2.BORDER_REFLECT)


class NegativeSource:
    """Face-free crops for the presence head, cut on the fly from the training photos.

    Half are the annotated face's neighbourhood -- boxes of 0.5-2x the face's size shifted until they overlap
    it (and every other annotated face of the photo) by IoU < `max_iou` and do not hold a whole face at a
    smaller scale: foreheads, shirts, half faces, the things a tracker drifts onto; half are boxes anywhere in
    the photo. Photos are kept whole in memory as
    grayscale (about 0.3 GB for 300-W's training split).
    """

    def __init__(self, records: Sequence[FaceRecord], contract: CropContract, max_iou: float = 0.3) -> None:
        self.contract, self.max_iou = contract, max_iou
        self.images: list[np.ndarray] = []
        self.boxes: list[list[Box]] = []  # every known face of the photo, the annotated one first
        others = other_faces(records)
        for record, extra in zip(records, others, strict=True):
            self.images.append(read_gray(record.image_path))
            self.boxes.append([box_from_landmarks(record.landmarks), *extra])

    def __len__(self) -> int:
        return len(self.images)

    def sample_box(self, index: int, rng: np.random.Generator) -> Box:
        """A square box overlapping no known face of photo `index` by IoU >= max_iou."""
        gray, faces = self.images[index], self.boxes[index]
        h, w = gray.shape[:2]
        fx, fy, fw, fh = faces[0]
        face_side = max(fw, fh, 8.0)
        near = rng.random() < 0.5
        for _ in range(50):
            if near:
                side = face_side * math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
                cx = fx + fw / 2 + rng.uniform(-1.5, 1.5) * face_side
                cy = fy + fh / 2 + rng.uniform(-1.5, 1.5) * face_side
            else:
                side = min(h, w) * rng.uniform(0.1, 0.8)
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            box = (cx - side / 2, cy - side / 2, side, side)
            if all(box_iou(box, f) < self.max_iou and not _holds_whole_face(box, f) for f in faces):
                return box
        return (0.0, 0.0, 16.0, 16.0)  # a corner: every photo here has one away from the face

    def crop(self, index: int, rng: np.random.Generator) -> np.ndarray:
        box = self.sample_box(index, rng)
        return self.contract.warp(self.images[index], self.contract.crop_matrix(box))


def _holds_whole_face(box: Box, face: Box) -> bool:
    """A box around the whole face, only too large (a smaller face, not a non-face): never a negative."""
    x, y, side, _ = box
    fx, fy, fw, fh = face
    cx, cy = fx + fw / 2, fy + fh / 2
    return x <= cx <= x + side and y <= cy <= y + side and side >= 0.5 * max(fw, fh)


class AugmentedFaces(Dataset):
    """(input 1 x S x S float32 in [-1, 1], target 68 x 2 normalised, is_face 0/1) from a FaceCache.

    With a NegativeSource, `negatives_per_face` extra items per epoch are face-free crops (target zeros,
    is_face 0) for the presence head; the landmark loss ignores them.
    """

    def __init__(self, cache: FaceCache, contract: CropContract, aug: AugmentConfig,
                 negatives: NegativeSource | None = None, negatives_per_face: float = 0.0) -> None:
        self.cache, self.contract, self.aug = cache, contract, aug
        self.negatives = negatives
        self.num_negatives = int(round(len(cache) * negatives_per_face)) if negatives is not None else 0
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1
        self._flip = np.asarray(FLIP_PERMUTATION)

    def __len__(self) -> int:
        return len(self.cache) + self.num_negatives

    def _generator(self) -> np.random.Generator:
        # One stream per process, seeded from torch's per-worker seed: reproducible under a fixed --seed.
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng = np.random.default_rng(torch.initial_seed() % 2**63)
            self._rng_pid = os.getpid()
        return self._rng

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = self._generator()
        size = self.contract.size
        if index >= len(self.cache):
            crop = self.negatives.crop(int(rng.integers(len(self.negatives))), rng)
            if self.aug.flip and rng.random() < 0.5:
                crop = crop[:, ::-1]
            return self._tensor(crop, rng), torch.zeros(68, 2), torch.tensor(0.0)
        m, flipped = augment_matrix(rng, self.cache.side, size, self.aug, self.contract.scale,
                                    self.cache.first_pass_offset[index], self.cache.margin)
        crop = cv2.warpAffine(self.cache.crops[index], m, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=self.contract.border_value)
        points = apply_affine(m, self.cache.points[index])
        if flipped:
            points = points[self._flip]
        target = points / size - 0.5
        return self._tensor(crop, rng), torch.from_numpy(target.astype(np.float32)), torch.tensor(1.0)

    def _tensor(self, crop: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        pixels = photometric(np.ascontiguousarray(crop), rng, self.aug)
        image = (pixels / 255.0 - self.contract.mean) / self.contract.std
        return torch.from_numpy(image[None].astype(np.float32))


def validation_negatives(records: Sequence[FaceRecord], contract: CropContract, seed: int = 0) -> np.ndarray:
    """Deterministic face-free network inputs (one per validation photo) for the presence head's AUC."""
    source = NegativeSource(records, contract)
    rng = np.random.default_rng(seed)
    crops = [source.crop(i, rng) for i in range(len(source))]
    if not crops:
        return np.zeros((0, 1, contract.size, contract.size), np.float32)
    return contract.normalize(np.stack(crops))


def detector_like_box(box: Box, rng: np.random.Generator, shift_x: float = HAAR_SHIFT_X,
                      shift_y: float = HAAR_SHIFT_Y, log_scale: float = HAAR_LOG_SCALE) -> Box:
    """`box` moved and resized like a calibrated Haar box (the measured error model of AugmentConfig.det_*)."""
    x, y, w, h = box
    side = max(w, h)
    cx = x + w / 2 + rng.normal(0.0, shift_x) * side
    cy = y + h / 2 + rng.normal(0.0, shift_y) * side
    k = math.exp(rng.normal(0.0, log_scale))
    return (cx - w * k / 2, cy - h * k / 2, w * k, h * k)


VAL_BOXES = ("landmarks", "detector")


def validation_tensors(records: Sequence[FaceRecord], contract: CropContract,
                       progress: Callable[[int], None] | None = None, seed: int = 0,
                       first_pass_boxes: Mapping[str, Box | None] | None = None
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validation inputs and crop-space targets through the runtime's own preprocessing (no cache), for each
    kind of box in VAL_BOXES, every photo read once.

    "landmarks": each face's landmark box (what a refinement pass sees); "detector": that box with one seeded
    draw of the calibrated Haar box error per face (what the runtime's first pass sees), the same draw in every
    epoch and run with this `seed`; with `first_pass_boxes`, the face's real first-pass box where the detector
    found it."""
    rng = np.random.default_rng(seed)
    sets = {kind: (np.empty((len(records), 1, contract.size, contract.size), np.float32),
                   np.empty((len(records), 68, 2), np.float32)) for kind in VAL_BOXES}
    for i, record in enumerate(records):
        gray = read_gray(record.image_path)
        box = box_from_landmarks(record.landmarks)
        real = (first_pass_boxes or {}).get(record.key)
        for kind, (inputs, targets) in sets.items():
            crop_box = box
            if kind == "detector":
                crop_box = detector_like_box(box, rng)  # drawn either way: the seeded stream stays the same
                crop_box = crop_box if real is None else tuple(real)
            batch, (m,) = contract.prepare(gray, [crop_box])
            inputs[i] = batch[0]
            targets[i] = contract.encode_points(record.landmarks, m)
        if progress:
            progress(1)
    return sets
