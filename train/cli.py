"""`facemark train`: parse, call facemark.train.loop.train, render progress (torch imported on run only)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()


def train_command(
    data: list[Path] = typer.Option(..., "--data", help="dlib XML file or folder of .pts files; repeatable."),
    val_data: list[Path] = typer.Option([], "--val-data", help="Validation data (default: seeded 10% split)."),
    out: Path = typer.Option(Path("runs/train"), "--out", help="Run folder: best.pt, last.pt, metrics.jsonl."),
    epochs: int = typer.Option(60, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size"),
    image_size: int = typer.Option(224, "--image-size", help="Crop side in pixels."),
    loss: str = typer.Option("l1", "--loss", help="l1 | mse | wing"),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | adam (the tutorial: adam, 1e-4)."),
    schedule: str = typer.Option("onecycle", "--schedule", help="onecycle | cosine | constant"),
    rotate: float = typer.Option(15.0, "--rotate", help="Rotation jitter in degrees (the tutorial: 10)."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Horizontal flip with the point permutation."),
    zoom: float = typer.Option(0.1, "--zoom", help="Box scale jitter (share of the side)."),
    shift: float = typer.Option(0.08, "--shift", help="Box shift jitter (share of the side)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="CUDA autocast; CPU bf16 autocast where supported."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue from a last.pt."),
    max_images: int | None = typer.Option(None, "--max-images", help="Use at most N training faces."),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(1, "--workers", help="Data loader processes."),
) -> None:
    """Train the ResNet18 landmark regressor; keeps best.pt (by validation NME) and last.pt."""
    from dataclasses import asdict

    from facemark.train.dataset import AugmentConfig
    from facemark.train.loop import TrainConfig, train

    aug = AugmentConfig(rotate_deg=rotate, flip=flip, zoom=zoom, shift=shift)
    cfg = TrainConfig(
        data=[str(p) for p in data], val_data=[str(p) for p in val_data], out=str(out), epochs=epochs,
        batch_size=batch_size, image_size=image_size, loss=loss, lr=lr, optimizer=optimizer, schedule=schedule,
        device=device, amp=amp, max_images=max_images, seed=seed, workers=workers, augment=asdict(aug),
    )
    stop = {"requested": False}

    def request_stop(signum, _frame) -> None:
        if stop["requested"]:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop["requested"] = True
        console.print(f"[yellow]{signal.Signals(signum).name}: saving last.pt after this step...[/yellow]")

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _ProgressCallbacks() as callbacks:
            result = train(cfg, callbacks, resume=resume, stop_requested=lambda: stop["requested"])
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if not result.history:
        raise typer.Exit(130 if result.interrupted else 0)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports (and wrote the files)
        return
    best = min(result.history, key=lambda h: h.val_nme)
    console.print(f"best validation NME {100 * best.val_nme:.2f}% (median {100 * best.val_nme_median:.2f}%) at "
                  f"epoch {best.epoch}; {result.best_path}")
    if result.interrupted:
        raise typer.Exit(130)


class _ProgressCallbacks:
    """Rich progress for the decode cache and each epoch, one summary line per epoch."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
        )
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def on_message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def on_cache_progress(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("decoding faces", total=total, info="")
        self.progress.update(self.task, completed=done)

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, info="")

    def on_step(self, step: int, loss: float, images_per_s: float) -> None:
        self.progress.update(self.task, completed=step, info=f"loss {loss:.4f}  {images_per_s:.0f} img/s")

    def on_epoch_end(self, stats) -> None:
        mark = " *" if stats.best else ""
        self.progress.console.print(
            f"epoch {stats.epoch:3d}  loss {stats.train_loss:.4f}  val NME {100 * stats.val_nme:.2f}% "
            f"(median {100 * stats.val_nme_median:.2f}%)  lr {stats.lr:.2e}  {stats.images_per_s:.0f} img/s  "
            f"data wait {100 * stats.data_wait_share:.0f}%  {stats.seconds:.0f}s{mark}",
            highlight=False,
        )
