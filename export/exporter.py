"""`export_model`: checkpoint -> verified, self-describing ONNX model (fp32, fp16 or int8). One entry point.

Steps: load the checkpoint; gather real face crops (the validation split of `calib_data`, else the bundled
samples) through the runtime's preprocessing; export fp32 at the requested opset; convert to the precision;
verify against eager PyTorch and gate (facemark.export.parity); embed the metadata; write atomically.

Files: the model at `output` only when it passed (or `verify=False`); the parity report as JSON beside it
(`model.onnx` -> `model.parity.json`) in every case, so that a failed export can be diagnosed. A failed gate
raises ParityError and never touches `output` (a model already there from an earlier run is left as it was).
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import torch

import facemark
from facemark import metadata as meta
from facemark.choices import INT8_ACTIVATIONS
from facemark.contract import BoxCalibration, CropContract, box_from_landmarks
from facemark.data import FaceRecord, load_records, split_of, split_records, spread
from facemark.errors import FacemarkError, ImageError, ParityError
from facemark.evaluation import evaluate
from facemark.export import consumers, parity
from facemark.export.onnx_export import DEFAULT_OPSET, check_model, export_fp32, set_metadata
from facemark.export.precisions import PRECISIONS, check_output_name
from facemark.export.variants import CALIBRATION_FACES, CALIBRATION_METHOD, to_fp16, to_fp16_weights, to_int8
from facemark.fileio import check_writable, write_text_atomic, write_with_atomic
from facemark.imageio import read_gray
from facemark.reporting import summarize_warnings
from facemark.scheme import SCHEME_NAME
from facemark.train.checkpoint import file_sha256, load_model

REPORT_FORMAT = "facemark-parity/1"
SAMPLES_XML = Path(facemark.__file__).parent / "assets" / "samples" / "landmarks.xml"
# S8S8 by default: U8S8 saturates on x86 CPUs without VNNI (AVX2 only) -- measured here on an AMD EPYC
# without AVX-512/VNNI, the previous shipped U8S8 model scored 7.13 % NME instead of its 4.62 % (variants.py).
# uint8-7bit (facemark.choices.INT8_ACTIVATIONS): U8S8 with 7-bit weights, which cannot saturate there.
DEFAULT_INT8_ACTIVATIONS = "int8"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    report: dict  # the parity / accuracy report, also saved as JSON beside the model
    passed: bool  # every gate passed (False when verification was skipped)
    size_bytes: int


def report_path(output: Path) -> Path:
    """`best.int8.onnx` -> `best.int8.parity.json`."""
    return output.with_suffix(".parity.json")


def parse_batch(batch: str | int) -> int | None:
    """"dynamic" -> None (dynamic batch axis), "N" / N -> a fixed batch of N."""
    if isinstance(batch, str) and batch.strip().lower() == "dynamic":
        return None
    try:
        value = int(batch)
    except (TypeError, ValueError):
        raise FacemarkError(f"batch {batch!r}: expected 'dynamic' or a positive integer") from None
    if value < 1:
        raise FacemarkError(f"batch {batch!r}: expected 'dynamic' or a positive integer")
    return value


def reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """The parity reference: the checkpoint's network, eval mode, fp32.

    Also the test seam: tests replace it to verify against a deliberately different network.
    """
    return model.float().eval()


def export_model(checkpoint: Path, output: Path, *, opset: int = DEFAULT_OPSET, precision: str = "fp32",
                 calib_data: list[Path] | None = None, batch: str | int = "dynamic", verify: bool = True,
                 progress: Progress | None = None, int8_activations: str = DEFAULT_INT8_ACTIVATIONS,
                 verbose: bool = False) -> ExportResult:
    """Export `checkpoint` to `output`; raise ParityError (model not written) when a gate fails."""
    say = progress or (lambda _msg: None)
    checkpoint, output = Path(checkpoint), Path(output)
    if precision not in PRECISIONS:
        raise FacemarkError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    fixed_batch = parse_batch(batch)
    check_output_name(output, precision)  # a name that says another precision, or not .onnx, is refused
    check_writable(output, "exported model")  # before minutes of work, and before any report is written
    check_writable(report_path(output), "parity report")

    say(f"loading {checkpoint}")
    model, contract, doc = load_model(checkpoint)
    presence = bool(doc["model"].get("presence"))
    train_records, val_records, calibration = _records(calib_data, doc.get("train") or {}, say, presence, verbose)
    parity_records = (val_records or train_records)[: parity.REAL_FACES]
    real_crops = face_crops(parity_records, contract, say)

    say(f"exporting fp32 ONNX, opset {opset}, batch {'dynamic' if fixed_batch is None else fixed_batch}")
    fp32 = export_fp32(model, contract.size, opset, fixed_batch)
    if int8_activations not in INT8_ACTIVATIONS:
        raise FacemarkError(f"int8 activations {int8_activations!r}: choose one of {INT8_ACTIVATIONS}")
    candidate, variant_info = _convert(fp32, precision, train_records, contract, fixed_batch, say,
                                       int8_activations)
    check_model(candidate, opset, f"{precision} model")

    report = {"format": REPORT_FORMAT, "checkpoint": str(checkpoint), "output": str(output),
              "precision": precision, "opset": opset, "crop_size": contract.size,
              "batch": "dynamic" if fixed_batch is None else fixed_batch,
              # checked: the gates ran (False with --no-verify); passed: every gate passed (None when not checked)
              "checked": verify, "passed": None, **variant_info}
    if verify:
        say("verifying against eager PyTorch")
        report.update(verify_model(candidate, fp32, reference_model(model), contract, precision, fixed_batch,
                                   real_crops, val_records, say))
        report["inputs"]["real_faces_from"] = "validation split of --calib-data" if val_records else (
            "--calib-data (no validation faces)" if calib_data else f"bundled samples {SAMPLES_XML.name}")
    report["summary"] = parity.summary_line(report)
    passed = bool(verify and report["passed"])
    if len(real_crops) and (passed or not verify):
        say("checking the file in every consumer (ONNX Runtime without optimisations, OpenCV DNN, onnx.checker)")
        report["consumers"] = consumers.check_consumers(candidate, real_crops, precision)
        for line in consumers.summary_lines(report["consumers"]):
            say(line)
    if presence and (passed or not verify):
        report["presence"] = presence_separation(candidate, contract, val_records or train_records, say)

    source_sha = file_sha256(checkpoint)
    props = _metadata(contract, doc, precision, source_sha, report, calibration)
    if "consumers" in report:
        props[meta.CONSUMERS] = meta.dumps(consumers.consumers_summary(report["consumers"]))
    set_metadata(candidate, props)
    data = candidate.SerializeToString()
    report.update(source_sha256=source_sha, size_bytes=len(data), written=passed or not verify)
    keep_failed_report(report_path(output), say)
    text = json.dumps(parity.strict_json_value(report), indent=2, allow_nan=False, default=_json_default)
    write_text_atomic(report_path(output), text + "\n")
    if verify and not passed:
        raise ParityError(f"{output}: {report['summary']} (report: {report_path(output)})")
    write_with_atomic(output, lambda tmp: tmp.write_bytes(data))
    say(f"wrote {output} ({len(data) / 1e6:.1f} MB)")
    return ExportResult(output, report, passed, len(data))


def keep_failed_report(path: Path, say: Progress) -> None:
    """A failed export's report is what explains it: a re-run moves it aside (`best.int8.parity.failed.json`,
    `best.int8.parity.failed-2.json`, ...) instead of replacing it, and says so."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # none, or not a report: check_writable refused anything that is not a regular file
    if not isinstance(earlier, dict) or earlier.get("passed") is not False:
        return
    stem = path.name.removesuffix(".json")
    for n in range(1, 1000):
        aside = path.with_name(f"{stem}.failed{'' if n == 1 else f'-{n}'}.json")
        if not aside.exists():
            path.rename(aside)
            say(f"the earlier failed report {path} is kept as {aside}")
            return


