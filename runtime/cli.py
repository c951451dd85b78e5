"""`facemark runtime predict|video`: thin typer commands over facemark.runtime (torch-free).

Only typer, rich and facemark core are imported here; onnxruntime and the pipeline load inside the commands.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape  # file names may hold brackets: text, not markup

from facemark.choices import AlignTemplate, DrawChoice, Provider
from facemark.cli_names import DIR, FILE, renamed
from facemark.errors import cli_message
from facemark.fileio import DEFAULT_MAX_FILE_MB
from facemark.reporting import progress_display
from facemark.runtime.cli_options import flags_text, given, option_names, with_options
from facemark.runtime.defaults import (
    DEFAULT_FULL_SCAN_EVERY,
    DEFAULT_GRACE_S,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_MEGAPIXELS,
    DEFAULT_MAX_REQUEST_MB,
)
from facemark.runtime.options import DetectorOptions, PipelineOptions, RuntimeOptions

if TYPE_CHECKING:  # annotations only: the CLI module stays light
    from facemark.runtime.predict.inputs import ImageResult
    from facemark.runtime.predict.writers import JsonlWriter
    from facemark.runtime.serving.client import RemoteSteps

app = typer.Typer(
    help="Run a facemark ONNX model on photos or video (ONNX Runtime + a face detector, Haar by default; no torch).",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True, highlight=False, soft_wrap=True)

DEVICE_HELP = "Where the model runs: auto (TensorRT > CUDA > CPU, whichever loads), cpu, cuda or tensorrt."
MODEL_HELP = "facemark ONNX model (default: the model shipped in facemark/assets)."
# Options predict and video share word for word (typer reads an option's declaration; it never changes it).
ALIGNED_SIZE_OPTION = typer.Option(112, "--aligned-size", min=8, help="Side of the aligned chips in pixels.")
ALIGNED_TEMPLATE_OPTION = typer.Option("arcface", "--aligned-template",
                                       help="arcface: the five-point ArcFace layout; eyes: eye centres.")
POSE_OPTION = typer.Option(False, "--pose", help="Add each face's head pose (yaw, pitch, roll in degrees) to the "
                           "JSON, JSONL and CSV.")


def _landmarker_options(device: Provider, threads: int | None, trt_fp16: bool, trt_cache: Path | None,
                        options: RuntimeOptions) -> dict:
    """FaceLandmarker's keyword arguments from the command line (--ray hands them to every actor)."""
    return {"device": device.value, "threads": threads, "trt_fp16": trt_fp16, "trt_cache": trt_cache,
            "options": options}


def _default_model() -> Path:
    from facemark.runtime.landmarker import DEFAULT_MODEL_PATH

    return DEFAULT_MODEL_PATH


def _landmarker(model: Path | None, *args, **kwargs):
    """A FaceLandmarker of `_landmarker_options(*args, **kwargs)`; a bad setting is one line."""
    from facemark.runtime.landmarker import FaceLandmarker

    try:
        return FaceLandmarker(model, **_landmarker_options(*args, **kwargs))
    except ValueError as exc:
        raise typer.BadParameter(cli_message(exc)) from None


SERVER_HELP = ("Send the images to a `facemark serve` server (http://HOST:PORT) instead of running the model here; "
               "same JSON, JSONL, CSV and pictures. Model, detector and refinement are the server's settings.")
# predict options that only the server can set once --server is given
SERVER_ONLY = ("wait", "timeout")  # predict options that need --server
LOCAL_ONLY = ("model", "device", "threads", "trt_fp16", "trt_cache",
              *option_names(DetectorOptions, PipelineOptions))


RAY_HELP = ("Run the job on a Ray cluster (the ray extra): local (start one here), auto (the cluster this "
            "machine belongs to) or its address (HOST:6379, ray://HOST:10001); inputs may be URIs (s3://...). "
            "--workers: actors (default: the cluster's CPUs over --threads); --threads: CPUs per actor (default 1). "
            "Writes --jsonl and/or --parquet once the job is done.")
NOT_WITH_RAY = ("out_dir", "json_path", "csv_path", "aligned", "resume", "force")


