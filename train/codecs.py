"""Keypoint codecs, one per head (mmpose style): `encode` landmarks -> training targets, `loss`, `decode` raw head
outputs -> landmarks in the normalised crop units of the contract (docs/DESIGN.md section 2).

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
    """Pixel-in-pixel: score maps + in-cell offsets + neighbour offsets on a G x G grid (see module doc).

    Raw head outputs: `scores` (N, P, G, G), `offsets` (N, 2P, G, G) = own x of every point, then own y, and
    `neighbors` (N, 2PK, G, G) = x of neighbour m of point i at channel i*K + m, then the y's.

    Decoding is written for every ONNX consumer (docs/DESIGN.md, section 6): all shapes are static
    but the batch, no shape arithmetic, no integer division. One gather reads every offset map at its point's
    best cell; the cell's own coordinates come from a constant table; neighbour voting, the average and the
    grid-to-crop scaling are one constant matrix. Graph: Reshape, ReduceMax, Sigmoid, Gather, ArgMax, Concat,
    Reshape, Add, GatherElements, Add, Gather, Reshape, Add, MatMul, Sub, Reshape."""

    name = "pip"

    def __init__(self, grid: int, neighbors: list[list[int]]) -> None:
        self.grid = grid
        self.neighbors = torch.tensor(neighbors, dtype=torch.long)  # (P, K)
        p, k = self.neighbors.shape
        self.num_points, self.k = p, k
        cells = grid * grid
        self.cells = cells
        own = torch.arange(p)
        voter = own.repeat_interleave(k)  # point i for its K neighbour votes
        # Gathered layout J = [own x (P), own y (P), vote x (PK), vote y (PK)]: the channels of
        # cat(offsets, neighbors). Entry j reads its map at the best cell of point `point_of[j]`.
        self.point_of = torch.cat([own, own, voter, voter])
        self.map_base = torch.arange(len(self.point_of)) * cells  # where map j starts in the flattened maps
        self.is_y = torch.cat([torch.zeros(p), torch.ones(p), torch.zeros(p * k), torch.ones(p * k)]).long()
        self.coord_base = self.is_y * cells  # into cell_table = [x of every cell, y of every cell]
        index = torch.arange(cells)
        self.cell_table = torch.cat([index % grid, index // grid]).float()
        # Estimates per point: its own + one for every point that has it among its K neighbours.
        self.vote_count = torch.bincount(self.neighbors.reshape(-1), minlength=p).float()[:, None] + 1.0
        self.decode_matrix = self._decode_matrix()

    def _decode_matrix(self) -> torch.Tensor:
        """(J, 2P): gathered cell + offset values -> landmark (x0, y0, x1, y1, ...) in normalised crop units
        minus the -0.5 shift: each point averages its own estimate with the K-neighbour votes cast for it."""
        p = self.num_points
        count = self.vote_count[:, 0]
        matrix = torch.zeros(len(self.point_of), 2 * p)
        target = torch.cat([torch.arange(p), torch.arange(p), self.neighbors.reshape(-1), self.neighbors.reshape(-1)])
        matrix[torch.arange(len(target)), 2 * target + self.is_y] = 1.0 / count[target]
        return matrix / self.grid

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

    def _gather(self, raw: dict[str, torch.Tensor], at_point: torch.Tensor) -> torch.Tensor:
        """Every offset map read at its point's cell: (N, J) for `at_point` = the cell index of point_of[j]."""
        maps = torch.cat([raw["offsets"], raw["neighbors"]], dim=1).reshape(-1, len(self.point_of) * self.cells)
        return maps.gather(1, at_point + self.map_base.to(at_point.device))

    def _offsets_at(self, raw: dict[str, torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Own offsets (N, P, 2) and neighbour offsets (N, P, K, 2) read at one cell per point (`index`, (N, P))."""
        p, k = self.num_points, self.k
        values = self._gather(raw, index[:, self.point_of.to(index.device)])
        own = torch.stack([values[:, :p], values[:, p:2 * p]], dim=-1)
        nb = torch.stack([values[:, 2 * p:2 * p + p * k], values[:, 2 * p + p * k:]], dim=-1).reshape(-1, p, k, 2)
        return own, nb

    # --- decoding (torch ops only: it runs inside the exported graph) -------------------------------------
    def decode(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scores = raw["scores"]
        device, dtype = scores.device, scores.dtype
        flat = scores.reshape(-1, self.num_points, self.cells)
        best = flat.amax(dim=2)  # (N, P)
        # Each of the J estimates takes the argmax of its point's map; the maps are gathered before the argmax,
        # not the argmax after it: OpenCV DNN 4.x mis-shapes a Gather on an ArgMax output at batch 1.
        at_point = flat[:, self.point_of.to(device)].argmax(dim=2)  # (N, J)
        # A (2C, 1) table: consumers that keep 1-D tensors as (n, 1) (OpenCV DNN) gather the same shape.
        cell = self.cell_table[:, None].to(device, dtype)[at_point + self.coord_base.to(device)]
        cell = cell.reshape(-1, len(self.point_of))
        values = self._gather(raw, at_point) + cell  # (N, J): grid coordinates of every estimate
        points = torch.matmul(values, self.decode_matrix.to(device, dtype)) - 0.5
        return {"landmarks": points.reshape(-1, self.num_points, 2), "landmark_scores": torch.sigmoid(best)}
