"""Checkpoints (docs/DESIGN.md section 3): plain types only, loadable with weights_only=True, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from facemark.contract import CropContract
from facemark.errors import ModelError
from facemark.fileio import file_sha256, write_with_atomic  # noqa: F401 -- file_sha256 re-exported
from facemark.metadata import CHECKPOINT_FORMAT
from facemark.train.model import LandmarkNet, build_model


def save_checkpoint(path: str | os.PathLike, model: LandmarkNet, contract: CropContract, train_config: dict,
                    metrics: dict, state: dict | None = None) -> None:
    """Write best.pt / last.pt. `state` (optimizer, scheduler, scaler, RNG...) only for resumable files."""
    net = model.module if hasattr(model, "module") else model  # unwrap DDP
    doc = {
        "format": CHECKPOINT_FORMAT,
        "model": dict(net.config),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "contract": contract.to_dict(),
        "train": train_config,
        "metrics": metrics,
    }
    if state is not None:
        doc["state"] = state
    write_with_atomic(path, lambda tmp: torch.save(doc, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such checkpoint")
    try:
        doc = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        # torch's message suggests weights_only=False: arbitrary code execution for an untrusted file. Never
        # relayed; facemark checkpoints hold plain types only (docs/DESIGN.md section 3).
        kind = "holds objects other than tensors and plain types" if "weights_only" in str(exc) else "is damaged"
        raise ModelError(f"{p}: not a facemark checkpoint: it {kind} ({exc.__class__.__name__}); facemark only "
                         "loads plain-type checkpoints written by `facemark train`") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ModelError(f"{p}: not a facemark checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    return doc


def load_model(path: str | os.PathLike) -> tuple[LandmarkNet, CropContract, dict]:
    """The network in eval mode on CPU, its contract, and the whole checkpoint dict."""
    doc = load_checkpoint(path)
    try:
        model = build_model(doc["model"])
        model.load_state_dict(doc["state_dict"])
        contract = CropContract.from_dict(doc["contract"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ModelError(f"{path}: the checkpoint's network cannot be rebuilt here ({exc.__class__.__name__}: "
                         f"{detail})") from None
    model.eval()
    return model, contract, doc

