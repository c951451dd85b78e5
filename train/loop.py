"""The training loop: one pass over the data per epoch, model selection by validation NME, resumable.

Runs on CUDA (AMP, channels_last, cuDNN benchmark) or CPU (bf16 autocast where the CPU has bf16 units),
and under `torchrun` as DistributedDataParallel (one process per GPU; rank 0 writes files and reports).
Library code: progress goes to a callback, interruption is a flag; the CLI owns the terminal and signals.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from facemark.contract import Box, CropContract, box_from_landmarks
from facemark.data import FaceRecord, load_records, split_of, split_records
from facemark.errors import DataError
from facemark.fileio import check_writable_folder, file_sha256
from facemark.metrics import nme_per_face, roc_auc
from facemark.reporting import summarize_warnings
from facemark.train.checkpoint import load_checkpoint, save_checkpoint
from facemark.train.dataset import (
    VAL_BOXES,
    AugmentConfig,
    AugmentedFaces,
    FaceCache,
    NegativeSource,
    validation_negatives,
    validation_tensors,
)
from facemark.train.heads import head_unit
from facemark.train.model import LandmarkNet, build_model
from facemark.train.onnx_init import FOLDED_BATCHNORM, calibrate_folded_batchnorm, checkpoint_from_onnx, is_onnx
from facemark.train.options import DEVICES, HEADS, LOSSES, OPTIMIZERS, SCHEDULES


@dataclass
class TrainConfig:
    data: list[str]
    val_data: list[str] = field(default_factory=list)  # empty: the deterministic split of `data`
    out: str = "runs/train"
    cwd: str = ""  # the folder relative --data / --out-dir paths were given in (resolved against it on --resume)
    epochs: int = 60
    batch_size: int = 64
    image_size: int = 224
    crop_scale: float = 1.25
    loss: str = "l1"  # l1 | mse | wing (the offsets' loss for the pip head)
    head: str = "regression"  # regression | pip (older checkpoints have no key: regression)
    pip_stride: int = 16
    pip_neighbors: int = 10
    presence: bool = False  # face-presence head, trained on face-free crops of the training photos
    negatives_per_face: float = 0.2
    presence_weight: float = 1.0
    optimizer: str = "adamw"  # adamw | adam
    lr: float = 3e-4
    weight_decay: float = 1e-4
    schedule: str = "onecycle"  # onecycle | cosine | constant
    device: str = "auto"
    amp: bool = True  # CUDA: fp16/bf16 autocast; CPU: bf16 autocast where supported
    max_images: int | None = None
    seed: int = 0  # initialisation, augmentation and batch order
    # The validation split's hash seed, apart from `seed`: runs with other seeds validate on the same faces.
    split_seed: int = 0
    val_fraction: float = 0.1
    workers: int = 1
    augment: dict = field(default_factory=lambda: asdict(AugmentConfig()))
    init: str = ""  # a checkpoint (or exported .onnx) whose weights start this run; fresh optimizer and schedule
    # Model selection: NME on landmark boxes (a refinement pass's crops) or on seeded detector-like boxes (the
    # first pass's crops: what one-pass inference sees). Both are reported every epoch.
    val_boxes: str = "landmarks"
    ema: float = 0.0  # > 0: validate and keep an exponential moving average of the weights with this decay
    # `facemark detectors boxes` output: each face's real first-pass box, used for the detector-like crops
    # (augment det_p) and the detector validation boxes instead of the modelled error where the detector found it.
    first_pass_boxes: str = ""
    first_pass_boxes_sha256: str = ""  # of that file when the run began (set by train; --resume refuses a change)
    # Distillation: an exported model whose `accurate` preset (two passes with flip) labels every training face;
    # the targets become (1 - distill) x annotation + distill x the teacher's points (train/distill.py).
    teacher: str = ""
    distill: float = 0.5

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.val_fraction, config.split_seed = split_of(data)  # older runs split by their training seed
        return config

    def validate(self) -> None:
        """Every choice and number checked before any data is read: one DataError naming the option."""
        for name, value, allowed in (("loss", self.loss, LOSSES), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("schedule", self.schedule, SCHEDULES), ("head", self.head, HEADS)):
            if value not in allowed:
                raise DataError(f"--{name} {value!r}: choose one of {', '.join(map(str, allowed))}")
        if self.device.split(":")[0] not in DEVICES:
            raise DataError(f"--device {self.device!r}: choose one of {', '.join(DEVICES)} (or cuda:N)")
        if self.epochs < 1 or self.batch_size < 1 or self.image_size < 16:
            raise DataError("--epochs and --batch-size must be >= 1 and --image-size >= 16")
        if self.val_boxes not in VAL_BOXES:
            raise DataError(f"--val-boxes {self.val_boxes!r}: choose one of {', '.join(VAL_BOXES)}")
        if self.first_pass_boxes:
            read_first_pass_boxes(self.first_pass_boxes)  # a bad file is refused before any run folder is made
        if not 0.0 <= self.distill <= 1.0:
            raise DataError(f"--distill {self.distill}: a weight in [0, 1]")
        if self.teacher and not Path(self.teacher).is_file():
            raise DataError(f"--teacher {self.teacher}: no such model file (an exported .onnx)")
        if not 0.0 <= self.ema < 1.0:
            raise DataError(f"--ema {self.ema}: a decay in [0, 1) (0 = off)")
        problem = head_unit(self.head).check(self.image_size, self.head_options())
        if problem:
            raise DataError(problem)

    def head_options(self) -> dict[str, Any]:
        """The training options the head reads (its own, e.g. pip_stride)."""
        return {"pip_stride": self.pip_stride, "pip_neighbors": self.pip_neighbors}


@dataclass
class EpochStats:
    epoch: int  # 0: the initial weights of a fine-tune (--init), before any step
    train_loss: float | None
    val_nme: float
    val_nme_median: float
    lr: float
    images_per_s: float
    data_wait_share: float
    seconds: float
    best: bool
    val_presence_auc: float | None = None  # face crops vs face-free crops of the validation photos
    val_nme_landmark_boxes: float | None = None  # both box kinds, whichever `val_boxes` selects on
    val_nme_detector_boxes: float | None = None


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


def unwrap(model: nn.Module) -> LandmarkNet:
    return model.module if hasattr(model, "module") else model


def compute_loss(net: LandmarkNet, raw: dict[str, torch.Tensor], target: torch.Tensor, is_face: torch.Tensor | None,
                 loss_name: str, size: int, presence_weight: float = 1.0) -> torch.Tensor:
    """The head codec's landmark loss on face samples, plus the presence BCE on all samples when present."""
    mask = is_face > 0.5 if is_face is not None else None
    loss = net.codec.loss(raw, target, loss_name, size, mask)
    if "face_logit" in raw and is_face is not None:
        loss = loss + presence_weight * F.binary_cross_entropy_with_logits(raw["face_logit"].float(), is_face)
    return loss