@app.command("predict")
@renamed(out_dir=("--out", "-o"), device=("--provider", "-p"))
@with_options
def predict_command(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) or globs."),
    model: Path | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    out_dir: Path | None = typer.Option(None, "--out-dir", metavar=DIR, help="Folder for the annotated images "
                                        "(NAME.ext, or NAME-1.ext when that name is taken; never an input's own "
                                        "file)."),
    json_path: Path | None = typer.Option(None, "--json", metavar=FILE, help="Write the JSON document here; - for "
                                          "stdout (default: stdout when no other output is given either)."),
    device: Provider = typer.Option("auto", "--device", help=DEVICE_HELP),
    draw: DrawChoice = typer.Option("points", "--draw", help="How --out-dir pictures show the landmarks."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads for the model."),
    detection: DetectorOptions = DetectorOptions(),
    pipeline: PipelineOptions = PipelineOptions(),
    jsonl: Path | None = typer.Option(None, "--jsonl", metavar=FILE, help="Stream one JSON line per input (the "
                                      "images[] entry and the run's model sha256 and settings), flushed as each "
                                      "input is done; - for stdout."),
    resume: bool = typer.Option(False, "--resume", help="With --jsonl: keep its complete lines without an error, "
                                "redo the other inputs and append them; refused when the lines come from another "
                                "model or other settings."),
    force: bool = typer.Option(False, "--force", help="With --resume: append even to lines of another model or "
                               "other settings."),
    aligned: Path | None = typer.Option(None, "--aligned", metavar=DIR, help="Folder for each face's "
                                        "similarity-aligned chip (PNG, NAME-faceI.png; dlib get_face_chips / "
                                        "InsightFace norm_crop); not the --out-dir folder."),
    aligned_size: int = ALIGNED_SIZE_OPTION,
    aligned_template: AlignTemplate = ALIGNED_TEMPLATE_OPTION,
    pose: bool = POSE_OPTION,
    csv_path: Path | None = typer.Option(None, "--csv", metavar=FILE, help="Write one CSV row per face: path, "
                                         "face, box, score, x0,y0 .. x67,y67 (and yaw, pitch, roll with --pose); "
                                         "- for stdout."),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Threads decoding, detecting and writing while the model runs batched over "
        "several images (default: one per core); 1 = one image after another."),
    trt_fp16: bool = typer.Option(False, "--trt-fp16", help="TensorRT: build an fp16 engine."),
    trt_cache: Path | None = typer.Option(None, "--trt-cache", help="TensorRT: engine cache folder."),
    server: str | None = typer.Option(None, "--server", help=SERVER_HELP),
    wait: float = typer.Option(60.0, "--wait", min=0.0, help="With --server: seconds to wait for the server and its "
                               "model to be ready (one progress line) before giving up."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="With --server: seconds one request may take; "
                                  "a server that stops answering ends the run, the images not done failed."),
    ray_address: str | None = typer.Option(None, "--ray", metavar="local|auto|ADDRESS", help=RAY_HELP),
    parquet: Path | None = typer.Option(None, "--parquet", metavar=FILE, help="With --ray: the rows as one "
                                        "Parquet file (path, width, height, faces nested, error)."),
    max_file_mb: float = typer.Option(DEFAULT_MAX_FILE_MB, "--max-file-mb", min=0.001, help="Refuse a larger "
                                      "input file by its size, before reading it (that input's error)."),
) -> None:
    """Landmarks for every face in photos. Writes annotated images (--out-dir), one JSON document (--json), JSON
    lines streamed per image (--jsonl, resumable with --resume), CSV (--csv), aligned face chips (--aligned);
    locally or on a `facemark serve` server (--server). Writes only what is asked for, each file complete or not
    at all; never an input, never a picture it did not write itself (its folders' facemark-outputs.json says
    which). Messages and the summary go to stderr."""
    from facemark.errors import printable
    from facemark.fileio import is_stdout, write_output_text
    from facemark.outputs import OutputPlan
    from facemark.runtime.predict.inputs import collect_inputs
    from facemark.runtime.predict.runner import LocalSteps, predict_files
    from facemark.runtime.predict.writers import (
        ChipOptions,
        JsonlWriter,
        build_document,
        claim_output_stems,
        dumps,
        output_folders,
        read_jsonl_entries,
        run_identity,
        write_csv,
    )

    if resume and jsonl is None:
        raise typer.BadParameter("--resume needs --jsonl FILE (the lines it continues)")
    if resume and is_stdout(jsonl):
        raise typer.BadParameter("--resume needs a --jsonl file, not - (stdout)")
    if sum(is_stdout(p) for p in (json_path, jsonl, csv_path)) > 1:
        raise typer.BadParameter("only one of --json, --jsonl and --csv can be - (stdout)")
    if server is not None and ray_address is not None:
        raise typer.BadParameter("--server and --ray: give one (where the images go)")
    max_bytes = int(max_file_mb * 1e6)
    on_ray = ray_address is not None or parquet is not None
    files, failures = collect_inputs(inputs) if not on_ray else ([], [])
    plan = OutputPlan().read(files, "the input").read([p for p in inputs if os.path.exists(p)], "the input")
    plan.read(model or _default_model(), "--model")
    for path, option in ((json_path, "--json"), (jsonl, "--jsonl"), (csv_path, "--csv"), (parquet, "--parquet")):
        plan.write(path, option)
    plan.write_folder(out_dir, "--out-dir").write_folder(aligned, "--aligned").check()  # before any work
    remote = None
    if server is not None:
        from facemark.runtime.serving.client import TritonLandmarker

        clash = given(ctx, LOCAL_ONLY)
        if clash:
            raise typer.BadParameter(f"{flags_text(clash)}: set on the server (`facemark serve`), not with --server")
        landmarker = TritonLandmarker(server, timeout_s=timeout, wait_s=wait, on_wait=lambda line: console.print(
            escape(line)))
        steps = remote = landmarker.steps(max_bytes)
    else:
        unused = given(ctx, SERVER_ONLY)
        if unused:
            raise typer.BadParameter(f"{flags_text(unused)}: only with --server")
        options = (device, threads, trt_fp16, trt_cache, RuntimeOptions(detection, pipeline))
        landmarker = _landmarker(model, *options)
        steps = LocalSteps(landmarker, max_bytes=max_bytes)
        if ray_address is not None or parquet is not None:
            return _predict_on_ray(ctx, inputs, ray_address, landmarker, model, _landmarker_options(*options),
                                   workers, jsonl, parquet, pose, pipeline.max_faces)
    chips = ChipOptions(aligned, aligned_size, aligned_template.value) if aligned else None
    stems = claim_output_stems(files, output_folders(out_dir, chips))  # refuses unsafe folders before any work
    for failure in failures:
        console.print(f"[red]error:[/red] {escape(printable(failure.error))}")
    run = run_identity(landmarker.describe(), {"max_faces": pipeline.max_faces, "pose": pose})
    earlier = read_jsonl_entries(jsonl, run, force) if resume and jsonl is not None else {}
    todo = [f for f in files if os.path.realpath(f) not in earlier]
    if earlier:
        console.print(f"--resume: {len(files) - len(todo)} of {len(files)} inputs already in {jsonl}")
    writer = JsonlWriter(jsonl, append=resume, run=run) if jsonl is not None else None
    progress = progress_display(console, disable=len(todo) < 2)
    stop = _StopFlag()
    try:
        with progress, stop:
            task = progress.add_task("landmarks", total=len(todo))

            def report(result) -> None:
                if result.error and (remote is None or result.path not in remote.not_done):  # those: one line
                    progress.console.print(f"[red]error:[/red] {escape(printable(result.error))}")
                if writer is not None:
                    writer.write(result)
                progress.advance(task)

            stopping = stop.requested if remote is None else lambda: stop.requested() or remote.stopped()
            results = predict_files(steps, todo, out_dir, draw.value, on_result=report,  # type: ignore[arg-type]
                                    stop_requested=stopping, workers=workers, chips=chips, pose=pose, stems=stems)
            if remote is not None and remote.gone is not None:
                results += _not_done(remote, todo, results, writer)
    finally:
        if writer is not None:
            writer.close()
    by_path = {os.path.realpath(r.path): r for r in results}
    ordered = [by_path.get(os.path.realpath(f)) or earlier.get(os.path.realpath(f)) for f in files]
    everything = failures + [r for r in ordered if r is not None]
    document = build_document(landmarker, everything, complete=stop.signal is None)
    text = dumps(document, indent=1) + "\n"
    if json_path is not None:
        write_output_text(json_path, text)
    elif out_dir is None and jsonl is None and csv_path is None and aligned is None:
        sys.stdout.write(text)
    if csv_path is not None:
        write_csv(csv_path, results, pose)
    _print_summary(failures + results, landmarker.providers, out_dir, json_path, jsonl, csv_path, aligned)
    if stop.signal is not None:
        console.print(f"[yellow]interrupted ({stop.signal.name}): {len(results)} of {len(todo)} images done"
                      + (f"; continue with --resume --jsonl {jsonl}" if jsonl else "") + "[/yellow]")
        raise typer.Exit(code=128 + stop.signal.value)
    if any((r.error if not isinstance(r, dict) else r.get("error")) for r in everything):
        raise typer.Exit(code=1)  # exit code 1 whichever way the root CLI runs typer


