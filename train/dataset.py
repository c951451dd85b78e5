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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from facemark.contract import CropContract, apply_affine, box_from_landmarks
from facemark.data import FaceRecord
from facemark.imageio import read_gray
from facemark.scheme import FLIP_PERMUTATION

# Room for the largest augmentation: 15 deg rotation (x1.22), 10 % zoom out and 8 % shift fit inside 1.6.
CACHE_MARGIN = 1.6


@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 15.0  # uniform in [-r, r]; the tutorial uses 10
    zoom: float = 0.1  # crop side x uniform [1 - z, 1 + z]: robustness to detector box size
    shift: float = 0.08  # crop centre moves by up to this share of the side
    flip: bool = True
    brightness: float = 0.25  # the tutorial's brightness/contrast jitter
    contrast: float = 0.25
    gamma: float = 0.3  # log-uniform gamma in [1/(1+g), 1+g]
    blur_p: float = 0.15
    noise_p: float = 0.15
    occlude_p: float = 0.15

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(0.0, 0.0, 0.0, False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


class FaceCache:
    """Every face cut out once, at the network's pixel density, with room for augmentation."""

    def __init__(self, records: Sequence[FaceRecord], contract: CropContract,
                 progress: Callable[[int], None] | None = None) -> None:
        side = int(math.ceil(contract.size * CACHE_MARGIN))
        self.side = side
        # Same centre as the contract's crop, `side` pixels for `scale * CACHE_MARGIN` of the box size.
        self.cache_contract = CropContract(size=side, scale=contract.scale * side / contract.size,
                                           border_value=contract.border_value)
        self.crops = np.empty((len(records), side, side), np.uint8)
        self.points = np.empty((len(records), 68, 2), np.float32)
        for i, record in enumerate(records):
            gray = read_gray(record.image_path)
            m = self.cache_contract.crop_matrix(box_from_landmarks(record.landmarks))
            self.crops[i] = self.cache_contract.warp(gray, m)
            self.points[i] = apply_affine(m, record.landmarks)
            if progress:
                progress(1)

    def __len__(self) -> int:
        return len(self.crops)


def augment_matrix(rng: np.random.Generator, cache_side: int, size: int, aug: AugmentConfig) -> tuple[np.ndarray, bool]:
    """Cache -> crop affine of one random rotation/zoom/shift (+flip). Identity augmentation = nominal crop."""
    angle = math.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg)) if aug.rotate_deg else 0.0
    zoom = rng.uniform(1 - aug.zoom, 1 + aug.zoom) if aug.zoom else 1.0
    shift = rng.uniform(-aug.shift, aug.shift, size=2) * size if aug.shift else np.zeros(2)
    flip = bool(aug.flip and rng.random() < 0.5)
    k = size * CACHE_MARGIN / cache_side / zoom  # cache pixels -> crop pixels
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


class AugmentedFaces(Dataset):
    """(input 1 x S x S float32 in [-1, 1], target 68 x 2 normalised) pairs from a FaceCache."""

    def __init__(self, cache: FaceCache, contract: CropContract, aug: AugmentConfig) -> None:
        self.cache, self.contract, self.aug = cache, contract, aug
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1
        self._flip = np.asarray(FLIP_PERMUTATION)

    def __len__(self) -> int:
        return len(self.cache)

    def _generator(self) -> np.random.Generator:
        # One stream per process, seeded from torch's per-worker seed: reproducible under a fixed --seed.
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng = np.random.default_rng(torch.initial_seed() % 2**63)
            self._rng_pid = os.getpid()
        return self._rng

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self._generator()
        size = self.contract.size
        m, flipped = augment_matrix(rng, self.cache.side, size, self.aug)
        crop = cv2.warpAffine(self.cache.crops[index], m, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=self.contract.border_value)
        points = apply_affine(m, self.cache.points[index])
        if flipped:
            points = points[self._flip]
        pixels = photometric(crop, rng, self.aug)
        image = (pixels / 255.0 - self.contract.mean) / self.contract.std
        target = points / size - 0.5
        return torch.from_numpy(image[None].astype(np.float32)), torch.from_numpy(target.astype(np.float32))


def validation_tensors(records: Sequence[FaceRecord], contract: CropContract,
                       progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validation inputs and crop-space targets through the runtime's own preprocessing (no cache)."""
    inputs = np.empty((len(records), 1, contract.size, contract.size), np.float32)
    targets = np.empty((len(records), 68, 2), np.float32)
    for i, record in enumerate(records):
        gray = read_gray(record.image_path)
        batch, (m,) = contract.prepare(gray, [box_from_landmarks(record.landmarks)])
        inputs[i] = batch[0]
        targets[i] = contract.encode_points(record.landmarks, m)
        if progress:
            progress(1)
    return inputs, targets