def _ignore_signals_in_worker(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: loader workers must not die of it, the main process stops
    # cleanly at a step boundary and saves last.pt. But a worker must never outlive its parent (killed, or
    # crashed): Linux delivers SIGKILL to it when the parent dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _shutdown_loader(loader: DataLoader) -> None:
    """Stop persistent loader workers now (an exception would otherwise leave them for interpreter exit)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


def resolve_resume(resume: str | os.PathLike, requested: TrainConfig | None, explicit: set[str]
                   ) -> tuple[dict, TrainConfig]:
    """The checkpoint to resume and the config to continue with.

    The run continues in the checkpoint's own folder with its saved settings; relative data paths resolve
    against the folder they were given in. A larger `epochs` among `explicit` options extends the schedule;
    any other explicit option that contradicts the saved run is refused with one line."""
    path = Path(resume)
    doc = load_checkpoint(path)
    if "state" not in doc:
        raise DataError(f"{path}: holds no training state (optimizer, scheduler); resume from the run's last.pt")
    saved = TrainConfig.from_dict(doc["train"])
    base = Path(saved.cwd) if saved.cwd else Path.cwd()
    saved.data = [str(p if Path(p).is_absolute() else base / p) for p in saved.data]
    saved.val_data = [str(p if Path(p).is_absolute() else base / p) for p in saved.val_data]
    if saved.first_pass_boxes and not Path(saved.first_pass_boxes).is_absolute():
        saved.first_pass_boxes = str(base / saved.first_pass_boxes)
    saved.out = str(path.resolve().parent)
    if requested is not None:
        fields_given = explicit & {f.name for f in fields(TrainConfig)}  # augmentation flags are not compared
        for name in sorted(fields_given - {"epochs", "device", "workers", "out"}):
            mine, theirs = getattr(requested, name), getattr(saved, name)
            if name in ("data", "val_data"):
                mine = [str(Path(p).resolve()) for p in mine]
                theirs = [str(Path(p).resolve()) for p in theirs]
            if name == "first_pass_boxes":
                mine, theirs = (str(Path(p).resolve()) if p else "" for p in (mine, theirs))
            if mine != theirs:
                raise DataError(f"--resume {path}: --{name.replace('_', '-')} {mine!r} contradicts the saved run "
                                f"({theirs!r}); drop the option or start a new run")
        if "out" in explicit and Path(requested.out).resolve() != Path(saved.out):
            raise DataError(f"--resume {path}: the run continues in its own folder {saved.out}, not --out-dir "
                            f"{requested.out}")
        if "epochs" in explicit:
            done = doc["state"]["next_epoch"]
            if requested.epochs < saved.epochs:
                raise DataError(f"--resume {path}: --epochs {requested.epochs} is below the run's {saved.epochs}; "
                                "a schedule can be extended, not shortened")
            saved.epochs = max(requested.epochs, done)
        saved.device, saved.workers = requested.device, requested.workers
    return doc, saved


# The network's shape: a run started from --init takes these from the checkpoint.
ARCHITECTURE_FIELDS = ("image_size", "crop_scale", "head", "pip_stride", "pip_neighbors", "presence")
# ... except these, which the weights do not fix: the pip network is fully convolutional (its grid follows the
# crop side), so --init at another --image-size fine-tunes the same weights at another resolution.
RESIZABLE_FIELDS = {"pip": ("image_size",)}


def resolve_init(init: str | os.PathLike, cfg: TrainConfig, explicit: set[str]) -> dict:
    """The checkpoint that starts a fine-tuning run; `cfg` takes its architecture (an explicit contradicting
    option is refused with one line). Everything else (data, schedule, augmentation) is this run's own."""
    path = Path(init)
    doc = checkpoint_from_onnx(path) if is_onnx(path) else load_checkpoint(path)
    saved = TrainConfig.from_dict({"data": [], **doc["train"]})
    for name in ARCHITECTURE_FIELDS:
        mine, theirs = getattr(cfg, name), getattr(saved, name)
        if name in explicit and mine != theirs and name in RESIZABLE_FIELDS.get(saved.head, ()):
            continue  # validated with the rest of cfg (the crop side must be a multiple of the stride)
        if name in explicit and mine != theirs:
            raise DataError(f"--init {path}: --{name.replace('_', '-')} {mine!r} contradicts the checkpoint's "
                            f"network ({theirs!r}); drop the option")
        setattr(cfg, name, theirs)
    if not cfg.val_data and not saved.val_data:
        # The checkpoint's validation faces must stay out of training: the run keeps its split.
        if "split_seed" in explicit and cfg.split_seed != saved.split_seed:
            raise DataError(f"--init {path}: --split-seed {cfg.split_seed} would train on the checkpoint's "
                            f"validation faces (it split with seed {saved.split_seed}); drop the option")
        cfg.val_fraction, cfg.split_seed = saved.val_fraction, saved.split_seed
    cfg.init = str(path.resolve())
    doc["recipe"] = fine_tune_recipe(cfg, doc["train"], explicit)
    return doc


# Fine-tuning (--init): a new run from trained weights takes a gentler recipe than a run from scratch, unless the
# user gives these options: the peak LR of the shipped model's last fine-tunes (3e-4, the from-scratch peak, undid
# a trained model in one epoch: 3.5 % -> 6.5 %), and the augmentation the source was trained with (recorded in a
# checkpoint; an exported .onnx records none: the shipped chain's last fine-tunes' then).
FINE_TUNE_LR = 5e-5
FINE_TUNE_AUGMENT = {"rotate_deg": 10.0, "zoom": 0.05, "shift": 0.05}
AUGMENT_OPTIONS = {"rotate": "rotate_deg", "zoom": "zoom", "shift": "shift", "detector_boxes": "det_p",
                   "flip": "flip", "blur": "blur_p", "motion_blur": "motion_blur",
                   "occlusion": "occlude_p"}  # train's option -> AugmentConfig field


def fine_tune_recipe(cfg: TrainConfig, source_train: dict, explicit: set[str]) -> str:
    """Set the fine-tune defaults (FINE_TUNE_LR, the source's augmentation) on `cfg` where the user gave no
    option; returns the line that says what the run uses."""
    if "lr" not in explicit:
        cfg.lr = FINE_TUNE_LR
    source_augment = source_train.get("augment") or FINE_TUNE_AUGMENT
    augment = dict(cfg.augment)
    for option, key in AUGMENT_OPTIONS.items():
        if option not in explicit and key in source_augment:
            augment[key] = source_augment[key]
    cfg.augment = augment
    origin = "the checkpoint's" if source_train.get("augment") else "the fine-tune default"
    return (f"fine-tune recipe: peak LR {cfg.lr:g}{'' if 'lr' in explicit else ' (fine-tune default)'}, "
            f"rotation {augment['rotate_deg']:g} deg, zoom {augment['zoom']:g}, shift {augment['shift']:g}, "
            f"detector-like crops {augment['det_p']:g} ({origin} augmentation where not given)")


RUN_CLAIM = ".claimed"  # a folder made in a run folder by the run that took it: mkdir is atomic
RUN_FILES = ("best.pt", "last.pt", "metrics.jsonl")  # what a run writes in its folder


def next_free_folder(out: str | os.PathLike) -> Path:
    """`out` when it holds no run yet, else the first free `out-2`, `out-3`, ...; the folder returned is claimed
    (an atomic mkdir), so another run started at the same time with the same `out` gets the next one."""
    path = Path(out)
    k = 1
    while True:
        candidate = path if k == 1 else path.with_name(f"{path.name}-{k}")
        if not _holds_run(candidate) and _claim(candidate):
            return candidate
        k += 1


def _claim(folder: Path) -> bool:
    check_writable_folder(folder, "run folder")  # one line, before any data is read
    try:
        (folder / RUN_CLAIM).mkdir()
    except FileExistsError:
        return False
    return True


def _holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in RUN_FILES)


