"""The landmark network: torchvision ResNet18 (1-channel conv1), trained from scratch, with one landmark head.

The head is a unit looked up by name (facemark.train.heads: `pip`, the default, and `regression`, the
tutorial's); it adds its layers to the network, computes its raw outputs from the backbone's maps and brings
its codec. `presence=True` adds a face-presence logit on the pooled layer4 features (sigmoid -> `face_score`).

`forward(x)` returns the landmarks (N, 68, 2) in the contract's normalised units for every head, so
evaluation, parity and the eager predictor never care which head it is; `outputs(x)` gives every ONNX output
by name (docs/DESIGN.md section 4) and `raw(x)` the undecoded tensors the codec's loss wants.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models import resnet18

from facemark.scheme import NUM_POINTS
from facemark.train.heads import head_unit

ARCHS = ("resnet18",)


class LandmarkNet(nn.Module):
    def __init__(self, arch: str = "resnet18", in_channels: int = 1, num_points: int = NUM_POINTS,
                 image_size: int = 224, head: str = "regression", presence: bool = False,
                 **head_options: Any) -> None:
        """`head_options`: the head's own settings (pip: pip_stride, neighbors)."""
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
        unit = head_unit(head)
        self.config = {"arch": arch, "in_channels": in_channels, "num_points": num_points,
                       "image_size": image_size, "head": head, "presence": presence}
        net = resnet18(weights=None)  # trained from scratch: no model hub here
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.num_points = num_points
        self.head = head
        self.unit = unit
        self.codec = unit.build(self, net, image_size, num_points, **head_options)
        if presence:
            self.presence_fc = nn.Linear(512, 1)
        self.backbone = net

    @property
    def output_names(self) -> list[str]:
        """The ONNX outputs, in order: landmarks first (docs/DESIGN.md section 4)."""
        names = ["landmarks", *self.unit.outputs]
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
        out = self.unit.raw(self, c3, c4, pooled)
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
    """Rebuild the network from a checkpoint's `model` dict (older checkpoints: regression, no presence); the
    keys beyond the common ones are the head's settings."""
    common = ("arch", "in_channels", "num_points", "image_size", "head", "presence")
    return LandmarkNet(config["arch"], config["in_channels"], config["num_points"], config["image_size"],
                       head=config.get("head", "regression"), presence=config.get("presence", False),
                       **{k: v for k, v in config.items() if k not in common})
