"""`facemark evaluate`: NME of a checkpoint (.pt, eager PyTorch) or an exported model (.onnx, ONNX Runtime).

Both go through the same torch-free evaluation (facemark.evaluation) and the runtime's preprocessing; an
.onnx model is scored exactly as deployed. `--boxes haar` starts from the Haar detector's box (mapped by the
model's calibration unless --uncalibrated) instead of the landmark box; `--boxes pipeline` runs the whole runtime.

Which faces: every face of --data, unless --data is (part of) the model's own training data (recorded in the
checkpoint or the export's metadata), where only the faces its training held out are scored (the split is
seeded per face key, so it is the same within a subfolder); `--split` chooses explicitly. Refinement
and test-time flip default to the runtime's.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from facemark.choices import EvalBoxes, EvalSplit, Provider
from facemark.cli_names import FILE, renamed
from facemark.data import load_records, split_of, split_records
from facemark.errors import DataError, printable
from facemark.reporting import progress_display, summarize_warnings
from facemark.runtime.cli_options import with_options
from facemark.runtime.detectors import HAAR
from facemark.runtime.options import DetectorOptions, PipelineOptions, RuntimeOptions

console = Console(soft_wrap=True)


def _training_data(predictor) -> tuple[list[str], dict]:
    """The data paths the model was trained on and its split settings, as recorded (checkpoint or metadata)."""
    train = getattr(predictor, "checkpoint", {}).get("train")
    if train is not None:
        return list(train.get("data") or []), train
    info = getattr(predictor, "info", None)
    return (list(info.train_data), info.train_split or {}) if info is not None else ([], {})


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def within_training_data(given: list[Path], recorded: list[str]) -> bool:
    """Whether every --data path is the recorded training data or inside it (compared resolved; for a model
    trained on another checkout, by the recorded path's last two components, e.g. data/300w). The split is a
    function of each face's key, so the model's own split then names exactly its held-out faces among them."""
    if not recorded or not given:
        return False
    roots = [Path(r).resolve() for r in recorded]
    tails = [Path(os.path.abspath(r)).parts[-2:] for r in recorded]

    def inside(p: Path) -> bool:
        parts = p.resolve().parts
        return any(_contains(root, p.resolve()) for root in roots) or any(
            parts[k:k + len(tail)] == tail for tail in tails for k in range(len(parts)))

    return all(inside(p) for p in given)


def _load_predictor(model: Path, provider: str):
    if model.suffix == ".onnx":
        from facemark.runtime.session import LandmarkModel

        m = LandmarkModel(model, provider=provider)
        return m, m.info.calibration, {"path": str(model), **m.info.summary(), "providers": m.providers}
    from facemark.train.predictor import TorchPredictor

    p = TorchPredictor(model, device="cuda" if provider in ("cuda", "tensorrt") else "cpu")
    metrics = p.checkpoint.get("metrics", {})
    return p, None, {"path": str(model), "arch": p.checkpoint["model"]["arch"], "precision": "fp32 (eager)",
                     "val_nme": metrics.get("val_nme")}


@renamed(split_seed="--seed", device="--provider")
@with_options
def evaluate_command(
    model: Path = typer.Option(..., "--model", help="Checkpoint (.pt) or exported model (.onnx)."),
    data: list[Path] = typer.Option(..., "--data", help="dlib XML file or folder of .pts files; repeatable."),
    split: EvalSplit | None = typer.Option(None, "--split", help="The deterministic split of --data (default: val "
                                           "when --data is (part of) the model's training data, else all)."),
    val_fraction: float | None = typer.Option(None, "--val-fraction", help="Default: a checkpoint's own split, "
                                              "else 0.1 (training's default)."),
    split_seed: int | None = typer.Option(None, "--split-seed", help="Split seed. Default: a checkpoint's own "
                                    "split, else 0 (training's default)."),
    boxes: EvalBoxes = typer.Option("gt", "--boxes", help="gt: landmark boxes | haar: Haar detector boxes | pipeline: "
                              "the whole runtime (FaceLandmarker.detect, presence threshold, false faces on "
                              "face-free background crops; .onnx only)."),
    detection: DetectorOptions = DetectorOptions(),
    pipeline: PipelineOptions = PipelineOptions(),
    calibrated: bool = typer.Option(True, "--calibrated/--uncalibrated",
                                    help="With --boxes haar: apply the model's detector calibration."),
    device: Provider = typer.Option("auto", "--device", help="Where the model runs: auto, cpu, cuda or tensorrt "
                                    "(a .pt checkpoint: cuda for cuda and tensorrt, else cpu)."),
    json_path: Path | None = typer.Option(None, "--json", metavar=FILE, help="Write the summary as JSON."),
    csv_path: Path | None = typer.Option(None, "--csv", metavar=FILE, help="Write per-face errors as CSV."),
    plot_path: Path | None = typer.Option(None, "--plot", metavar=FILE, help="Write the CED curve as PNG."),
    batch_size: int = typer.Option(32, "--batch-size", help="Face crops per model run."),
    verbose: bool = typer.Option(False, "--verbose", help="List every data warning (default: one line per kind)."),
) -> None:
    """NME (inter-ocular), failure rate and AUC at 0.08, per-face CSV and CED plot."""
    from facemark.evaluation import evaluate, ground_truth_box, write_reports
    from facemark.outputs import OutputPlan

    plan = OutputPlan().read(model, "--model").read_data(data, "--data")
    plan.write(json_path, "--json").write(csv_path, "--csv").write(plot_path, "--plot").check()  # before any face
    warnings: list[str] = []
    records = load_records(data, warnings.append)
    for w in summarize_warnings(warnings, verbose):
        console.print(f"[yellow]warning:[/yellow] {escape(printable(w))}", highlight=False)
    boxes, provider = boxes.value, device.value
    refine, tta = pipeline.refine, pipeline.tta
    predictor, calibration, model_meta = _load_predictor(model, provider)
    recorded, recorded_split = _training_data(predictor)
    own_data = within_training_data(list(data), recorded)
    split = split.value if split is not None else ("val" if own_data else "all")
    total = len(records)
    if split != "all":
        own_fraction, own_seed = split_of(recorded_split)  # the model's own split (training's defaults if unknown)
        train_part, val_part = split_records(records, own_fraction if val_fraction is None else val_fraction,
                                             own_seed if split_seed is None else split_seed)
        records = {"val": val_part, "train": train_part}[split]
    why = "(part of) the model's training data" if own_data else ("not the model's training data" if recorded else
                                                             "no training data recorded in the model")
    console.print(f"faces: {len(records)} of {total} ({split} split; --data is {why}); refine {refine}, tta {tta}",
                  highlight=False)
    if boxes == "pipeline":
        _evaluate_pipeline(model, provider, records, RuntimeOptions(detection, pipeline),
                           (json_path, csv_path, plot_path), {"split": split, "data": [str(p) for p in data]})
        return
    if detection.detector != HAAR:
        raise typer.BadParameter(f"--detector {detection.detector}: only with --boxes pipeline")
    if boxes == "gt":
        source, box_label = ground_truth_box, "landmark boxes"
    elif boxes == "haar":
        from facemark.runtime.calibration import haar_box_source
        from facemark.runtime.detectors import create_detector

        presence = bool(getattr(predictor, "has_face_score", False)
                        or getattr(predictor, "checkpoint", {}).get("model", {}).get("presence"))
        detector = create_detector(HAAR, presence, detection.detector_kwargs())  # the runtime's for this model
        source = haar_box_source(detector, calibration if calibrated else None)
        box_label = f"{detector.name}, {'calibrated' if calibrated and calibration else 'uncalibrated'}"
    with progress_display(console) as progress:
        task = progress.add_task("evaluating", total=len(records))
        result = evaluate(predictor, records, source, batch_size, lambda n: progress.advance(task, n),
                          refine=refine, flip=tta == "flip")
    for line in result.unreadable:
        console.print(f"[yellow]skipped:[/yellow] {escape(printable(line))}", highlight=False)
    doc = {**result.summary(), "model": model_meta, "data": [str(p) for p in data], "split": split,
           "boxes": box_label, "refine": refine, "tta": tta}
    write_reports(doc, result.to_csv(), result.errors, json_path, csv_path, plot_path, label=model.name)
    console.print(
        f"{doc['faces']} faces ({box_label}; detection rate {100 * doc['detection_rate']:.1f}%): "
        f"NME {100 * doc['nme']:.2f}% (median {100 * doc['nme_median']:.2f}%), "
        f"FR@0.08 {100 * doc['fr@0.08']:.2f}%, AUC@0.08 {doc['auc@0.08']:.4f}",
        highlight=False,
    )


def _evaluate_pipeline(model: Path, provider: str, records, options: RuntimeOptions,
                       paths: tuple[Path | None, Path | None, Path | None], meta: dict) -> None:
    """`--boxes pipeline`: the runtime end to end (facemark.runtime.evaluation); paths = (json, csv, plot)."""
    from facemark.evaluation import write_reports
    from facemark.runtime.evaluation import evaluate_pipeline
    from facemark.runtime.landmarker import FaceLandmarker

    if model.suffix != ".onnx":
        raise DataError("--boxes pipeline runs the deployed runtime: pass an exported .onnx model")
    landmarker = FaceLandmarker(model, device=provider, options=options)
    with progress_display(console) as progress:
        task = progress.add_task("pipeline", total=len(records))
        result = evaluate_pipeline(landmarker, records, lambda n: progress.advance(task, n))
    for line in result.unreadable:
        console.print(f"[yellow]skipped:[/yellow] {escape(printable(line))}", highlight=False)
    doc = result.summary(landmarker.min_score)
    doc.update(model=str(model), **meta, refine=options.pipeline.refine, tta=options.pipeline.tta,
               detector=landmarker.detector.config())
    write_reports(doc, result.to_csv(landmarker.min_score), result.kept_errors(landmarker.min_score), *paths,
                  label=model.name)
    auc = "n/a (no presence head)" if doc["presence_auc"] is None else f"{doc['presence_auc']:.4f}"
    console.print(
        f"{doc['annotated_faces']} faces: detection rate {100 * doc['detection_rate']:.1f}%, NME "
        f"{100 * doc['nme']:.2f}% (median {100 * doc['nme_median']:.2f}%, FR@0.08 {100 * doc['fr@0.08']:.2f}%); "
        f"{doc['false_faces']} false faces on {doc['background_crops']} face-free crops "
        f"({doc['false_faces_per_crop']:.3f} per crop); presence AUC {auc}",
        highlight=False,
    )