def _not_done(remote: RemoteSteps, todo: list[Path], results: list[ImageResult], writer: JsonlWriter | None
              ) -> list[ImageResult]:
    """The server stopped answering: every file it did not answer fails with that reason, in the JSON and JSONL
    too (so --resume retries them), and one line says so."""
    from facemark.errors import printable
    from facemark.runtime.predict.inputs import ImageResult

    done = {r.path for r in results}
    missing = [ImageResult(str(f), error=f"{f}: not done: {remote.gone}") for f in todo if str(f) not in done]
    for result in missing:
        if writer is not None:
            writer.write(result)
    count = len(missing) + sum(r.path in remote.not_done for r in results)
    console.print(f"[red]error:[/red] {escape(printable(remote.gone or ''))}; {count} of {len(todo)} images not "
                  "done (listed as failed)")
    return missing


def _predict_on_ray(ctx: typer.Context, inputs: list[str], address: str | None, landmarker, model: Path | None,
                    options: dict, actors: int | None, jsonl: Path | None, parquet: Path | None, pose: bool,
                    max_faces: int | None) -> None:
    """--ray: the job on a cluster (facemark.runtime.ray), written as local predict writes its lines; the driver's
    `landmarker` has checked the settings and names the run before any cluster starts."""
    from facemark.errors import printable
    from facemark.runtime.predict.writers import run_identity

    if address is None:
        raise typer.BadParameter("--parquet: only with --ray")
    clash = given(ctx, NOT_WITH_RAY)
    if clash:
        raise typer.BadParameter(flags_text([n.removesuffix("_path") for n in clash]) + ": not with --ray")
    if jsonl is None and parquet is None:
        raise typer.BadParameter("--ray needs --jsonl FILE and/or --parquet FILE")
    from facemark.runtime.ray import predict_job, write_jsonl_rows, write_parquet

    run = run_identity(landmarker.describe(), {"max_faces": max_faces, "pose": pose})
    threads = options.pop("threads") or 1
    model_arg = model if model is None or address == "local" else model.read_bytes()  # nodes need no copy
    try:
        with console.status(f"landmarks on Ray ({address})"):
            failures, table, times = predict_job(inputs, address, actors, threads, pose=pose, model=model_arg,
                                                 **options)
    except KeyboardInterrupt:  # the job is stopped with the connection; its rows come back all or not at all
        console.print("[yellow]interrupted (SIGINT): the Ray job was stopped, nothing written[/yellow]")
        raise typer.Exit(code=128 + signal.SIGINT.value) from None
    rows = table.to_pylist()
    for error in [f.error for f in failures] + [row["error"] for row in rows if row["error"]]:
        console.print(f"[red]error:[/red] {escape(printable(error))}")
    if jsonl is not None:
        write_jsonl_rows(jsonl, rows, run)
    if parquet is not None:
        write_parquet(parquet, table)
    failed = len(failures) + sum(1 for row in rows if row["error"])
    color = "red" if failed else "green"
    faces = sum(len(row["faces"]) for row in rows)
    console.print(f"[{color}]{len(failures) + len(rows)} images, {faces} faces, {failed} failed, "
                  f"{times.images / max(times.job_s, 1e-9):.1f} images/s on Ray ({times.actors} actors x {threads} "
                  f"threads; {times.connect_s + times.first_row_s:.1f} s until the first rows)[/{color}]")
    for what, path in (("JSON lines", jsonl), ("Parquet", parquet)):
        if path is not None:
            console.print(f"{what}: {path}")
    if failed:
        raise typer.Exit(code=1)


