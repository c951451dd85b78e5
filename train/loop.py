"""The training loop: one pass over the data per epoch, model selection by validation NME, resumable.

Runs on CUDA (AMP, channels_last, cuDNN benchmark) or CPU (bf16 autocast where the CPU has bf16 units),
and under `torchrun` as DistributedDataParallel (one process per GPU; rank 0 writes files and reports).
Library code: progress goes to a callback, interruption is a flag; the CLI owns the terminal and signals.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from facemark.contract import CropContract
from facemark.data import FaceRecord, load_records, split_records
from facemark.errors import DataError
from facemark.metrics import nme_per_face
from facemark.train.checkpoint import load_checkpoint, save_checkpoint
from facemark.train.dataset import AugmentConfig, AugmentedFaces, FaceCache, validation_tensors
from facemark.train.model import LandmarkNet


@dataclass
class TrainConfig:
    data: list[str]
    val_data: list[str] = field(default_factory=list)  # empty: the deterministic split of `data`
    out: str = "runs/train"
    epochs: int = 60
    batch_size: int = 64
    image_size: int = 224
    crop_scale: float = 1.25
    loss: str = "l1"  # l1 | mse | wing
    optimizer: str = "adamw"  # adamw | adam
    lr: float = 3e-4
    weight_decay: float = 1e-4
    schedule: str = "onecycle"  # onecycle | cosine | constant
    device: str = "auto"
    amp: bool = True  # CUDA: fp16/bf16 autocast; CPU: bf16 autocast where supported
    max_images: int | None = None
    seed: int = 0
    val_fraction: float = 0.1
    workers: int = 1
    augment: dict = field(default_factory=lambda: asdict(AugmentConfig()))

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_nme: float
    val_nme_median: float
    lr: float
    images_per_s: float
    data_wait_share: float
    seconds: float
    best: bool


@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    best_val_nme: float
    history: list[EpochStats]
    train_faces: int
    val_faces: int
    interrupted: bool = False


class Callbacks:
    """Override what you need; the defaults do nothing."""

    def on_message(self, text: str) -> None: ...
    def on_cache_progress(self, done: int, total: int) -> None: ...
    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def on_step(self, step: int, loss: float, images_per_s: float) -> None: ...
    def on_epoch_end(self, stats: EpochStats) -> None: ...


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DataError("--device cuda was asked for, but torch sees no CUDA device here")
    return torch.device(requested)


def cpu_has_bf16() -> bool:
    """bf16 autocast pays off only with native bf16 units (AVX512-BF16 or AMX); elsewhere it is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def landmark_loss(name: str, pred: torch.Tensor, target: torch.Tensor, size: int) -> torch.Tensor:
    if name == "l1":
        return (pred - target).abs().mean()
    if name == "mse":
        return ((pred - target) ** 2).mean()
    if name == "wing":  # Feng et al. 2018, in crop pixels: w=10, eps=2
        x = (pred - target).abs() * size
        w, eps = 10.0, 2.0
        c = w - w * math.log1p(w / eps)
        return torch.where(x < w, w * torch.log1p(x / eps), x - c).mean() / size
    raise ValueError(f"unknown loss {name!r} (l1, mse, wing)")


