"""`facemark train`: parse, call facemark.train.loop.train, render progress (torch imported on run only)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from facemark.cli_names import DIR, renamed
from facemark.errors import FacemarkError, printable
from facemark.reporting import progress_display
from facemark.train.options import Device, Head, Loss, Optimizer, Schedule

console = Console(soft_wrap=True)  # a log file gets whole lines, not 80-column wraps


# Options that are TrainConfig fields of the same name: a resumed run compares those given with its saved ones.
CONFIG_FIELDS = ("data", "val_data", "out", "epochs", "batch_size", "image_size", "loss", "head", "pip_stride",
                 "presence", "lr", "optimizer", "schedule", "device", "amp", "max_images", "seed", "split_seed",
                 "workers", "val_boxes", "ema", "first_pass_boxes", "teacher", "distill")


@renamed(out="--out")
def train_command(
    ctx: typer.Context,
    data: list[Path] = typer.Option(None, "--data", help="dlib XML file or folder of .pts files; repeatable "
                                    "(required unless --resume)."),
    val_data: list[Path] = typer.Option([], "--val-data", help="Validation data (default: seeded 10% split)."),
    out: Path = typer.Option(Path("runs/train"), "--out-dir", metavar=DIR, help="Run folder: best.pt, last.pt, "
                             "metrics.jsonl (a folder holding a run already gets the next free name, runs/train-2, "
                             "...)."),
    exist_ok: bool = typer.Option(False, "--exist-ok", help="Reuse --out-dir even when it holds a run."),
    epochs: int = typer.Option(55, "--epochs", min=1, help="With --resume: a larger value extends the schedule."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Face crops per training step."),
    image_size: int = typer.Option(128, "--image-size", min=16, help="Crop side in pixels."),
    loss: Loss = typer.Option("l1", "--loss", help="Landmark loss (pip: the offsets' loss)."),
    head: Head = typer.Option("pip", "--head", help="pip: score maps + offsets, decoded in the graph; "
                              "regression: the tutorial's fc."),
    pip_stride: int = typer.Option(16, "--pip-stride", help="pip feature stride: 16 (FPN step) | 32 (layer4)"),
    presence: bool = typer.Option(True, "--presence/--no-presence",
                                  help="Train a face-presence score on face-free crops of the training photos."),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate."),
    optimizer: Optimizer = typer.Option("adamw", "--optimizer", help="The tutorial: adam, 1e-4."),
    schedule: Schedule = typer.Option("onecycle", "--schedule", help="Learning-rate schedule over the epochs."),
    rotate: float = typer.Option(30.0, "--rotate", help="Rotation jitter in degrees (the tutorial: 10, PIPNet 30)."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Horizontal flip with the point permutation."),
    zoom: float = typer.Option(0.1, "--zoom", help="Box scale jitter (share of the side)."),
    shift: float = typer.Option(0.08, "--shift", help="Box shift jitter (share of the side)."),
    detector_boxes: float = typer.Option(
        0.5, "--detector-boxes",
        help="Share of face crops jittered like calibrated Haar boxes (centre sigma 0.10/0.046 of the box side, "
             "log-scale sigma 0.09: measured by `python -m facemark.benchmarks.studies.box_noise`)."),
    blur: float = typer.Option(0.15, "--blur", min=0.0, max=1.0, help="Share of crops blurred."),
    motion_blur: float = typer.Option(0.0, "--motion-blur", min=0.0, max=1.0,
                                      help="Share of the blurred crops blurred along a line (motion), the rest "
                                           "Gaussian."),
    occlusion: float = typer.Option(0.15, "--occlusion", min=0.0, max=1.0,
                                    help="Share of crops with a random grey rectangle (15-40 % of the side)."),
    first_pass_boxes: Path | None = typer.Option(
        None, "--first-pass-boxes", help="Real first-pass boxes (`facemark detectors boxes`): the detector-like "
        "crops and the detector validation boxes use each face's real calibrated detector box (with --zoom/--shift "
        "on top) where the detector found it, the modelled error elsewhere."),
    teacher: Path | None = typer.Option(
        None, "--teacher", help="Distil an exported model: its accurate preset (two passes with flip) labels every "
        "training face once, and the targets become (1 - --distill) x annotation + --distill x its points."),
    distill: float = typer.Option(0.5, "--distill", min=0.0, max=1.0, help="The teacher's weight in the targets."),
    device: Device = typer.Option("auto", "--device", help="Where training runs: auto (CUDA when available), cpu "
                                  "or cuda."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="CUDA autocast; CPU bf16 autocast where supported."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue a run from its last.pt, in its own folder "
                                       "with its saved settings."),
    init: Path | None = typer.Option(None, "--init", help="Start a new run from this checkpoint's weights "
                                     "(fine-tuning): its network, a new optimizer and schedule, epoch 0 = the "
                                     "initial weights (best.pt until an epoch beats them); unless given, peak "
                                     "--lr 5e-5 and the checkpoint's augmentation. An exported .onnx works too "
                                     "(its folded BatchNorms are re-estimated)."),
    val_boxes: str = typer.Option("landmarks", "--val-boxes", help="Select the best epoch on landmark boxes (a "
                                  "refinement pass's crops) or detector (seeded Haar-like box error: one-pass "
                                  "inference's crops); both are logged."),
    ema: float = typer.Option(0.0, "--ema", min=0.0, max=0.9999, help="Validate and keep an exponential moving "
                              "average of the weights with this decay per step (0 = off; e.g. 0.998)."),
    max_images: int | None = typer.Option(None, "--max-images", help="Use at most N training faces (the "
                                          "validation split stays whole)."),
    verbose: bool = typer.Option(False, "--verbose", help="List every data warning (default: one line per kind)."),
    seed: int = typer.Option(0, "--seed", help="Initialisation, augmentation and batch order."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the validation split (apart from --seed: "
                                   "runs with other seeds validate on the same faces)."),
    workers: int = typer.Option(1, "--workers", help="Data loader processes."),
) -> None:
    """Train the ResNet18 landmark network (PIP or regression head, presence score). Keeps best.pt (by
    validation NME) and last.pt."""
    from dataclasses import asdict

    if not data and resume is None:
        raise typer.BadParameter("--data is required (unless --resume continues a run)", param_hint="--data")
    if init is not None and resume is not None:
        raise typer.BadParameter("--resume continues a run with its own weights; --init starts a new one",
                                 param_hint="--init")
    from facemark.train.loop import AUGMENT_OPTIONS

    explicit = {name for name in (*CONFIG_FIELDS, *AUGMENT_OPTIONS)
                if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}

    from facemark.train.dataset import HAAR_LOG_SCALE, HAAR_SHIFT_X, HAAR_SHIFT_Y, AugmentConfig
    from facemark.train.loop import TrainConfig, train

    aug = AugmentConfig(rotate_deg=rotate, flip=flip, zoom=zoom, shift=shift, det_p=detector_boxes, blur_p=blur,
                        motion_blur=motion_blur, occlude_p=occlusion,
                        det_shift_x=HAAR_SHIFT_X, det_shift_y=HAAR_SHIFT_Y, det_log_scale=HAAR_LOG_SCALE)
    cfg = TrainConfig(
        data=[str(p) for p in data or []], val_data=[str(p) for p in val_data], out=str(out), epochs=epochs,
        batch_size=batch_size, image_size=image_size, loss=loss.value, head=head.value, pip_stride=pip_stride,
        presence=presence, lr=lr, optimizer=optimizer.value, schedule=schedule.value,
        device=device.value, amp=amp, max_images=max_images, seed=seed, split_seed=split_seed,
        workers=workers, augment=asdict(aug), val_boxes=val_boxes, ema=ema,
        init=str(init or ""), first_pass_boxes=str(first_pass_boxes.resolve()) if first_pass_boxes else "",
        teacher=str(teacher.resolve()) if teacher else "", distill=distill,
    )
    if resume is None:  # the output plan (facemark.outputs); a resumed run continues its own files
        from facemark.outputs import OutputPlan
        from facemark.train.loop import RUN_FILES

        plan = OutputPlan().read_data(data, "--data").read_data(val_data, "--val-data").read(init, "--init")
        plan.read(first_pass_boxes, "--first-pass-boxes").read(teacher, "--teacher")
        # Without --exist-ok a folder holding a run is never reused: only --exist-ok writes over its files.
        plan.write_folder(out, "--out-dir", RUN_FILES if exist_ok else ()).check(writable=False)
    stop = {"requested": False}

    def request_stop(signum, _frame) -> None:
        if stop["requested"]:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop["requested"] = True
        console.print(f"[yellow]{signal.Signals(signum).name}: saving last.pt after this step...[/yellow]")

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _ProgressCallbacks() as callbacks:
            result = train(cfg, callbacks, resume=resume, stop_requested=lambda: stop["requested"],
                           explicit=explicit, exist_ok=exist_ok, verbose=verbose)
    except FacemarkError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any failure: one line, exit 2, loader workers already stopped
        detail = " ".join(str(exc).split())[:500]
        raise FacemarkError(f"training failed: {exc.__class__.__name__}: {detail}") from exc
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
        self.progress = progress_display(
            console, TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def on_message(self, text: str) -> None:  # plain text holding file names: no markup, control chars escaped
        self.progress.console.print(escape(printable(text)), highlight=False)

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
        auc = "" if stats.val_presence_auc is None else f"  presence AUC {stats.val_presence_auc:.4f}"
        if stats.val_nme_detector_boxes is not None:
            auc += (f"  landmark/detector boxes {100 * stats.val_nme_landmark_boxes:.2f}/"
                    f"{100 * stats.val_nme_detector_boxes:.2f}%")
        loss = "-" if stats.train_loss is None else f"{stats.train_loss:.4f}"  # epoch 0: the initial weights
        self.progress.console.print(
            f"epoch {stats.epoch:3d}  loss {loss}  val NME {100 * stats.val_nme:.2f}% "
            f"(median {100 * stats.val_nme_median:.2f}%){auc}  lr {stats.lr:.2e}  {stats.images_per_s:.0f} img/s  "
            f"data wait {100 * stats.data_wait_share:.0f}%  {stats.seconds:.0f}s{mark}",
            highlight=False,
        )
