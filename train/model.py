"""The tutorial's network: torchvision ResNet18, 1-channel conv1, 136 outputs, reshaped to (N, 68, 2)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

from facemark.scheme import NUM_POINTS

ARCHS = ("resnet18",)


class LandmarkNet(nn.Module):
    def __init__(self, arch: str = "resnet18", in_channels: int = 1, num_points: int = NUM_POINTS,
                 image_size: int = 224) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
        self.config = {"arch": arch, "in_channels": in_channels, "num_points": num_points,
                       "image_size": image_size}
        net = resnet18(weights=None)  # trained from scratch: no model hub here
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Linear(net.fc.in_features, num_points * 2)
        self.backbone = net
        self.num_points = num_points

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image).view(-1, self.num_points, 2)


def build_model(config: dict) -> LandmarkNet:
    """Rebuild the network from a checkpoint's `model` dict."""
    return LandmarkNet(config["arch"], config["in_channels"], config["num_points"], config["image_size"])
