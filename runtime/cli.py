"""`facemark runtime predict|video`: thin typer commands over facemark.runtime (torch-free).

Only typer, rich and facemark core are imported here; onnxruntime and the pipeline load inside the commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from facemark.runtime import detector as haar

app = typer.Typer(
    help="Run a facemark ONNX model on photos or video (ONNX Runtime + OpenCV Haar; no torch).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True, highlight=False, soft_wrap=True)

PROVIDER_HELP = "Execution provider: auto (TensorRT > CUDA > CPU, whichever loads), cpu, cuda or tensorrt."
MODEL_HELP = "facemark ONNX model (default: the model shipped in facemark/assets)."


def _detector(scale_factor: float, min_neighbors: int, min_face: float, max_side: int, min_score: float | None,
              cascade: str | None = None):
    try:
        return haar.HaarDetector(scale_factor=scale_factor, min_neighbors=min_neighbors, min_face_fraction=min_face,
                                 max_side=max_side or None, min_score=min_score, cascade=cascade)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _landmarker(model: Path | None, provider: str, threads: int | None, detector, trt_fp16: bool,
                trt_cache: Path | None, max_faces: int | None = None):
    from facemark.runtime.landmarker import FaceLandmarker

    return FaceLandmarker(model, provider=provider, detector=detector, threads=threads, trt_fp16=trt_fp16,
                          trt_cache_dir=trt_cache, max_faces=max_faces)


@app.command("predict")
def predict_command(
    inputs: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) or globs."),
    model: Path | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for the annotated images."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the JSON document here "
                                          "(default: stdout when --out is not given either)."),
    provider: str = typer.Option("auto", "--provider", "-p", help=PROVIDER_HELP),
    draw: str = typer.Option("points", "--draw", help="points | contours | none"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads for the model."),
    scale_factor: float = typer.Option(haar.DEFAULT_SCALE_FACTOR, "--scale-factor",
                                       help="Haar pyramid step (bigger = faster, fewer faces)."),
    min_neighbors: int = typer.Option(haar.DEFAULT_MIN_NEIGHBORS, "--min-neighbors",
                                      help="Haar neighbours (bigger = fewer false boxes)."),
    min_face: float = typer.Option(haar.DEFAULT_MIN_FACE_FRACTION, "--min-face",
                                   help="Smallest face, as a fraction of the shorter side (the speed knob)."),
    max_side: int = typer.Option(haar.DEFAULT_MAX_SIDE, "--max-side",
                                 help="Detect on a copy downscaled to this longer side (0 = off)."),
    min_score: float | None = typer.Option(None, "--min-score", help="Drop Haar boxes below this level weight."),
    cascade: str | None = typer.Option(None, "--cascade", help="Cascade file or OpenCV cascade name (default "
                                       f"{haar.DEFAULT_CASCADE}; the tutorial's: {haar.TUTORIAL_CASCADE})."),
    max_faces: int | None = typer.Option(None, "--max-faces", min=1, help="Keep the N most confident faces."),
    trt_fp16: bool = typer.Option(False, "--trt-fp16", help="TensorRT: build an fp16 engine."),
    trt_cache: Path | None = typer.Option(None, "--trt-cache", help="TensorRT: engine cache folder."),
) -> None:
    """Landmarks for every face in photos: annotated images (--out) and one JSON document (--json)."""
    if draw not in ("points", "contours", "none"):
        raise typer.BadParameter(f"--draw must be points, contours or none (got {draw!r})")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from facemark.fileio import write_text_atomic
    from facemark.runtime.predict import build_document, collect_inputs, predict_files

    detector = _detector(scale_factor, min_neighbors, min_face, max_side, min_score, cascade)
    landmarker = _landmarker(model, provider, threads, detector, trt_fp16, trt_cache, max_faces)
    files, failures = collect_inputs(inputs)
    for failure in failures:
        console.print(f"[red]error:[/red] {failure.error}")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True, disable=len(files) < 2)

    with progress:
        task = progress.add_task("landmarks", total=len(files))

        def report(result) -> None:
            if result.error:
                progress.console.print(f"[red]error:[/red] {result.error}")
            progress.advance(task)

        results = predict_files(landmarker, files, out, draw, on_result=report)  # type: ignore[arg-type]
    everything = failures + results
    document = build_document(landmarker, everything)
    text = json.dumps(document, indent=1) + "\n"
    if json_path is not None:
        write_text_atomic(json_path, text)
    elif out is None:
        sys.stdout.write(text)
    _print_summary(everything, landmarker.providers, out, json_path)
    if any(r.error for r in everything):
        raise typer.Exit(code=1)  # exit code 1 whichever way the root CLI runs typer


def _print_summary(results, providers: list[str], out: Path | None, json_path: Path | None) -> None:
    ok = [r for r in results if not r.error]
    failed = len(results) - len(ok)
    faces = sum(len(r.faces) for r in ok)
    ms = sum(r.ms for r in ok) / len(ok) if ok else 0.0
    line = (f"{len(results)} images, {faces} faces, {failed} failed, {ms:.1f} ms per image "
            f"(read + detect + landmarks) on {providers[0]}")
    console.print(("[red]" if failed else "[green]") + line + ("[/red]" if failed else "[/green]"))
    if out is not None:
        console.print(f"annotated images: {out}")
    if json_path is not None:
        console.print(f"JSON: {json_path}")


@app.command("video")
def video_command(
    source: str = typer.Argument(..., help="A video file, or a camera index such as 0."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Annotated video (.mp4, mp4v codec)."),
    jsonl: Path | None = typer.Option(None, "--jsonl", help="Per-frame landmarks as JSON lines."),
    smooth: bool = typer.Option(True, "--smooth/--no-smooth", help="One-Euro smoothing of the points."),
    detect_every: int = typer.Option(10, "--detect-every", min=1, help="Run Haar every N frames (and on loss)."),
    model: Path | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    provider: str = typer.Option("auto", "--provider", "-p", help=PROVIDER_HELP),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads for the model."),
    draw: str = typer.Option("points", "--draw", help="points | contours | none"),
    min_face: float = typer.Option(haar.DEFAULT_MIN_FACE_FRACTION, "--min-face",
                                   help="Smallest face, as a fraction of the shorter side."),
    max_frames: int | None = typer.Option(None, "--max-frames", min=1, help="Stop after N frames."),
) -> None:
    """Per-frame landmarks of a video or camera: JSON lines and an annotated video; prints frames, faces, fps."""
    if draw not in ("points", "contours", "none"):
        raise typer.BadParameter(f"--draw must be points, contours or none (got {draw!r})")
    from facemark.runtime.video import run_video

    detector = _detector(haar.DEFAULT_SCALE_FACTOR, haar.DEFAULT_MIN_NEIGHBORS, min_face, haar.DEFAULT_MAX_SIDE, None)
    landmarker = _landmarker(model, provider, threads, detector, False, None)
    summary = run_video(source, landmarker, out=out, jsonl=jsonl, detect_every=detect_every, smooth=smooth,
                        draw=draw, max_frames=max_frames)  # type: ignore[arg-type]
    console.print(f"[green]{summary.frames} frames, {summary.faces} faces, {summary.fps:.1f} fps[/green] "
                  f"(Haar on {summary.detections} frames, {summary.losses} tracks lost) on {landmarker.providers[0]}")
    for path in summary.outputs:
        console.print(f"written: {path}")
