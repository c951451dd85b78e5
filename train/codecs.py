"""Keypoint codecs, one per head (mmpose style): `encode` landmarks -> training targets, `loss`, `decode` raw head
outputs -> landmarks in the normalised crop units of the contract (GUIDE section 2).

`decode` is written in plain torch ops (max/argmax, gather, matmul with a constant) so the same code runs in
validation and inside the exported ONNX graph: every consumer of the model gets points, never maps.

PIP = pixel-in-pixel regression (Jin et al., "Pixel-in-Pixel Net", IJCV 2021). On a G x G feature grid each
landmark has a score map over the cells, an (x, y) offset inside the cell, and the offsets of its K nearest
landmarks of the mean shape, also measured from that cell. Decoding takes each landmark's best cell and
averages the landmark's own estimate with every estimate its neighbours vote for it (neighbour voting), which
keeps a face shape-consistent when one point's map is ambiguous.

Grid units: a normalised point t (crop pixel p: t = p / size - 0.5) sits at g = (t + 0.5) * G, in cell
floor(g) (clamped to the grid) with offset g - cell in [0, 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from facemark.train.options import LOSSES

# Score maps: BCE on every cell, weighted like PIPNet's classification term (10 : 1 to the offsets).
PIP_SCORE_WEIGHT = 10.0
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


class RegressionCodec:
    """Direct regression: the network outputs the normalised points themselves."""

    name = "regression"

    def decode(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"landmarks": raw["points"]}

    def loss(self, raw: dict[str, torch.Tensor], target: torch.Tensor, loss_name: str, size: int,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        return masked_mean(point_loss(loss_name, raw["points"].float(), target, size), mask)


class PipCodec:
    """Pixel-in-pixel: score maps + in-cell offsets + neighbour offsets on a G x G grid (see module doc)."""

    name = "pip"

    def __init__(self, grid: int, neighbors: list[list[int]]) -> None:
        self.grid = grid
        self.neighbors = torch.tensor(neighbors, dtype=torch.long)  # (P, K)
        num_points, k = self.neighbors.shape
        self.num_points, self.k = num_points, k
        # votes[j, i*K + m] = 1 when point j is the m-th neighbour of point i: one matmul sums all votes for j.
        votes = torch.zeros(num_points, num_points * k)
        votes[self.neighbors.reshape(-1), torch.arange(num_points * k)] = 1.0
        self.votes = votes
        self.vote_count = votes.sum(dim=1, keepdim=True) + 1.0  # + the point's own estimate

    # --- targets -----------------------------------------------------------------------------------------
    def encode(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised points (N, P, 2) -> cell index (N, P), own offsets (N, P, 2), neighbour offsets
        (N, P, K, 2), all in grid units."""
        g = (target.float() + 0.5) * self.grid
        cell = g.floor().clamp(0, self.grid - 1)
        index = (cell[..., 1] * self.grid + cell[..., 0]).long()
        own = g - cell
        nb = g[:, self.neighbors.to(g.device)] - cell[:, :, None, :]  # (N, P, K, 2)
        return {"index": index, "offset": own, "neighbors": nb}

    def loss(self, raw: dict[str, torch.Tensor], target: torch.Tensor, loss_name: str, size: int,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Score-map BCE (x10) + `loss_name` on the own and neighbour offsets in grid units (PIPNet's terms)."""
        enc = self.encode(target)
        scores = raw["scores"].float().flatten(2)  # (N, P, G*G)
        onehot = F.one_hot(enc["index"], scores.shape[-1]).to(scores.dtype)
        score_loss = F.binary_cross_entropy_with_logits(scores, onehot, reduction="none")
        own, nb = self._offsets_at(raw, enc["index"])  # at the cell that holds the point
        own, nb = own.float(), nb.float()
        # point_loss works in normalised units (Wing needs the crop size); x G brings it back to grid units.
        own_loss = point_loss(loss_name, own / self.grid, enc["offset"] / self.grid, size)
        nb_loss = point_loss(loss_name, nb / self.grid, enc["neighbors"] / self.grid, size)
        return (PIP_SCORE_WEIGHT * masked_mean(score_loss, mask)
                + self.grid * (masked_mean(own_loss, mask) + masked_mean(nb_loss, mask)))

    def _offsets_at(self, raw: dict[str, torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Own offsets (N, P, 2) and neighbour offsets (N, P, K, 2) read at one cell per point (`index`, (N, P):
        the true cell for the loss, the best one for decoding). Shapes stay symbolic in the batch (-1)."""
        p, cells = raw["scores"].shape[1], raw["scores"].shape[2] * raw["scores"].shape[3]
        at = index[..., None]
        own = torch.stack([raw["offset_x"].flatten(2).gather(2, at)[..., 0],
                           raw["offset_y"].flatten(2).gather(2, at)[..., 0]], dim=-1)
        at_nb = at[:, :, None, :].expand(-1, -1, self.k, -1)
        nb = torch.stack([raw["neighbor_x"].flatten(2).view(-1, p, self.k, cells).gather(3, at_nb)[..., 0],
                          raw["neighbor_y"].flatten(2).view(-1, p, self.k, cells).gather(3, at_nb)[..., 0]],
                         dim=-1)
        return own, nb

    # --- decoding (torch ops only: it runs inside the exported graph) -------------------------------------
    def decode(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scores = raw["scores"]
        _, p, _, gw = scores.shape  # the batch stays symbolic (-1) for the dynamic ONNX axis
        best, index = scores.flatten(2).max(dim=2)  # (N, P)
        cy = torch.div(index, gw, rounding_mode="floor")
        cx = index - cy * gw
        cell = torch.stack([cx, cy], dim=-1).to(scores.dtype)  # (N, P, 2)
        own, nb = self._offsets_at(raw, index)
        votes_from = (cell[:, :, None, :] + nb).reshape(-1, p * self.k, 2)
        votes = self.votes.to(scores.device, scores.dtype)
        summed = torch.matmul(votes, votes_from)  # (N, P, 2)
        g = (cell + own + summed) / self.vote_count.to(scores.device, scores.dtype)
        return {"landmarks": g / self.grid - 0.5, "landmark_scores": torch.sigmoid(best)}