# --- presence ------------------------------------------------------------------------------------------------
def presence_separation(candidate: onnx.ModelProto, contract: CropContract, records: Sequence[FaceRecord],
                        say: Progress) -> dict:
    """How well the exported file's face_score separates the records' faces (landmark-box crops) from face-free
    crops of the same photos, at the runtime's default threshold: recorded in the metadata, where the runtime
    reads whether to apply its presence threshold (facemark.metadata.PRESENCE_TRUST)."""
    from facemark.metrics import roc_auc
    from facemark.runtime.defaults import DEFAULT_MIN_SCORE
    from facemark.train.dataset import validation_negatives

    records = spread(records, PRESENCE_FACES)
    faces = face_crops(records, contract, say)
    negatives = validation_negatives(records, contract)
    run = parity.outputs_by_name(parity.open_session(candidate.SerializeToString()))

    def scores(x: np.ndarray) -> np.ndarray:
        return parity.run_batched(run, x, 16)[meta.FACE_SCORE].astype(np.float64)

    pos, neg = scores(faces), scores(negatives)
    auc = roc_auc(pos, neg)
    kept = float((pos >= DEFAULT_MIN_SCORE).mean()) if len(pos) else 0.0
    separation = {"auc": auc if np.isfinite(auc) else None, "faces": len(pos), "non_faces": len(neg),
                  "threshold": DEFAULT_MIN_SCORE, "faces_kept": kept,
                  "non_faces_kept": float((neg >= DEFAULT_MIN_SCORE).mean()) if len(neg) else 0.0}
    separation["trusted"] = meta.presence_trusted(separation)
    say(f"presence score: ROC AUC {parity.figure(auc)} on {len(pos)} faces / {len(neg)} face-free crops, "
        f"{100 * kept:.0f} % of faces >= {DEFAULT_MIN_SCORE:g}: "
        + ("applied by the runtime" if separation["trusted"] else "NOT trusted: the runtime keeps the detector's "
           "faces and warns (train longer for a presence score)"))
    return separation


