"""The `regression` head (the tutorial's): the pooled layer4 features -> one fully connected layer -> 136 numbers,
the 68 points in normalised crop units (docs/DESIGN.md section 5)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from facemark.train.codecs import masked_mean, point_loss
from facemark.train.heads import HeadUnit


class RegressionCodec:
    """Direct regression: the network outputs the normalised points themselves."""

    name = "regression"

    def decode(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"landmarks": raw["points"]}

    def loss(self, raw: dict[str, torch.Tensor], target: torch.Tensor, loss_name: str, size: int,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        return masked_mean(point_loss(loss_name, raw["points"].float(), target, size), mask)


class RegressionHead(HeadUnit):
    name = "regression"
    fp32_modules = ("/fc/",)  # its fully connected layer (node /fc/Gemm): OpenCV DNN 4.x mis-computes it quantised

    def build(self, net: nn.Module, backbone: nn.Module, image_size: int, num_points: int,
              **options: Any) -> RegressionCodec:
        backbone.fc = nn.Linear(backbone.fc.in_features, num_points * 2)
        return RegressionCodec()

    def raw(self, net: nn.Module, c3: torch.Tensor, c4: torch.Tensor, pooled: torch.Tensor
            ) -> dict[str, torch.Tensor]:
        return {"points": net.backbone.fc(pooled).view(-1, net.num_points, 2)}


HEAD = RegressionHead()