def _dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) when launched by torchrun, else (0, 0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def _first_pass_box(value: object) -> Box:
    """Four finite numbers (x, y, w, h) with positive size; ValueError otherwise (bools and strings included)."""
    if not isinstance(value, list) or len(value) != 4 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{value!r} is not a list of four numbers")
    box = tuple(float(v) for v in value)
    if not (all(math.isfinite(v) for v in box) and box[2] > 0 and box[3] > 0):
        raise ValueError(f"{list(box)} is not four finite numbers with positive size")
    return box


def read_first_pass_boxes(path: str) -> tuple[dict[str, Box | None], dict[str, Box]]:
    """(face key -> first-pass box, None where the detector missed it; face key -> the face's landmark box when
    the file was made) from a `facemark detectors boxes` file; one DataError naming the file when it is missing,
    unreadable, from an older facemark (no landmark boxes) or holds a box that is not four finite numbers with
    positive size."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        faces, landmark_boxes = document["faces"], document["landmark_boxes"]
        if not isinstance(faces, dict) or not isinstance(landmark_boxes, dict):
            raise TypeError("'faces' and 'landmark_boxes' must be objects")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (make it with `facemark detectors boxes`)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a first-pass boxes file from this facemark's `facemark detectors boxes` "
                        f"({exc.__class__.__name__}: {exc})") from None
    boxes: dict[str, Box | None] = {}
    face_boxes: dict[str, Box] = {}
    for key, value in faces.items():  # JSON object keys are strings
        try:
            boxes[key] = None if value is None else _first_pass_box(value)
            if key not in landmark_boxes:
                raise ValueError("no landmark box")
            face_boxes[key] = _first_pass_box(landmark_boxes[key])
        except ValueError as exc:
            raise DataError(f"{path}: face {key}: {exc}") from None
    return boxes, face_boxes


# A face's landmark box in the file and in the data may differ by the file's rounding (0.01 px), no more.
LANDMARK_BOX_TOLERANCE_PX = 0.5


def first_pass_boxes_for(path: str, records: Sequence[FaceRecord]) -> dict[str, Box | None]:
    """The first-pass boxes of `records` (training and validation faces) from `path`, checked to be theirs: face
    keys are file name + face index, so a face whose landmark box is not the one the file was made with (another
    folder with the same file names, other annotations; also two faces under one key) is refused in one line
    instead of taking another face's box."""
    boxes, landmark_boxes = read_first_pass_boxes(path)
    matched = 0
    for record in records:
        if record.key not in boxes:
            continue
        matched += 1
        mine, theirs = box_from_landmarks(record.landmarks), landmark_boxes[record.key]
        if max(abs(a - b) for a, b in zip(mine, theirs, strict=True)) > LANDMARK_BOX_TOLERANCE_PX:
            raise DataError(f"--first-pass-boxes {path}: face {record.key} was another face when the file was made "
                            f"(landmark box {[round(v, 1) for v in theirs]}, here {[round(v, 1) for v in mine]}); "
                            "make the file from this data with `facemark detectors boxes`")
    if not matched:
        raise DataError(f"--first-pass-boxes {path}: holds none of these {len(records)} faces; make it from this "
                        "data with `facemark detectors boxes`")
    return boxes


def load_split(cfg: TrainConfig, warn: Callable[[str], None], verbose: bool = False
               ) -> tuple[list[FaceRecord], list[FaceRecord]]:
    """Training and validation faces; data warnings summarised (one line per kind unless `verbose`).
    --max-images caps the training faces only: the validation split stays whole, so its NME stays comparable."""
    problems: list[str] = []
    try:
        records = load_records(cfg.data, problems.append)
        if cfg.val_data:
            train, val = records, load_records(cfg.val_data, problems.append)
        else:
            train, val = split_records(records, cfg.val_fraction, cfg.split_seed)
    finally:  # also when nothing is left: each skipped file's reason comes before the error
        for line in summarize_warnings(problems, verbose):
            warn(line)
    if cfg.max_images:
        train = train[: cfg.max_images]
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
               batch: Sequence[torch.Tensor], loss_name: str, amp_dtype: torch.dtype | None,
               device: torch.device, presence_weight: float = 1.0) -> torch.Tensor:
    """One optimisation step on (x, y) or (x, y, is_face) (channels_last input, autocast when `amp_dtype`);
    returns the loss."""
    x = batch[0].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    y = batch[1].to(device, non_blocking=True)
    is_face = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        raw = model(x, raw=True)  # through the DDP wrapper when distributed: it syncs the gradients
    loss = compute_loss(unwrap(model), raw, y, is_face, loss_name, x.shape[-1], presence_weight)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


