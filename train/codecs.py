"""What every head's codec shares (docs/DESIGN.md section 5): the landmark losses, masked means and the
mean shape's neighbour lists. Each head's own codec lives in its module (facemark.train.head_pip,
facemark.train.head_regression): `encode` landmarks -> training targets, `loss`, `decode` raw outputs ->
landmarks in the contract's normalised crop units (docs/DESIGN.md section 2), in plain torch ops so the same
decode runs in validation and inside the exported ONNX graph.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from facemark.train.options import LOSSES

# Wing loss (Feng et al. 2018) in crop pixels: w = 10, eps = 2.
WING_W, WING_EPS = 10.0, 2.0


def point_loss(name: str, pred: torch.Tensor, target: torch.Tensor, size: int) -> torch.Tensor:
    """Per-element landmark loss (same shape as `pred`) in normalised units; `size` scales Wing's pixels."""
    if name == "l1":
        return (pred - target).abs()
    if name == "mse":
        return (pred - target) ** 2
    if name == "wing":
        x = (pred - target).abs() * size
        c = WING_W - WING_W * math.log1p(WING_W / WING_EPS)
        return torch.where(x < WING_W, WING_W * torch.log1p(x / WING_EPS), x - c) / size
    raise ValueError(f"unknown loss {name!r} ({', '.join(LOSSES)})")


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` (N, ...) over the samples where `mask` (N,) is true; all samples when mask is None."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype).view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def nearest_neighbors(mean_shape: np.ndarray, k: int) -> list[list[int]]:
    """For each point of `mean_shape` (P, 2), the indices of its `k` nearest other points (closest first)."""
    d = np.linalg.norm(mean_shape[:, None, :] - mean_shape[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    return [list(map(int, row[:k])) for row in np.argsort(d, axis=1, kind="stable")]
