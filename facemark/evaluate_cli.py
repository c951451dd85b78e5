"""`facemark evaluate`: NME of a checkpoint (.pt, eager PyTorch) or an exported model (.onnx, ONNX Runtime).

Both go through the same torch-free evaluation (facemark.evaluation) and the runtime's preprocessing; an
.onnx model is scored exactly as deployed. `--boxes haar` scores the whole pipeline: the Haar detector's box
(mapped by the model's calibration unless --uncalibrated) instead of the landmark box.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from facemark.choices import EvalBoxes, EvalSplit, Provider, Tta
from facemark.data import load_records, split_of, split_records
from facemark.errors import DataError, printable
from facemark.reporting import progress_display, summarize_warnings
from facemark.runtime.detectors import HAAR, DetectorChoice

console = Console(soft_wrap=True)


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


def evaluate_command(
    model: Path = typer.Option(..., "--model", help="Checkpoint (.pt) or exported model (.onnx)."),
    data: list[Path] = typer.Option(..., "--data", help="dlib XML file or folder of .pts files; repeatable."),
    split: EvalSplit = typer.Option("val", "--split", help="The deterministic split of --data."),
    val_fraction: float | None = typer.Option(None, "--val-fraction", help="Default: a checkpoint's own split, "
                                              "else 0.1 (training's default)."),
    seed: int | None = typer.Option(None, "--split-seed", "--seed", help="Split seed. Default: a checkpoint's own "
                                    "split, else 0 (training's default)."),
    boxes: EvalBoxes = typer.Option("gt", "--boxes", help="gt: landmark boxes | haar: Haar detector boxes | pipeline: "
                              "the whole runtime (FaceLandmarker.detect, presence threshold, false faces on "
                              "face-free background crops; .onnx only)."),
    refine: int = typer.Option(0, "--refine", min=0, help="Extra passes re-cropped on the predicted landmarks."),
    tta: Tta = typer.Option("none", "--tta", help="Test-time flip (mirror each crop and average)."),
    min_score: float | None = typer.Option(None, "--min-score", min=0.0, max=1.0,
                                           help="--boxes pipeline: presence threshold (0 keeps every detection; "
                                                "default: the runtime's)."),
    detector: DetectorChoice = typer.Option(HAAR, "--detector", help="--boxes pipeline: the face detector (haar, "
                                            "or a CNN detector fetched with `facemark detectors fetch NAME`)."),
    calibrated: bool = typer.Option(True, "--calibrated/--uncalibrated",
                                    help="With --boxes haar: apply the model's detector calibration."),
    provider: Provider = typer.Option("auto", "--provider", help="ONNX Runtime provider for .onnx models."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the summary as JSON."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Write per-face errors as CSV."),
    plot_path: Path | None = typer.Option(None, "--plot", help="Write the CED curve as PNG."),
    batch_size: int = typer.Option(32, "--batch-size"),
    verbose: bool = typer.Option(False, "--verbose", help="List every data warning (default: one line per kind)."),
) -> None:
    """NME (inter-ocular), failure rate and AUC at 0.08, per-face CSV and CED plot."""
    from facemark.evaluation import evaluate, ground_truth_box, write_reports
    from facemark.fileio import check_writable

    for path, what in ((json_path, "--json file"), (csv_path, "--csv file"), (plot_path, "--plot file")):
        if path is not None:
            check_writable(path, what)  # before any face is evaluated
    warnings: list[str] = []
    records = load_records(data, warnings.append)
    for w in summarize_warnings(warnings, verbose):
        console.print(f"[yellow]warning:[/yellow] {escape(printable(w))}", highlight=False)
    split, boxes, tta, provider = split.value, boxes.value, tta.value, provider.value
    predictor, calibration, model_meta = _load_predictor(model, provider)
    if split != "all":
        # A checkpoint knows the split it was trained on; an .onnx model does not (training's defaults).
        own_fraction, own_seed = split_of(getattr(predictor, "checkpoint", {}).get("train") or {})
        train_part, val_part = split_records(records, own_fraction if val_fraction is None else val_fraction,
                                             own_seed if seed is None else seed)
        records = {"val": val_part, "train": train_part}[split]
    if boxes == "pipeline":
        _evaluate_pipeline(model, provider, records, refine, tta == "flip", min_score, json_path, detector.value)
        return
    if detector.value != HAAR:
        raise typer.BadParameter(f"--detector {detector.value}: only with --boxes pipeline")
    if boxes == "gt":
        source, box_label = ground_truth_box, "landmark boxes"
    elif boxes == "haar":
        from facemark.runtime.calibration import haar_box_source
        from facemark.runtime.detector import HaarDetector, default_detector_options

        presence = bool(getattr(predictor, "has_face_score", False)
                        or getattr(predictor, "checkpoint", {}).get("model", {}).get("presence"))
        detector = HaarDetector(**default_detector_options(presence))  # what the runtime runs for this model
        source = haar_box_source(detector, calibration if calibrated else None)
        box_label = f"{detector.name}, {'calibrated' if calibrated and calibration else 'uncalibrated'}"
    with progress_display(console) as progress:
        task = progress.add_task("evaluating", total=len(records))
        result = evaluate(predictor, records, source, batch_size, lambda n: progress.advance(task, n),
                          refine=refine, flip=tta == "flip")
    for line in result.unreadable:
        console.print(f"[yellow]skipped:[/yellow] {escape(printable(line))}", highlight=False)
    meta = {"model": model_meta, "data": [str(p) for p in data], "split": split, "boxes": box_label,
            "refine": refine, "tta": tta}
    doc = write_reports(result, meta, json_path, csv_path, plot_path, label=model.name)
    console.print(
        f"{doc['faces']} faces ({box_label}; detection rate {100 * doc['detection_rate']:.1f}%): "
        f"NME {100 * doc['nme']:.2f}% (median {100 * doc['nme_median']:.2f}%), "
        f"FR@0.08 {100 * doc['fr@0.08']:.2f}%, AUC@0.08 {doc['auc@0.08']:.4f}",
        highlight=False,
    )


def _evaluate_pipeline(model: Path, provider: str, records, refine: int, flip: bool, min_score: float | None,
                       json_path: Path | None, detector: str = HAAR) -> None:
    """`--boxes pipeline`: the runtime end to end (facemark.runtime.evaluation)."""
    import json

    from facemark.fileio import write_text_atomic
    from facemark.runtime.defaults import DEFAULT_MIN_SCORE
    from facemark.runtime.evaluation import evaluate_pipeline
    from facemark.runtime.landmarker import FaceLandmarker

    min_score = DEFAULT_MIN_SCORE if min_score is None else min_score
    if model.suffix != ".onnx":
        raise DataError("--boxes pipeline runs the deployed runtime: pass an exported .onnx model")
    landmarker = FaceLandmarker(model, provider=provider, refine=refine, flip=flip, min_score=min_score or None,
                                detector=detector)
    with progress_display(console) as progress:
        task = progress.add_task("pipeline", total=len(records))
        result = evaluate_pipeline(landmarker, records, lambda n: progress.advance(task, n))
    for line in result.unreadable:
        console.print(f"[yellow]skipped:[/yellow] {escape(printable(line))}", highlight=False)
    doc = result.summary(landmarker.min_score)
    doc.update(model=str(model), refine=refine, tta="flip" if flip else "none", detector=landmarker.detector.config())
    if json_path:
        write_text_atomic(json_path, json.dumps(doc, indent=2) + "\n")
    auc = "n/a (no presence head)" if doc["presence_auc"] is None else f"{doc['presence_auc']:.4f}"
    console.print(
        f"{doc['annotated_faces']} faces: detection rate {100 * doc['detection_rate']:.1f}%, NME "
        f"{100 * doc['nme']:.2f}% (median {100 * doc['nme_median']:.2f}%, FR@0.08 {100 * doc['fr@0.08']:.2f}%); "
        f"{doc['false_faces']} false faces on {doc['background_crops']} face-free crops "
        f"({doc['false_faces_per_crop']:.3f} per crop); presence AUC {auc}",
        highlight=False,
    )
