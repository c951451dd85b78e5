"""The `pip` head: pixel-in-pixel regression (Jin et al., "Pixel-in-Pixel Net", IJCV 2021), the default
(docs/DESIGN.md section 5).

Layers: 1x1 convolutions on a feature grid. Stride 32 uses layer4 directly; stride 16 (the default) adds a light
FPN step -- layer4 upsampled x2 onto layer3 through a 1x1 lateral and one 3x3 conv -- so a 160 px crop gets a
10 x 10 grid for about +10 % of the backbone's cost (removing layer4's stride instead would cost 1.75x).

On the G x G grid each landmark has a score map over the cells, an (x, y) offset inside the cell, and the offsets
of its K nearest landmarks of the mean shape, also measured from that cell. Decoding takes each landmark's best
cell and averages the landmark's own estimate with every estimate its neighbours vote for it (neighbour voting),
which keeps a face shape-consistent when one point's map is ambiguous.

Grid units: a normalised point t (crop pixel p: t = p / size - 0.5) sits at g = (t + 0.5) * G, in cell
floor(g) (clamped to the grid) with offset g - cell in [0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from facemark.contract import CropContract, box_from_landmarks
from facemark.data import FaceRecord
from facemark.train.codecs import masked_mean, nearest_neighbors, point_loss
from facemark.train.heads import HeadUnit
from facemark.train.options import PIP_STRIDES

# Score maps: BCE on every cell, weighted like PIPNet's classification term (10 : 1 to the offsets).
PIP_SCORE_WEIGHT = 10.0
FPN_CHANNELS = 256


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


def mean_shape_neighbors(records: Sequence[FaceRecord], contract: CropContract, k: int) -> list[list[int]]:
    """PIP's neighbour lists: the k nearest points of each point in the training faces' mean shape."""
    shapes = [contract.encode_points(r.landmarks, contract.crop_matrix(box_from_landmarks(r.landmarks)))
              for r in records]
    return nearest_neighbors(np.mean(shapes, axis=0), k)


def vote_neighbors(graph: onnx.GraphProto, constant: Callable[[str], np.ndarray], points: int) -> list[list[int]]:
    """PIP neighbour lists from an exported decode's constant matrix: the decode matrix (J, 2P), whose vote rows
    2P + i*K + m (x) point at column 2j for neighbour j, or the older vote matrix (P, PK) with
    votes[j, i*K + m] = 1. `constant(name)` raises KeyError / ValueError for a tensor that is not constant."""
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for name in node.input:
            try:
                matrix = constant(name)
            except (KeyError, ValueError):
                continue
            if matrix.ndim != 2:
                continue
            rows, cols = matrix.shape
            if cols == 2 * points and (rows - 2 * points) % (2 * points) == 0 and rows > 2 * points:
                k = (rows - 2 * points) // (2 * points)
                vote_rows = matrix[2 * points:2 * points + points * k]
                return (vote_rows.argmax(axis=1) // 2).reshape(points, k).astype(int).tolist()
            if rows == points and cols % points == 0:
                return matrix.argmax(axis=0).reshape(points, cols // points).astype(int).tolist()
    raise ValueError("no PIP decode matrix in the graph")


class PipHead(HeadUnit):
    name = "pip"
    outputs = ("landmark_scores",)
    # The 1x1 output convolutions: the decode takes an argmax over the score maps and reads in-cell offsets
    # trained only at the winning cell; uint8 offsets over a whole map's range would cost about 0.4 px of a
    # 128 px crop, and a quantised vote matmul more. A few % of the network's arithmetic.
    fp32_modules = ("score_head", "offset_head", "neighbor_head")

    def check(self, image_size: int, options: dict[str, Any]) -> str | None:
        stride = options.get("pip_stride", 16)
        if stride not in PIP_STRIDES:
            return f"--pip-stride {stride!r}: choose one of {', '.join(map(str, PIP_STRIDES))}"
        if image_size % stride:
            return f"--image-size {image_size} must be a multiple of the pip stride {stride}"
        return None

    def new_options(self, options: dict[str, Any], records: list[FaceRecord], contract: CropContract
                    ) -> dict[str, Any]:
        return {"pip_stride": options["pip_stride"],
                "neighbors": mean_shape_neighbors(records, contract, options["pip_neighbors"])}

    def build(self, net: nn.Module, backbone: nn.Module, image_size: int, num_points: int,
              pip_stride: int = 16, neighbors: list[list[int]] | None = None, **_: Any) -> PipCodec:
        problem = self.check(image_size, {"pip_stride": pip_stride})
        if problem:
            raise ValueError(problem)
        if neighbors is None or len(neighbors) != num_points:
            raise ValueError("the pip head needs the mean shape's neighbour lists (one per point)")
        backbone.fc = nn.Identity()
        channels = 512
        if pip_stride == 16:
            net.lateral = nn.Conv2d(512, FPN_CHANNELS, 1)
            net.smooth = nn.Sequential(nn.Conv2d(FPN_CHANNELS, FPN_CHANNELS, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(FPN_CHANNELS), nn.ReLU(inplace=True))
            channels = FPN_CHANNELS
        k = len(neighbors[0])
        net.score_head = nn.Conv2d(channels, num_points, 1)
        net.offset_head = nn.Conv2d(channels, num_points * 2, 1)
        net.neighbor_head = nn.Conv2d(channels, num_points * k * 2, 1)
        for conv in (net.score_head, net.offset_head, net.neighbor_head):
            nn.init.normal_(conv.weight, std=0.001)
            nn.init.zeros_(conv.bias)
        # Prior of one cell in G*G: the BCE of the score maps starts near its floor instead of at 0.69/cell.
        nn.init.constant_(net.score_head.bias, -math.log((image_size // pip_stride) ** 2 - 1))
        net.config.update(pip_stride=pip_stride, neighbors=[list(map(int, n)) for n in neighbors])
        return PipCodec(image_size // pip_stride, neighbors)

    def raw(self, net: nn.Module, c3: torch.Tensor, c4: torch.Tensor, pooled: torch.Tensor
            ) -> dict[str, torch.Tensor]:
        feats = c4
        if hasattr(net, "lateral"):
            feats = net.smooth(c3 + F.interpolate(net.lateral(c4), scale_factor=2.0, mode="nearest"))
        return {"scores": net.score_head(feats), "offsets": net.offset_head(feats),
                "neighbors": net.neighbor_head(feats)}

    def options_from_graph(self, graph: onnx.GraphProto, constant: Callable[[str], np.ndarray],
                           num_points: int) -> dict[str, Any]:
        # The FPN step (its one Resize, layer4 upsampled onto layer3) means stride 16.
        stride = 16 if any(n.op_type == "Resize" for n in graph.node) else 32
        return {"pip_stride": stride, "neighbors": vote_neighbors(graph, constant, num_points)}

    def train_options(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"pip_stride": config["pip_stride"], "pip_neighbors": len(config["neighbors"][0])}


HEAD = PipHead()