class _StopFlag:
    """SIGINT/SIGTERM while predicting: finish the current image, then stop and write what is done."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._old: dict = {}

    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _print_summary(results, providers: list[str], out_dir: Path | None, json_path: Path | None,
                   jsonl: Path | None = None, csv_path: Path | None = None, aligned: Path | None = None) -> None:
    ok = [r for r in results if not r.error]
    failed = len(results) - len(ok)
    faces = sum(len(r.faces) for r in ok)
    ms = sum(r.ms for r in ok) / len(ok) if ok else 0.0
    below = sum(r.presence_dropped for r in ok)
    line = (f"{len(results)} images, {faces} faces ({below} detections below the presence threshold), {failed} "
            f"failed, {ms:.1f} ms per image (read + detect + landmarks) on {providers[0]}")
    console.print(("[red]" if failed else "[green]") + line + ("[/red]" if failed else "[/green]"))
    if out_dir is not None:
        console.print(f"annotated images: {out_dir}")
    if json_path is not None:
        console.print(f"JSON: {json_path}")
    if jsonl is not None:
        console.print(f"JSON lines: {jsonl}")
    if csv_path is not None:
        console.print(f"CSV: {csv_path}")
    if aligned is not None:
        console.print(f"aligned faces: {aligned} ({sum(len(r.chips) for r in ok)} chips)")


@app.command("video")
@renamed(out="--out", device=("--provider", "-p"))
@with_options
def video_command(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="A video file, a camera index such as 0, or a network stream "
                                 "(rtsp://, http(s):// URL)."),
    out: Path | None = typer.Option(None, "-o", "--output", metavar=FILE, help="Annotated video (.mp4, mp4v "
                                    "codec)."),
    jsonl: Path | None = typer.Option(None, "--jsonl", metavar=FILE, help="Per-frame landmarks as JSON lines "
                                      "(with no output option: JSON lines on stdout); - for stdout."),
    json_path: Path | None = typer.Option(None, "--json", metavar=FILE, help="One JSON document: the model "
                                          "block as predict's, the source, every frame, the summary (`facemark "
                                          "schema video-document`); - for stdout."),
    csv_path: Path | None = typer.Option(None, "--csv", metavar=FILE, help="One CSV row per face per frame: "
                                         "predict's columns with frame and time (seconds) after the path; - for "
                                         "stdout."),
    aligned: Path | None = typer.Option(None, "--aligned", metavar=DIR, help="Folder for each face's "
                                        "similarity-aligned chip per frame (PNG, NAME-frameNNNNNN-faceI.png)."),
    aligned_size: int = ALIGNED_SIZE_OPTION,
    aligned_template: AlignTemplate = ALIGNED_TEMPLATE_OPTION,
    pose: bool = POSE_OPTION,
    smooth: bool = typer.Option(True, "--smooth/--no-smooth", help="One-Euro smoothing of the points."),
    detect_every: int = typer.Option(10, "--detect-every", min=1, help="Run the detector every N frames (and on "
                                     "loss)."),
    full_scan_every: int = typer.Option(DEFAULT_FULL_SCAN_EVERY, "--full-scan-every", min=1,
                                        help="Every Nth of those detections scans the whole frame for new faces; "
                                        "the others search only around the tracked faces (1: always whole)."),
    model: Path | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    device: Provider = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads for the model."),
    draw: DrawChoice = typer.Option("points", "--draw", help="How --output shows the landmarks."),
    detection: DetectorOptions = DetectorOptions(),
    pipeline: PipelineOptions = PipelineOptions(),
    max_frames: int | None = typer.Option(None, "--max-frames", min=1, help="Stop after N frames."),
) -> None:
    """Per-frame landmarks of a video file, camera or network stream. Writes an annotated video (--output), JSON
    lines (--jsonl), one JSON document (--json), CSV (--csv), aligned face chips (--aligned); each file complete
    or not at all. A progress line on a terminal; the summary goes to stderr."""
    from facemark.fileio import is_stdout
    from facemark.outputs import OutputPlan
    from facemark.runtime.predict.writers import ChipOptions, dumps
    from facemark.runtime.video import is_camera_source, is_stream_url, quiet_opencv, run_video

    if sum(is_stdout(p) for p in (json_path, jsonl, csv_path)) > 1:
        raise typer.BadParameter("only one of --json, --jsonl and --csv can be - (stdout)")
    # The command says in one line what failed (a stream, a frame): not FFmpeg's and OpenCV's own log lines.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    quiet_opencv()
    local = not (is_camera_source(source) or is_stream_url(source))
    plan = OutputPlan().read(source if local else None, "the video").read(model or _default_model(), "--model")
    for path, option in ((out, "--output"), (jsonl, "--jsonl"), (json_path, "--json"), (csv_path, "--csv")):
        plan.write(path, option)
    plan.write_folder(aligned, "--aligned").check()  # before the model loads
    landmarker = _landmarker(model, device, threads, False, None, RuntimeOptions(detection, pipeline))
    chips = ChipOptions(aligned, aligned_size, aligned_template.value) if aligned else None
    progress, on_open, on_progress = _video_progress(max_frames)

    def to_stdout(frame) -> None:  # nothing asked to be saved: stream the frames as JSON lines
        sys.stdout.write(dumps(frame.to_json(pose)) + "\n")
        sys.stdout.flush()

    def on_frame(frame) -> None:
        if not any((out, jsonl, json_path, csv_path, aligned)):
            to_stdout(frame)
        on_progress(frame)

    stop = _StopFlag()
    with stop, progress:
        summary = run_video(source, landmarker, out=out, jsonl=jsonl, detect_every=detect_every,
                            full_scan_every=full_scan_every, smooth=smooth, on_frame=on_frame,
                            draw=draw.value, max_frames=max_frames, stop_requested=stop.requested,  # type: ignore[arg-type]
                            on_skip=lambda i: console.print(f"[yellow]frame {i}: cannot be decoded; skipped[/yellow]"),
                            on_damaged=lambda i, why: console.print(f"[yellow]frame {i}: damaged ({why}); "
                                                                    "skipped[/yellow]"),
                            json_path=json_path, csv_path=csv_path, chips=chips, pose=pose, on_open=on_open,
                            on_end=lambda line: console.print(f"[yellow]{escape(line)}[/yellow]"))
    failed = summary.skipped + summary.damaged + summary.dropped
    color = "yellow" if failed or summary.interrupted else "green"
    console.print(f"[{color}]{summary.frames} frames, {summary.faces} faces, {summary.fps:.1f} fps, "
                  f"{summary.skipped} skipped, {summary.damaged} damaged[/{color}] (detector on "
                  f"{summary.detections} frames, {summary.full_scans} of them whole, {summary.losses} tracks lost) "
                  f"on {landmarker.providers[0]}")
    for path in summary.outputs:
        console.print(f"written: {escape(path)}")
    if summary.interrupted:
        console.print("[yellow]interrupted: the frames so far were written[/yellow]")
        if stop.signal is not None:
            raise typer.Exit(code=128 + stop.signal.value)
    if failed:
        raise typer.Exit(code=1)


def _video_progress(max_frames: int | None):
    """The video's progress line on a terminal (frames done of the known count, fps, faces, time left), none
    elsewhere: (the display, on_open(info) that starts it, on_frame(result) that advances it)."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[fps]:.1f} fps, {task.fields[faces]} faces"), TimeRemainingColumn())
    progress = progress_display(console, *columns, disable=not console.is_terminal)
    state = {"task": None, "start": 0.0, "frames": 0, "faces": 0}

    def on_open(info) -> None:
        total = info.frames if max_frames is None or info.frames is None else min(info.frames, max_frames)
        state["task"] = progress.add_task("frames", total=total if total is not None else max_frames, fps=0.0,
                                          faces=0)
        state["start"] = time.monotonic()

    def on_frame(result) -> None:
        state["frames"] += 1
        state["faces"] += len(result.faces)
        elapsed = max(time.monotonic() - state["start"], 1e-9)
        progress.update(state["task"], completed=result.index + 1, fps=state["frames"] / elapsed,
                        faces=state["faces"])

    return progress, on_open, on_frame


