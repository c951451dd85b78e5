"""Eager PyTorch predictor with the `CropPredictor` interface of facemark.inference."""

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
    def predict_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the network by ONNX name (landmarks, and landmark_scores / face_score if any)."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        return {name: value.float().cpu().numpy() for name, value in self.model.outputs(x).items()}

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.predict_outputs(batch)["landmarks"]