PRESENCE_FACES = 256  # faces (and as many face-free crops) behind the recorded presence separation


# --- data --------------------------------------------------------------------------------------------------
def training_data(train_config: dict) -> list[Path]:
    """The checkpoint's training data paths (relative ones against the folder training ran in), if reachable."""
    base = Path(train_config.get("cwd") or ".")
    paths = [p if p.is_absolute() else base / p for p in map(Path, train_config.get("data") or [])]
    return paths if paths and all(p.exists() for p in paths) else []


def _records(calib_data: Sequence[Path] | None, train_config: dict, say: Progress, presence: bool = False,
             verbose: bool = False) -> tuple[list[FaceRecord], list[FaceRecord], BoxCalibration | None]:
    """(training split, validation split, fitted detector calibration) of --calib-data, else of the data the
    checkpoint was trained on (its own split), else the bundled samples -- said loudly, with what it costs."""
    origin = "--calib-data"
    if not calib_data:
        calib_data = training_data(train_config)
        origin = "the checkpoint's training data"
    if not calib_data:
        wanted = ", ".join(map(str, train_config.get("data") or [])) or "none recorded"
        say(f"WARNING: the checkpoint's training data ({wanted}) is not reachable and no --calib-data was given: "
            f"int8 calibrates on the {SAMPLES_XML.parent.name} faces, no Haar box calibration is embedded (predict "
            "uses raw Haar boxes, about 1.7 NME points worse) and the accuracy gate is skipped")
        return load_records([SAMPLES_XML], say), [], None
    problems: list[str] = []
    records = load_records([Path(p) for p in calib_data], problems.append)
    for line in summarize_warnings(problems, verbose):
        say(line)
    fraction, split_seed = split_of(train_config)
    train, val = split_records(records, fraction, split_seed)
    say(f"{origin}: {len(records)} faces, {len(train)} for calibration, {len(val)} for validation "
        f"(the training run's split: val_fraction {fraction}, split seed {split_seed})")
    from facemark.runtime.calibration import CALIBRATION_FIT_FACES, fit_calibration
    from facemark.runtime.detector import HaarDetector, default_detector_options

    fit_on = spread(train, CALIBRATION_FIT_FACES)
    say(f"fitting the Haar detector's box calibration on {len(fit_on)} training faces")
    # The detector the runtime will run for this model (a permissive cascade when it scores presence).
    calibration = fit_calibration(fit_on, HaarDetector(**default_detector_options(presence)), warn=say)
    return train, val, calibration


def face_crops(records: Sequence[FaceRecord], contract: CropContract, say: Progress) -> np.ndarray:
    """Network inputs (N, 1, S, S) of the records' faces, cropped on their landmark boxes (the training
    convention the detector calibration maps onto). Unreadable images are reported and skipped."""
    crops = []
    for record in records:
        try:
            gray = read_gray(record.image_path)
        except ImageError as exc:
            say(f"skipped: {exc}")
            continue
        tensor, _ = contract.prepare(gray, [box_from_landmarks(record.landmarks)])
        crops.append(tensor)
    if not crops:
        return np.zeros((0, 1, contract.size, contract.size), np.float32)
    return np.concatenate(crops)