@renamed(max_batch_size="--max-batch", device=("--provider", "-p"), workers="--decoders")
@with_options
def serve_command(
    model: Path | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    http_port: int = typer.Option(8000, "--http-port", min=1, max=65535, help="KServe v2 HTTP (and /v2/health/ready)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", min=1, max=65535, help="KServe v2 gRPC."),
    metrics_port: int = typer.Option(8002, "--metrics-port", min=1, max=65535, help="Prometheus metrics (/metrics)."),
    max_batch_size: int = typer.Option(16, "--max-batch-size", min=1, help="Largest batch Triton's dynamic "
                                       "batcher forms."),
    instances: int = typer.Option(1, "--instances", min=1, help="Model instances (each its own ONNX Runtime "
                                  "session; requests run on them in parallel)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="ONNX Runtime threads per instance "
                                       "(default: the cores shared among the instances)."),
    device: Provider = typer.Option("auto", "--device", help=DEVICE_HELP),
    detection: DetectorOptions = DetectorOptions(),
    pipeline: PipelineOptions = PipelineOptions(),
    grace: int = typer.Option(DEFAULT_GRACE_S, "--grace", min=0, help="On SIGTERM: seconds the requests in flight "
                              "may take to finish (no new connections are taken meanwhile); then exit 0."),
    max_request_mb: float = typer.Option(DEFAULT_MAX_REQUEST_MB, "--max-request-mb", min=0.001,
                                         help="Refuse a request whose images total more encoded megabytes."),
    max_images: int = typer.Option(DEFAULT_MAX_IMAGES, "--max-images", min=1,
                                   help="Refuse a request with more images (at most --max-batch-size)."),
    max_megapixels: float = typer.Option(DEFAULT_MAX_MEGAPIXELS, "--max-megapixels", min=0.001,
                                         help="Refuse a request whose images decode to more megapixels in all "
                                         "(read from the image headers, before decoding)."),
    workers: int = typer.Option(2, "--workers", min=1, help="Processes decoding uploads (a decoder crash on a "
                                 "damaged file costs that image, not the server)."),
    verbose: bool = typer.Option(False, "--verbose", help="Triton's whole log on stderr (default: its warnings and "
                                 "errors, one line each)."),
) -> None:
    """Serve the landmark pipeline on NVIDIA Triton Inference Server (PyTriton; extra facemark[serve]). Two
    models: `facemark` (encoded images in, faces out) and `facemark_crops` (the landmark model), until
    SIGINT/SIGTERM, which drains the requests in flight (--grace). Prints one JSON line {"ready": true, ...} on
    stdout once every model is ready; /v2/health/ready answers 200 from then until shutdown begins (the
    readiness probe), /v2/health/live is the liveness probe."""
    import logging
    import threading

    from facemark.runtime.serving.server import FacemarkServer, OneLineFormatter, ServeConfig, ServeLimits

    log_format = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=log_format)
    if not verbose:
        logging.getLogger().handlers[0].setFormatter(OneLineFormatter(log_format))
    limits = ServeLimits(max_request_mb=max_request_mb, max_images=max_images, max_megapixels=max_megapixels)
    config = ServeConfig(model=model, provider=device.value, host=host, http_port=http_port, grpc_port=grpc_port,
                         metrics_port=metrics_port, max_batch=max_batch_size, instances=instances, threads=threads,
                         options=RuntimeOptions(detection, pipeline), limits=limits,
                         grace_s=grace, decoders=workers, verbose=verbose)
    server = FacemarkServer(config)  # the checks that need no Triton: one line, exit 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # from now on: a signal drains, even during start-up
        signal.signal(signum, lambda *_: stop.set())
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    sys.stdout.write(json.dumps(server.ready_line()) + "\n")
    sys.stdout.flush()
    code = server.wait(stop)
    console.print("facemark serve: stopped")
    if code:
        raise typer.Exit(code=code)