@torch.inference_mode()
def predict_outputs(model: LandmarkNet, inputs: np.ndarray, device: torch.device, batch_size: int = 64
                    ) -> dict[str, np.ndarray]:
    """Every decoded output of `model` (eval mode, fp32) for network inputs (N, 1, S, S)."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(inputs), batch_size):
        x = torch.from_numpy(inputs[i:i + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
        for name, value in model.outputs(x).items():
            parts.setdefault(name, []).append(value.float().cpu().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def validate(model: LandmarkNet, inputs: np.ndarray, targets: np.ndarray, device: torch.device,
             batch_size: int = 64) -> np.ndarray:
    """NME per validation face in fp32 (crop space: the crop is a similarity, NME is unchanged)."""
    preds = predict_outputs(model, inputs, device, batch_size)["landmarks"]
    size = inputs.shape[-1]
    return nme_per_face((preds + 0.5) * size, (targets + 0.5) * size)


def presence_auc(model: LandmarkNet, faces: np.ndarray, negatives: np.ndarray, device: torch.device) -> float | None:
    """ROC AUC of the face score between validation faces and face-free crops; None without a presence head."""
    if not model.config.get("presence") or len(negatives) == 0:
        return None
    pos = predict_outputs(model, faces, device)["face_score"]
    neg = predict_outputs(model, negatives, device)["face_score"]
    return roc_auc(pos, neg)


BN_CALIBRATION_CROPS = 512


def _sample_inputs(dataset: AugmentedFaces, seed: int, count: int = BN_CALIBRATION_CROPS) -> torch.Tensor:
    """`count` augmented face crops (as training draws them), for BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    faces = len(dataset.cache)
    picks = rng.choice(faces, size=min(count, faces), replace=False)
    return torch.stack([dataset[int(i)][0] for i in picks])


