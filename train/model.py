"""The landmark network: torchvision ResNet18 (1-channel conv1), trained from scratch, with one of two heads.

- `regression` (the tutorial's): global pool -> fc -> 136 numbers, reshaped to (N, 68, 2).
- `pip` (pixel-in-pixel, facemark.train.codecs.PipCodec): 1x1 convolutions on a feature grid. Stride 32 uses
  layer4 directly; stride 16 (the default) adds a light FPN step -- layer4 upsampled x2 onto layer3 through a
  1x1 lateral and one 3x3 conv -- so a 160 px crop gets a 10 x 10 grid for about +10 % of the backbone's cost
  (removing layer4's stride instead would cost 1.75x).
- `presence=True` adds a face-presence logit on the pooled layer4 features (sigmoid -> `face_score`).

`forward(x)` returns the landmarks (N, 68, 2) in the contract's normalised units for every head, so
evaluation, parity and the eager predictor never care which head it is; `outputs(x)` gives every ONNX output
by name (docs/DESIGN.md section 4) and `raw(x)` the undecoded tensors the codec's loss wants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from facemark.scheme import NUM_POINTS
from facemark.train.codecs import PipCodec, RegressionCodec
from facemark.train.options import HEADS, PIP_STRIDES

ARCHS = ("resnet18",)
DEFAULT_NEIGHBORS = 10
FPN_CHANNELS = 256


class LandmarkNet(nn.Module):
    def __init__(self, arch: str = "resnet18", in_channels: int = 1, num_points: int = NUM_POINTS,
                 image_size: int = 224, head: str = "regression", pip_stride: int = 16,
                 neighbors: list[list[int]] | None = None, presence: bool = False) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose from {HEADS}")
        self.config = {"arch": arch, "in_channels": in_channels, "num_points": num_points,
                       "image_size": image_size, "head": head, "presence": presence}
        net = resnet18(weights=None)  # trained from scratch: no model hub here
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.num_points = num_points
        self.head = head
        if head == "regression":
            net.fc = nn.Linear(net.fc.in_features, num_points * 2)
            self.codec = RegressionCodec()
        else:
            if pip_stride not in PIP_STRIDES:
                raise ValueError(f"pip stride {pip_stride} not supported; choose from {PIP_STRIDES}")
            if image_size % pip_stride:
                raise ValueError(f"image size {image_size} is not a multiple of the pip stride {pip_stride}")
            if neighbors is None or len(neighbors) != num_points:
                raise ValueError("the pip head needs the mean shape's neighbour lists (one per point)")
            net.fc = nn.Identity()
            channels = 512
            if pip_stride == 16:
                self.lateral = nn.Conv2d(512, FPN_CHANNELS, 1)
                self.smooth = nn.Sequential(nn.Conv2d(FPN_CHANNELS, FPN_CHANNELS, 3, padding=1, bias=False),
                                            nn.BatchNorm2d(FPN_CHANNELS), nn.ReLU(inplace=True))
                channels = FPN_CHANNELS
            k = len(neighbors[0])
            self.score_head = nn.Conv2d(channels, num_points, 1)
            self.offset_head = nn.Conv2d(channels, num_points * 2, 1)
            self.neighbor_head = nn.Conv2d(channels, num_points * k * 2, 1)
            for conv in (self.score_head, self.offset_head, self.neighbor_head):
                nn.init.normal_(conv.weight, std=0.001)
                nn.init.zeros_(conv.bias)
            # Prior of one cell in G*G: the BCE of the score maps starts near its floor instead of at 0.69/cell.
            nn.init.constant_(self.score_head.bias, -math.log((image_size // pip_stride) ** 2 - 1))
            self.config.update(pip_stride=pip_stride, neighbors=[list(map(int, n)) for n in neighbors])
            self.codec = PipCodec(image_size // pip_stride, neighbors)
        if presence:
            self.presence_fc = nn.Linear(512, 1)
        self.backbone = net

    @property
    def output_names(self) -> list[str]:
        """The ONNX outputs, in order: landmarks first (docs/DESIGN.md section 4)."""
        names = ["landmarks"]
        if self.head == "pip":
            names.append("landmark_scores")
        if self.config["presence"]:
            names.append("face_score")
        return names

    def raw(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Undecoded head outputs (what the codec's loss takes), plus `face_logit` with a presence head."""
        n = self.backbone
        x = n.maxpool(n.relu(n.bn1(n.conv1(image))))
        c3 = n.layer3(n.layer2(n.layer1(x)))
        c4 = n.layer4(c3)
        pooled = torch.flatten(n.avgpool(c4), 1)
        out: dict[str, torch.Tensor] = {}
        if self.head == "regression":
            out["points"] = n.fc(pooled).view(-1, self.num_points, 2)
        else:
            feats = c4
            if hasattr(self, "lateral"):
                feats = self.smooth(c3 + F.interpolate(self.lateral(c4), scale_factor=2.0, mode="nearest"))
            out.update(scores=self.score_head(feats), offsets=self.offset_head(feats),
                       neighbors=self.neighbor_head(feats))
        if self.config["presence"]:
            out["face_logit"] = self.presence_fc(pooled).reshape(-1)  # (N,): a Reshape, not a Gather (OpenCV DNN)
        return out

    def decode(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.codec.decode(raw)
        if "face_logit" in raw:
            out["face_score"] = torch.sigmoid(raw["face_logit"])
        return out

    def outputs(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output of the exported model, by ONNX name."""
        return self.decode(self.raw(image))

    def forward(self, image: torch.Tensor, raw: bool = False):
        """Landmarks (N, 68, 2); with raw=True the undecoded dict (training goes through here, so that a
        DistributedDataParallel wrapper sees the call)."""
        return self.raw(image) if raw else self.outputs(image)["landmarks"]


class ExportGraph(nn.Module):
    """What gets traced to ONNX: the outputs of `LandmarkNet.outputs` as a tuple in `output_names` order."""

    def __init__(self, model: LandmarkNet) -> None:
        super().__init__()
        self.model = model
        self.names = model.output_names

    def forward(self, image: torch.Tensor):
        out = self.model.outputs(image)
        return tuple(out[name] for name in self.names)


def build_model(config: dict) -> LandmarkNet:
    """Rebuild the network from a checkpoint's `model` dict (older checkpoints: regression, no presence)."""
    return LandmarkNet(config["arch"], config["in_channels"], config["num_points"], config["image_size"],
                       head=config.get("head", "regression"), pip_stride=config.get("pip_stride", 16),
                       neighbors=config.get("neighbors"), presence=config.get("presence", False))
