"""The model variants a deployer can choose between, each with the `CropPredictor` interface.

Eager PyTorch fp32 (`torch.inference_mode`) is the reference; eager bf16 autocast + channels_last on CPU
(fp16 autocast on CUDA); ONNX Runtime fp32 / fp16 / int8 models on each provider that loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from facemark.contract import CropContract
from facemark.train.model import LandmarkNet

REFERENCE = "torch-fp32"


class Variant(Protocol):
    name: str  # e.g. "torch-fp32", "ort-int8"
    provider: str  # "torch-cpu", "cpu", "cuda", "tensorrt"
    contract: CropContract
    model_path: Path | None
    gated: bool | None  # passed its export gate (None: not applicable)

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass
class EagerVariant:
    """Eager PyTorch in `inference_mode`; `autocast` selects bf16 (CPU) / fp16 (CUDA) mixed precision."""

    model: LandmarkNet
    contract: CropContract
    model_path: Path | None
    device: str = "cpu"
    autocast: bool = False
    gated: bool | None = None
    name: str = field(init=False)
    provider: str = field(init=False)

    def __post_init__(self) -> None:
        self.dtype = (torch.float16 if self.device.startswith("cuda") else torch.bfloat16) if self.autocast else None
        self.name = REFERENCE if not self.autocast else f"torch-{'fp16' if self.device.startswith('cuda') else 'bf16'}"
        self.provider = f"torch-{self.device.split(':')[0]}"
        self.model = self.model.to(self.device).eval()
        if self.autocast:
            # channels_last lets oneDNN pick its blocked bf16 convolutions without a layout change per layer.
            self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def predict(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        if self.dtype is None:
            out = self.model(x)
        else:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=self.device.split(":")[0], dtype=self.dtype):
                out = self.model(x)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out.float().cpu().numpy()


@dataclass
class OrtVariant:
    """An exported ONNX model on one ONNX Runtime provider (through the runtime's `LandmarkModel`)."""

    precision: str
    provider: str
    model_path: Path
    threads: int | None = None
    gated: bool | None = None
    name: str = field(init=False)

    def __post_init__(self) -> None:
        from facemark.runtime.session import LandmarkModel

        self.name = f"ort-{self.precision}"
        self.session = LandmarkModel(self.model_path, provider=self.provider, threads=self.threads)
        self.contract = self.session.contract
        self.active_providers = list(self.session.providers)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.predict(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)


def file_size_mb(path: str | os.PathLike | None) -> float | None:
    return None if path is None else Path(path).stat().st_size / 1e6