def _ignore_signals_in_worker(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: loader workers must not die of it, the main process stops
    # cleanly at a step boundary and saves last.pt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) when launched by torchrun, else (0, 0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def load_split(cfg: TrainConfig, warn: Callable[[str], None]) -> tuple[list[FaceRecord], list[FaceRecord]]:
    records = load_records(cfg.data, warn)
    if cfg.val_data:
        train, val = records, load_records(cfg.val_data, warn)
    else:
        train, val = split_records(records, cfg.val_fraction, cfg.seed)
    if cfg.max_images:
        train, val = train[: cfg.max_images], val[: max(1, cfg.max_images // 4)]
    if not train or not val:
        raise DataError(f"need training and validation faces, got {len(train)} / {len(val)}")
    return train, val


def _rng_state() -> dict:
    # Loader workers reseed from torch's generator each epoch, so torch's state is the one that matters.
    return {"torch": torch.get_rng_state()}


def _build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r} (onecycle, cosine, constant)")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, loss_name: str, amp_dtype: torch.dtype | None,
               device: torch.device) -> torch.Tensor:
    """One optimisation step (channels_last input, autocast when `amp_dtype`); returns the loss."""
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    y = y.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        pred = model(x)
    loss = landmark_loss(loss_name, pred.float(), y, x.shape[-1])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


@torch.inference_mode()
def validate(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, device: torch.device,
             batch_size: int = 64) -> np.ndarray:
    """NME per validation face in fp32 (crop space: the crop is a similarity, NME is unchanged)."""
    model.eval()
    preds = []
    for i in range(0, len(inputs), batch_size):
        x = torch.from_numpy(inputs[i:i + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
        preds.append(model(x).float().cpu().numpy())
    size = inputs.shape[-1]
    return nme_per_face((np.concatenate(preds) + 0.5) * size, (targets + 0.5) * size)


def train(cfg: TrainConfig, callbacks: Callbacks | None = None, resume: str | os.PathLike | None = None,
          stop_requested: Callable[[], bool] = lambda: False) -> TrainResult:
    """Train per `cfg` (or continue `resume`'s run); returns paths and per-epoch statistics."""
    cb = callbacks or Callbacks()
    resumed = load_checkpoint(resume) if resume else None
    if resumed is not None:
        cfg = TrainConfig.from_dict({**resumed["train"], "device": cfg.device, "workers": cfg.workers})
    rank, local_rank, world = _dist_info()
    distributed = world > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = resolve_device(f"cuda:{local_rank}" if distributed and torch.cuda.is_available() else cfg.device)
    is_main = rank == 0
    log = cb.on_message if is_main else (lambda _: None)

    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    contract = CropContract(size=cfg.image_size, scale=cfg.crop_scale)
    train_records, val_records = load_split(cfg, log)
    log(f"faces: {len(train_records)} train, {len(val_records)} validation "
        f"({'--val-data' if cfg.val_data else f'seeded split {cfg.val_fraction:.0%}, seed {cfg.seed}'})")

    done = [0]
    total_decode = len(train_records) + len(val_records)

    def tick(n: int) -> None:
        done[0] += n
        cb.on_cache_progress(done[0], total_decode)

    cache = FaceCache(train_records, contract, progress=tick if is_main else None)
    val_inputs, val_targets = validation_tensors(val_records, contract, progress=tick if is_main else None)
    dataset = AugmentedFaces(cache, contract, AugmentConfig(**cfg.augment))
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=cfg.seed) if distributed else None
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        drop_last=len(dataset) > cfg.batch_size,
        num_workers=cfg.workers, persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.workers > 0 else None, worker_init_fn=_ignore_signals_in_worker,
    )

    model = LandmarkNet(image_size=cfg.image_size).to(device).to(memory_format=torch.channels_last)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay if cfg.optimizer == "adamw" else 0)
    scheduler = _build_scheduler(cfg, optimizer, len(loader))
    amp_dtype = autocast_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start_epoch, best_nme, history = 0, math.inf, []
    if resumed is not None:
        model.load_state_dict(resumed["state_dict"])
        state = resumed["state"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch, best_nme = state["next_epoch"], state["best_val_nme"]
        history = [EpochStats(**h) for h in state["history"]]
        log(f"resumed {resume} at epoch {start_epoch + 1}/{cfg.epochs} (best val NME {100 * best_nme:.2f}%)")
    train_model: nn.Module = nn.parallel.DistributedDataParallel(model) if distributed else model
    log(f"device {device}, autocast {amp_dtype or 'off'}, channels_last, {world} process(es), "
        f"{cfg.workers} loader worker(s)")

    best_path, last_path = out / "best.pt", out / "last.pt"
    metrics_path = out / "metrics.jsonl"
    train_dict = {**asdict(cfg), "train_faces": len(train_records), "val_faces": len(val_records)}

    def save_last(next_epoch: int) -> None:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": _rng_state(), "next_epoch": next_epoch,
                 "best_val_nme": best_nme, "history": [asdict(h) for h in history]}
        metrics = asdict(history[-1]) if history else {"epoch": next_epoch}
        save_checkpoint(last_path, model, contract, train_dict, metrics, state)

    interrupted = False
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_model.train()
        cb.on_epoch_start(epoch, cfg.epochs, len(loader)) if is_main else None
        t0 = time.perf_counter()
        wait = 0.0
        loss_sum, seen = 0.0, 0
        t_ready = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            wait += time.perf_counter() - t_ready
            loss = train_step(train_model, optimizer, scaler, x, y, cfg.loss, amp_dtype, device)
            scheduler.step()
            loss_sum += loss.item() * len(x)
            seen += len(x)
            if is_main:
                cb.on_step(step + 1, loss.item(), seen * world / (time.perf_counter() - t0))
            t_ready = time.perf_counter()
            if stop_requested():
                interrupted = True
                break
        if interrupted:
            if is_main:
                save_last(epoch)  # the interrupted epoch runs again on --resume
                log(f"interrupted: saved {last_path}; continue with --resume {last_path}")
            break
        seconds = time.perf_counter() - t0
        errors = validate(model, val_inputs, val_targets, device)
        val_nme = float(errors.mean())
        is_best = val_nme < best_nme
        best_nme = min(best_nme, val_nme)
        stats = EpochStats(epoch + 1, loss_sum / max(seen, 1), val_nme, float(np.median(errors)),
                           optimizer.param_groups[0]["lr"], seen * world / seconds, wait / seconds, seconds, is_best)
        history.append(stats)
        if is_main:
            metrics = asdict(stats)
            if is_best:
                save_checkpoint(best_path, model, contract, train_dict, metrics)
            save_last(epoch + 1)
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            cb.on_epoch_end(stats)
    if distributed:
        dist.destroy_process_group()
    return TrainResult(best_path, last_path, best_nme, history, len(train_records), len(val_records), interrupted)
