"""Landmark heads as units (docs/DESIGN.md section 5): each head is one module holding its layers, its codec
(`encode` targets, `loss`, `decode` in graph-safe torch ops), the ONNX outputs it adds, the layers int8 keeps in
fp32, and how its settings are read back from an exported graph. Train, export and bench look a head up by name
here; adding a head is a module with a `HeadUnit` subclass named `HEAD` and one line in `HEAD_MODULES`.

Torch-free at import (the CLI lists the names before torch loads); `head_unit` imports the head's module."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn

    from facemark.contract import CropContract
    from facemark.data import FaceRecord

# name -> module defining HEAD (the first is the training default)
HEAD_MODULES: dict[str, str] = {
    "pip": "facemark.train.head_pip",
    "regression": "facemark.train.head_regression",
}


class HeadUnit:
    """One landmark head. LandmarkNet calls `build` once, then `raw` on every forward; the codec decodes."""

    name: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]] = ()  # ONNX outputs added after `landmarks` (docs/DESIGN.md section 4)
    # Module names of the head's output layers (the ONNX node names contain them): int8 keeps these and
    # everything downstream in fp32 (facemark.export.variants.fp32_head_nodes).
    fp32_modules: ClassVar[tuple[str, ...]] = ()

    def check(self, image_size: int, options: dict[str, Any]) -> str | None:
        """Why these training options cannot build this head (None: they can)."""
        return None

    def new_options(self, options: dict[str, Any], records: list[FaceRecord], contract: CropContract
                    ) -> dict[str, Any]:
        """Keyword arguments of `build` for a network trained from scratch on `records`."""
        return {}

    def build(self, net: nn.Module, backbone: nn.Module, image_size: int, num_points: int, **options: Any):
        """Register the head's layers on `net` (attribute names = state_dict and ONNX node names), record its
        settings in `net.config`, and return its codec."""
        raise NotImplementedError

    def raw(self, net: nn.Module, c3: torch.Tensor, c4: torch.Tensor, pooled: torch.Tensor
            ) -> dict[str, torch.Tensor]:
        """Undecoded outputs from the backbone's layer3 / layer4 maps and pooled features."""
        raise NotImplementedError

    def options_from_graph(self, graph: onnx.GraphProto, constant, num_points: int) -> dict[str, Any]:
        """The `build` settings of an exported model (train --init model.onnx); `constant(name)` reads one."""
        return {}

    def train_options(self, config: dict[str, Any]) -> dict[str, Any]:
        """The training options that rebuild this head (a checkpoint's `train` dict) from a model config."""
        return {}


def head_unit(name: str) -> HeadUnit:
    """The head called `name`; ValueError naming the choices otherwise."""
    if name not in HEAD_MODULES:
        raise ValueError(f"unknown head {name!r}; choose from {', '.join(HEAD_MODULES)}")
    return importlib.import_module(HEAD_MODULES[name]).HEAD


def fp32_head_modules() -> tuple[str, ...]:
    """Every head's fp32 output layers (an exported graph is quantised without knowing its head)."""
    return tuple(m for name in HEAD_MODULES for m in head_unit(name).fp32_modules)