def _ema_model(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of the weights and BatchNorm statistics (validated and kept as best.pt)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train(cfg: TrainConfig, callbacks: Callbacks | None = None, resume: str | os.PathLike | None = None,
          stop_requested: Callable[[], bool] = lambda: False, explicit: set[str] | None = None,
          exist_ok: bool = False, verbose: bool = False) -> TrainResult:
    """Train per `cfg` (or continue `resume`'s run in its own folder); returns paths and per-epoch statistics.

    `explicit`: the options the user gave (the rest are defaults), checked against a resumed run. A new run
    never reuses a folder that holds a run unless `exist_ok`: it takes the next free name (runs/train-2)."""
    cb = callbacks or Callbacks()
    cfg.validate()
    resumed, initial = None, None
    if resume:
        resumed, cfg = resolve_resume(resume, cfg, explicit or set())
    else:
        if cfg.init:
            initial = resolve_init(cfg.init, cfg, explicit or set())
            cfg.validate()  # the checkpoint's architecture with this run's crop side
        cfg.cwd = cfg.cwd or str(Path.cwd())
        check_writable_folder(Path(cfg.out).parent, "folder for the run folder")  # claimed once the data pass
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

    contract = CropContract(size=cfg.image_size, scale=cfg.crop_scale)
    train_records, val_records = load_split(cfg, log, verbose)
    capped = f"; training capped by --max-images {cfg.max_images}" if cfg.max_images else ""
    split = "--val-data" if cfg.val_data else f"seeded split {cfg.val_fraction:.0%}, split seed {cfg.split_seed}"
    log(f"faces: {len(train_records)} train, {len(val_records)} validation ({split}{capped})")

    done = [0]
    total_decode = len(train_records) + len(val_records)

    def tick(n: int) -> None:
        done[0] += n
        cb.on_cache_progress(done[0], total_decode)

    first_pass = None
    if cfg.first_pass_boxes:
        first_pass = first_pass_boxes_for(cfg.first_pass_boxes, [*train_records, *val_records])
        digest = file_sha256(cfg.first_pass_boxes)
        if cfg.first_pass_boxes_sha256 and digest != cfg.first_pass_boxes_sha256:
            raise DataError(f"--first-pass-boxes {cfg.first_pass_boxes} changed since the run began (sha256 "
                            f"{digest[:12]}, was {cfg.first_pass_boxes_sha256[:12]}): its validation NMEs would "
                            "not compare; start a new run")
        cfg.first_pass_boxes_sha256 = digest  # saved with the run: --resume checks the file is the same
        found = [sum(first_pass.get(r.key) is not None for r in rs) for rs in (train_records, val_records)]
        log(f"first-pass boxes ({cfg.first_pass_boxes}): {found[0]} of {len(train_records)} training and "
            f"{found[1]} of {len(val_records)} validation faces; the rest take the modelled box error")
    if resumed is None and not exist_ok and is_main:  # the data checks passed: now the run takes its folder
        free = next_free_folder(cfg.out)
        if str(free) != str(Path(cfg.out)):
            cb.on_message(f"{cfg.out} holds a run already: writing {free} (--exist-ok reuses a folder)")
        cfg.out = str(free)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if resumed is None and exist_ok:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a reused folder starts a fresh history
    cache = FaceCache(train_records, contract, progress=tick if is_main else None, first_pass_boxes=first_pass)
    if cfg.teacher:
        from facemark.train.distill import distill_targets

        cache.points = distill_targets(cache, cfg.teacher, cfg.distill)
        log(f"distillation: targets = {1 - cfg.distill:g} x annotation + {cfg.distill:g} x the accurate preset of "
            f"{cfg.teacher} on each training face")
    val_sets = validation_tensors(val_records, contract, progress=tick if is_main else None, seed=cfg.split_seed,
                                  first_pass_boxes=first_pass)
    val_inputs = val_sets["landmarks"][0]
    negatives, val_negatives = None, np.zeros((0, 1, contract.size, contract.size), np.float32)
    if cfg.presence:
        negatives = NegativeSource(train_records, contract)
        val_negatives = validation_negatives(val_records, contract, cfg.split_seed)
        log(f"presence head: {cfg.negatives_per_face:g} face-free crop(s) per face per epoch, "
            f"{len(val_negatives)} for validation")
    dataset = AugmentedFaces(cache, contract, AugmentConfig(**cfg.augment), negatives, cfg.negatives_per_face)
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=cfg.seed) if distributed else None
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        drop_last=len(dataset) > cfg.batch_size,
        num_workers=cfg.workers, persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.workers > 0 else None, worker_init_fn=_ignore_signals_in_worker,
    )

    start_from = resumed if resumed is not None else initial
    if start_from is not None:
        # A fine-tune may change the crop side (RESIZABLE_FIELDS): the same weights on a grid of that size.
        model = build_model({**start_from["model"], "image_size": cfg.image_size})
        model.load_state_dict(start_from["state_dict"])
    else:
        head_options = head_unit(cfg.head).new_options(cfg.head_options(), train_records, contract)
        model = LandmarkNet(image_size=cfg.image_size, head=cfg.head, presence=cfg.presence, **head_options)
    if start_from is initial and initial is not None and initial.get(FOLDED_BATCHNORM):
        # An exported model's BatchNorms are folded into its convolutions: give them statistics first.
        calibrate_folded_batchnorm(model, _sample_inputs(dataset, cfg.seed))
        log(f"BatchNorm statistics of the folded export re-estimated on {BN_CALIBRATION_CROPS} training crops")
    model = model.to(device).to(memory_format=torch.channels_last)
    ema = _ema_model(model, cfg.ema) if cfg.ema else None
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay if cfg.optimizer == "adamw" else 0)
    scheduler = _build_scheduler(cfg, optimizer, len(loader))
    amp_dtype = autocast_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start_epoch, best_nme, history = 0, math.inf, []
    if initial is not None:
        log(f"weights from {cfg.init} (validation NME {100 * initial['metrics'].get('val_nme', math.nan):.2f}%); "
            f"new optimizer and a {cfg.epochs}-epoch {cfg.schedule} schedule")
        log(initial["recipe"])
    if resumed is not None:
        state = resumed["state"]
        optimizer.load_state_dict(state["optimizer"])
        saved_steps = state["scheduler"]["last_epoch"]
        if state["scheduler"].get("total_steps", cfg.epochs * len(loader)) == cfg.epochs * len(loader):
            scheduler.load_state_dict(state["scheduler"])
        # else: --epochs extended the run: the new schedule (built above for cfg.epochs) at the saved step
        scheduler.last_epoch, scheduler._step_count = saved_steps, saved_steps + 1
        scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
            # AveragedModel copies the model on its first update (n_averaged == 0): keep averaging instead.
            ema.n_averaged.fill_(int(state.get("ema_updates", 1)))
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

    def save_last(next_epoch: int, scheduler_state: dict | None = None) -> None:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler_state or scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": _rng_state(), "next_epoch": next_epoch,
                 "best_val_nme": best_nme, "history": [asdict(h) for h in history]}
        if ema is not None:
            state["ema"] = {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}
            state["ema_updates"] = int(ema.n_averaged)
        metrics = asdict(history[-1]) if history else {"epoch": next_epoch}
        save_checkpoint(last_path, model, contract, train_dict, metrics, state)

    def judge(judged: nn.Module) -> tuple[dict[str, np.ndarray], np.ndarray, float, float | None]:
        """NME per validation face on each kind of box, the selected kind's, its mean, presence AUC."""
        by_boxes = {kind: validate(judged, inputs, targets, device) for kind, (inputs, targets) in val_sets.items()}
        errors = by_boxes[cfg.val_boxes]
        return by_boxes, errors, float(errors.mean()), presence_auc(judged, val_inputs, val_negatives, device)

    if initial is not None and resumed is None:
        # Epoch 0: the initial weights are validated and kept as best.pt, so a fine-tune never ends worse than its
        # start (an epoch must beat them to replace them).
        t0 = time.perf_counter()
        by_boxes, errors, best_nme, auc = judge(model)
        stats = EpochStats(0, None, best_nme, float(np.median(errors)), 0.0, 0.0, 0.0, time.perf_counter() - t0,
                           True, auc, float(by_boxes["landmarks"].mean()), float(by_boxes["detector"].mean()))
        history.append(stats)
        if is_main:
            save_checkpoint(best_path, model, contract, train_dict, asdict(stats))
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(stats)) + "\n")
            cb.on_epoch_end(stats)

    interrupted = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            train_model.train()
            cb.on_epoch_start(epoch, cfg.epochs, len(loader)) if is_main else None
            # An interrupted epoch runs again from its start on --resume: keep the schedule's state of that start.
            scheduler_at_start = copy.deepcopy(scheduler.state_dict())
            t0 = time.perf_counter()
            wait = 0.0
            loss_sum, seen = 0.0, 0
            t_ready = time.perf_counter()
            for step, batch in enumerate(loader):
                x = batch[0]
                wait += time.perf_counter() - t_ready
                loss = train_step(train_model, optimizer, scaler, batch, cfg.loss, amp_dtype, device,
                                  cfg.presence_weight)
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
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
                    save_last(epoch, scheduler_at_start)  # the interrupted epoch runs again on --resume
                    log(f"interrupted: saved {last_path}; continue with --resume {last_path}")
                break
            seconds = time.perf_counter() - t0
            judged = ema.module if ema is not None else model
            by_boxes, errors, val_nme, auc = judge(judged)
            is_best = val_nme < best_nme
            best_nme = min(best_nme, val_nme)
            stats = EpochStats(epoch + 1, loss_sum / max(seen, 1), val_nme, float(np.median(errors)),
                               optimizer.param_groups[0]["lr"], seen * world / seconds, wait / seconds, seconds,
                               is_best, auc, float(by_boxes["landmarks"].mean()), float(by_boxes["detector"].mean()))
            history.append(stats)
            if is_main:
                metrics = asdict(stats)
                if is_best:
                    save_checkpoint(best_path, judged, contract, train_dict, metrics)
                save_last(epoch + 1)
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
                cb.on_epoch_end(stats)
    finally:
        _shutdown_loader(loader)  # also when a step raised: no loader worker is left behind
    if distributed:
        dist.destroy_process_group()
    return TrainResult(best_path, last_path, best_nme, history, len(train_records), len(val_records), interrupted)
