"""Eager PyTorch predictor with the `CropPredictor` interface of facemark.evaluation."""

from __future__ import annotations

import os

import numpy as np
import torch

from facemark.train.checkpoint import load_model


class TorchPredictor:
    def __init__(self, checkpoint: str | os.PathLike, device: str = "cpu") -> None:
        self.model, self.contract, self.checkpoint = load_model(checkpoint)
        self.device = torch.device(device)
        self.model.to(self.device)

    @torch.inference_mode()
    def predict(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        return self.model(x).float().cpu().numpy()
