"""Training throughput: images per second with fp32 vs bf16 autocast (CPU) or fp16/bf16 (CUDA), and the share
of each step spent waiting for data -- the training loop's own pieces (FaceCache, AugmentedFaces, LandmarkNet,
the head's loss, AdamW), measured step by step after a warm-up.

    python -m facemark.benchmarks.train_throughput --data ../shared/data/300w --image-size 160 --steps 20
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from facemark.contract import CropContract
from facemark.data import load_records
from facemark.fileio import write_text_atomic
from facemark.train.dataset import AugmentConfig, AugmentedFaces, FaceCache
from facemark.train.loop import autocast_dtype, resolve_device, train_step
from facemark.train.model import LandmarkNet


@dataclass(frozen=True)
class ThroughputResult:
    mode: str  # "fp32" | "bf16" | "fp16"
    device: str
    batch_size: int
    image_size: int
    steps: int
    images_per_s: float
    step_ms_median: float
    data_wait_share: float  # share of wall time spent waiting for the next batch


def measure_training(dataset: AugmentedFaces, image_size: int, batch_size: int, steps: int, warmup: int,
                     amp_dtype: torch.dtype | None, device: torch.device, workers: int = 0,
                     seed: int = 0) -> ThroughputResult:
    """Train a fresh LandmarkNet for `warmup + steps` steps; time only the last `steps`."""
    torch.manual_seed(seed)
    # Exactly the training loop's model and step (channels_last in every mode, so the ratio is autocast's).
    model = LandmarkNet(image_size=image_size).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0)
    step_ms, wait_s, total_s, done = [], 0.0, 0.0, 0
    while done < warmup + steps:
        it = iter(loader)
        while done < warmup + steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            train_step(model, optimizer, scaler, batch, "l1", amp_dtype, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if done >= warmup:
                step_ms.append((t2 - t0) * 1000.0)
                wait_s += t1 - t0
                total_s += t2 - t0
            done += 1
    mode = "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.").replace("bfloat16", "bf16") \
        .replace("float16", "fp16")
    return ThroughputResult(mode, str(device), batch_size, image_size, len(step_ms),
                            images_per_s=batch_size * len(step_ms) / total_s,
                            step_ms_median=float(np.median(step_ms)), data_wait_share=wait_s / total_s)


def run(data: Sequence[Path], image_size: int = 160, batch_size: int = 32, steps: int = 20, warmup: int = 3,
        max_faces: int = 512, device: str = "auto", workers: int = 0) -> list[ThroughputResult]:
    """fp32, then mixed precision where the device has native support; each mode trains a fresh model on the
    same cached faces (at most `max_faces`), so the ratio compares arithmetic, not data."""
    records = load_records(data, warn=lambda _m: None)[:max_faces]
    if len(records) < batch_size:
        batch_size = max(len(records), 1)
    contract = CropContract(size=image_size)
    dataset = AugmentedFaces(FaceCache(records, contract), contract, AugmentConfig())
    dev = resolve_device(device)
    modes: list[torch.dtype | None] = [None]
    mixed = autocast_dtype(dev, amp=True)
    if mixed is not None:
        modes.append(mixed)
    return [measure_training(dataset, image_size, batch_size, steps, warmup, m, dev, workers) for m in modes]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facemark.benchmarks.train_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, action="append", required=True)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-faces", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here (atomically).")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.data, args.image_size, args.batch_size, args.steps, args.warmup, args.max_faces,
                  args.device, args.workers)
    base = results[0].images_per_s
    print("| mode | device | batch | size | img/s | step ms (median) | data wait | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.mode} | {r.device} | {r.batch_size} | {r.image_size} | {r.images_per_s:.1f} | "
              f"{r.step_ms_median:.1f} | {100 * r.data_wait_share:.1f} % | {r.images_per_s / base:.2f}x |")
    if args.json:
        write_text_atomic(args.json, json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