# --- variants ----------------------------------------------------------------------------------------------
def _convert(fp32: onnx.ModelProto, precision: str, train_records: Sequence[FaceRecord],
             contract: CropContract, batch: int | None, say: Progress,
             int8_activations: str = DEFAULT_INT8_ACTIVATIONS) -> tuple[onnx.ModelProto, dict]:
    if precision == "fp32":
        return fp32, {}
    if precision == "fp16":
        say("converting to fp16 (fp32 input/output kept)")
        return to_fp16(fp32), {"fp16": {"keep_io_types": True}}
    if precision == "fp16w":
        say("storing the weights as fp16 (fp32 arithmetic: ONNX Runtime folds the Casts at load)")
        return to_fp16_weights(fp32), {"fp16w": {"weights": "fp16", "math": "fp32"}}
    crops = face_crops(spread(train_records, CALIBRATION_FACES), contract, say)
    if len(crops) == 0:
        raise FacemarkError("int8: no readable face to calibrate on; pass --calib-data with face images")
    say(f"quantizing to int8 (static QDQ, per-channel, {CALIBRATION_METHOD} on {len(crops)} face crops)")
    model, method = to_int8(fp32, crops, batch, int8_activations, say)
    activations = "QInt8" if int8_activations == "int8" else "QUInt8"
    weights = "QInt8 per-channel" + (", 7-bit range" if int8_activations == "uint8-7bit" else "")
    info = {"int8": {"format": "QDQ", "weights": weights, "activations": activations,
                     "calibration": method, "calibration_faces": len(crops)}}
    return model, info


# --- verification ------------------------------------------------------------------------------------------
def verify_model(candidate: onnx.ModelProto, fp32: onnx.ModelProto, reference: torch.nn.Module,
                 contract: CropContract, precision: str, batch: int | None, real_crops: np.ndarray,
                 val_records: Sequence[FaceRecord], say: Progress) -> dict:
    """Compare the candidate with eager PyTorch on real and random inputs; NME on validation faces."""
    size = contract.size
    session = parity.open_session(candidate.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    run_candidate = parity.outputs_by_name(session)
    run_reference = _torch_runner(reference)
    sets, outs, refs = [], [], []
    for source, b, x in parity.input_sets(real_crops, size, batch):
        ref = parity.run_batched(run_reference, x, b)
        out = parity.run_batched(run_candidate, x, b)
        # Points whose eager decode is a tie between two cells are a coin toss in any graph: left out, counted.
        tied = ref.pop(parity.TIED, np.zeros(ref[meta.OUTPUT_NAME].shape[:2], dtype=bool))
        cand_points, ref_points = out[meta.OUTPUT_NAME][~tied], ref[meta.OUTPUT_NAME][~tied]
        stats = parity.error_stats(cand_points, ref_points, size)
        scores = {name: parity.error_stats(out[name], ref[name], 1) for name in names[1:] if name in ref}
        sets.append({"source": source, "batch": b, "samples": len(x), "points": int(tied.size),
                     "tied_points": int(tied.sum()), "landmarks": stats, "scores": scores})
        outs.append(cand_points.reshape(-1))
        refs.append(ref_points.reshape(-1))
    overall = parity.error_stats(np.concatenate(outs), np.concatenate(refs), size)
    nme = None
    if val_records:
        say(f"validation NME on {len(val_records)} faces")
        nme = _validation_nme(session, fp32 if precision != "fp32" else None, contract, batch, val_records)
    gates = parity.check_gate(precision, sets, size, nme)
    gate = PRECISIONS[precision].gate
    return {
        "reference": "eager PyTorch, eval mode, fp32, TF32 off",
        "candidate": f"ONNX Runtime {session.get_providers()[0]}",
        "inputs": {"real_faces": int(min(len(real_crops), parity.REAL_FACES)),
                   "random_samples": parity.RANDOM_SAMPLES, "random_range": [-1.0, 1.0], "random_seed": 0},
        "sets": sets, "overall": overall, "nme": nme, "gates": gates,
        "gate": {"stat": gate.stat, "limit": gate.limit, "unit": gate.unit, "on": list(gate.sources),
                 "nme_increase": gate.nme_increase},
        "passed": parity.gates_passed(gates),
    }


def _torch_runner(model: torch.nn.Module) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Eager outputs by ONNX name: every output of a LandmarkNet, `landmarks` only of a plain module."""

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            t = torch.from_numpy(x)
            if not hasattr(model, "outputs"):
                return {meta.OUTPUT_NAME: model(t).float().numpy()}
            raw = model.raw(t)
            out = {name: value.float().numpy() for name, value in model.decode(raw).items()}
            if "scores" in raw:  # pip: the landmarks whose decode is a tie between two cells
                neighbors = model.codec.neighbors.numpy()
                out[parity.TIED] = parity.tied_landmarks(raw["scores"].float().numpy(), neighbors)
            return out

    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 reference wherever it runs
    torch.backends.cudnn.allow_tf32 = False
    return run


def _validation_nme(session, fp32: onnx.ModelProto | None, contract: CropContract, batch: int | None,
                    records: Sequence[FaceRecord]) -> dict:
    candidate = evaluate(parity.OnnxPredictor(session, contract, batch), records, batch_size=16).summary()
    baseline = candidate
    if fp32 is not None:
        fp32_predictor = parity.OnnxPredictor(parity.open_session(fp32.SerializeToString()), contract, batch)
        baseline = evaluate(fp32_predictor, records, batch_size=16).summary()
    return {"faces": candidate["faces"], "candidate": candidate["nme"], "fp32_onnx": baseline["nme"],
            "candidate_median": candidate["nme_median"], "candidate_fr@0.08": candidate["fr@0.08"],
            "unit": "fraction of the inter-ocular distance (0.01 = 1 NME point)"}


# --- metadata ----------------------------------------------------------------------------------------------
def _metadata(contract: CropContract, doc: dict, precision: str, source_sha: str, report: dict,
              calibration: BoxCalibration | None) -> dict[str, str]:
    train = doc.get("train") or {}
    props = {
        meta.FORMAT: meta.MODEL_FORMAT,
        meta.CONTRACT: contract.to_json(),
        meta.POINTS: SCHEME_NAME,
        meta.ARCH: str(doc["model"]["arch"]),
        meta.HEAD: str(doc["model"].get("head", "regression")),
        meta.PRECISION: precision,
        meta.TRAIN_DATA: meta.dumps(meta.recorded_paths(train.get("data"), train.get("cwd"))),
        meta.TRAIN_SPLIT: meta.dumps(dict(zip(("val_fraction", "split_seed"), split_of(train), strict=True))),
        meta.VAL_NME: meta.dumps((doc.get("metrics") or {}).get("val_nme")),
        meta.SOURCE_SHA256: source_sha,
        meta.VERSIONS: meta.dumps(_versions()),
        meta.EXPORTED_AT: datetime.now(UTC).isoformat(timespec="seconds"),
        meta.PARITY: meta.dumps(_parity_summary(report)),
    }
    if calibration is not None:
        props[meta.DETECTOR_CALIBRATION] = calibration.to_json()
    if report.get("presence"):
        props[meta.PRESENCE] = meta.dumps(parity.strict_json_value(report["presence"]))
    return props


def _parity_summary(report: dict) -> dict:
    """The metadata's parity record: {"verified": false} for --no-verify (the runtime warns), else the gates."""
    if not report.get("checked"):
        return {"verified": False}
    overall = report["overall"]
    summary = {"verified": True, "passed": report["passed"], "reference": "torch fp32 eager",
               "max_abs": overall["max_abs"], "p99_abs": overall["p99_abs"],
               "max_px": overall["px"]["max_abs"],
               "gates": {g["name"]: [None if g["value"] is None else round(g["value"], 6), g["limit"]]
                         for g in report["gates"] if g.get("gated", True)}}
    if report.get("nme"):
        summary.update(val_faces=report["nme"]["faces"], val_nme=report["nme"]["candidate"],
                       val_nme_fp32_onnx=report["nme"]["fp32_onnx"])
    return parity.strict_json_value(summary)


def _versions() -> dict[str, str]:
    import onnxruntime
    import torchvision

    return {"facemark": facemark.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "platform": sys.platform}


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
