"""Numerical parity of an ONNX candidate against eager PyTorch (Polygraphy's approach) and accuracy gates.

Reference: the checkpoint's network in eval mode, fp32, TF32 off. Candidate: the ONNX model in ONNX Runtime.
Inputs: real face crops (the runtime's preprocessing on landmark boxes) and seeded uniform noise in [-1, 1],
each at batch 1 and at a larger batch (the dynamic axis), or at the fixed batch of a static model.

Errors per element of `landmarks`: abs = |cand - ref|, rel = abs / |ref| (inf where ref is 0, as Polygraphy);
the minimum tolerances that would pass are the maxima (atol = max abs, rtol = max rel). Pixel figures are abs
errors times the crop size (normalised units are fractions of the crop).

Gates: one per precision, in the precision table (facemark.export.precisions.PRECISIONS): fp32 max abs <= 1e-4
normalised on every input set; fp16 / fp16w max abs <= 0.5 px at 224 on the real crops and validation NME <=
fp32 ONNX + 0.05 points; int8 p99 abs <= 8 px at 224 on the real crops and validation NME <= fp32 ONNX + 0.2
points (the accuracy gate that matters). NaN/Inf fail every precision.

The pip head decodes by argmax over grid cells. When a point's two best cells score within rounding of each
other, fp32 ONNX and eager fp32 may pick different cells: the landmark jumps by a cell although both graphs
compute the same numbers to 1e-7. Such points (the eager decode's top two cells within TIE_MARGIN logits), and
the points they vote for (each point's estimate averages its neighbours' votes), are left out of the point
statistics of every input set and counted (`tied_points`); the score outputs do not depend on which cell wins
and are compared whole. An undertrained model ties on most points (a model trained for two epochs: 58 % of
the points of real faces): the statistic is taken over the rest, and only when fewer than MIN_COMPARABLE_POINTS
remain does the gate fail with that reason (train longer) instead of a NaN statistic.

Reduced precisions of a model too weak for its points to mean anything (fp32 ONNX validation NME above
WEAK_MODEL_NME: flat score maps whose argmax flips under any rounding) are judged by accuracy: the point
statistic is reported, not gated, and the NME gate decides. Every gate that fails says what the user can do
(`advice`). Reports are strict JSON: a statistic that cannot be computed is null, never NaN.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from facemark.contract import CropContract
from facemark.export.precisions import PRECISIONS, RANDOM, REAL
from facemark.metadata import FACE_SCORE, INPUT_NAME

SCORE_FP32_LIMIT = 1e-4  # landmark_scores / face_score, fp32 vs eager
SCORE_REDUCED_LIMIT = 0.05  # face_score of fp16 / int8 on real faces
# A decode whose top two cells are closer than this (logits) is a tie: fp32 rounding (~1e-6) may flip it.
TIE_MARGIN = 1e-4
TIED = "_tied"  # the reference runner's extra output: (N, P) landmarks whose decode is a tie (see tied_landmarks)
MIN_COMPARABLE_POINTS = 68  # points (one face's worth) of a gated set that must decode without a tie
WEAK_MODEL_NME = 0.10  # fp32 ONNX validation NME above which reduced precisions are gated on NME alone
REAL_FACES = 16
RANDOM_SAMPLES = 8
LARGE_BATCH = 8


# --- sessions ----------------------------------------------------------------------------------------------
def outputs_by_name(session):
    """x -> {output name: array} of an ONNX Runtime session (the model's one input)."""
    names = [o.name for o in session.get_outputs()]
    return lambda x: dict(zip(names, session.run(None, {INPUT_NAME: x}), strict=True))


def open_session(model: str | os.PathLike | bytes, provider: str = "cpu", threads: int | None = None):
    """A plain ONNX Runtime session (the only place export touches providers)."""
    import onnxruntime as ort

    providers = {"cpu": ["CPUExecutionProvider"],
                 "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}[provider]
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers)


class OnnxPredictor:
    """`facemark.evaluation.CropPredictor` over an ONNX Runtime session."""

    def __init__(self, session, contract: CropContract, batch: int | None = None) -> None:
        self.session, self.contract, self.batch = session, contract, batch

    def predict(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if self.batch is None:
            return self.session.run(None, {INPUT_NAME: x})[0]
        return run_fixed_batch(lambda chunk: self.session.run(None, {INPUT_NAME: chunk})[0], x, self.batch)


def run_fixed_batch(fn, x: np.ndarray, batch: int) -> np.ndarray:
    """Run `fn` on chunks of exactly `batch` rows (the last one padded by repeating rows), then trim."""
    outputs = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outputs.append(fn(np.ascontiguousarray(chunk))[: batch - pad])
    return np.concatenate(outputs)


# --- inputs ------------------------------------------------------------------------------------------------
def input_sets(real_crops: np.ndarray, size: int, batch: int | None, seed: int = 0
               ) -> list[tuple[str, int, np.ndarray]]:
    """(source, batch size, inputs) triples: real crops and seeded noise at batch 1 and a larger batch."""
    rng = np.random.default_rng(seed)
    noise = rng.uniform(-1.0, 1.0, (RANDOM_SAMPLES, 1, size, size)).astype(np.float32)
    batches = (1, LARGE_BATCH) if batch is None else (batch,)
    sets = []
    for source, data in ((REAL, real_crops[:REAL_FACES]), (RANDOM, noise)):
        if len(data) == 0:
            continue
        for b in batches:
            sets.append((source, b, _pad_cyclic(data, math.ceil(len(data) / b) * b)))  # whole batches
    return sets


def point_margins(scores: np.ndarray) -> np.ndarray:
    """Per crop and point, the gap between the best and second-best cell score: (N, P, H, W) -> (N, P)."""
    flat = scores.reshape(scores.shape[0], scores.shape[1], -1)
    top2 = np.sort(flat, axis=2)[:, :, -2:]
    return top2[:, :, 1] - top2[:, :, 0]


def tied_landmarks(scores: np.ndarray, neighbors: np.ndarray, margin: float | None = None) -> np.ndarray:
    """(N, P) bool: landmarks a cell tie can move -- the point's own decode is a tie, or that of a point that
    votes for it (`neighbors` (P, K): the points each point votes for)."""
    tied = point_margins(scores) < (TIE_MARGIN if margin is None else margin)
    voters = np.eye(len(neighbors), dtype=bool)
    voters[np.repeat(np.arange(len(neighbors)), neighbors.shape[1]), neighbors.reshape(-1)] = True
    return (tied.astype(np.int32) @ voters.astype(np.int32)) > 0


def _pad_cyclic(data: np.ndarray, count: int) -> np.ndarray:
    return np.ascontiguousarray(data[np.arange(count) % len(data)], dtype=np.float32)


def run_batched(fn, x: np.ndarray, batch: int):
    """Run `fn` on consecutive chunks of `batch` rows (the last one may be shorter for a dynamic model);
    `fn` returns an array or a dict of arrays by output name (concatenated per name)."""
    parts = [fn(np.ascontiguousarray(x[i : i + batch])) for i in range(0, len(x), batch)]
    if isinstance(parts[0], dict):
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return np.concatenate(parts)


# --- statistics --------------------------------------------------------------------------------------------
def error_stats(candidate: np.ndarray, reference: np.ndarray, size: int) -> dict:
    """Polygraphy-style comparison of one output; `size` converts normalised errors to crop pixels."""
    cand = np.asarray(candidate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    finite = np.isfinite(cand)
    abs_err = np.abs(cand - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_err = np.where(ref != 0, abs_err / np.abs(ref), np.where(abs_err == 0, 0.0, np.inf))
    abs_ok, rel_ok = abs_err[finite], rel_err[finite]
    stats = {
        "shape": list(cand.shape),
        "nan": int(np.isnan(cand).sum()),
        "inf": int(np.isinf(cand).sum()),
        "reference_nan_inf": int((~np.isfinite(ref)).sum()),
        **_summary(abs_ok, "abs"),
        **_summary(rel_ok, "rel"),
    }
    stats["min_atol"] = stats["max_abs"]
    stats["min_rtol"] = stats["max_rel"]
    stats["px"] = {k: None if v is None else v * size for k, v in _summary(abs_ok, "abs").items()}
    return stats


def _summary(values: np.ndarray, suffix: str) -> dict[str, float | None]:
    if values.size == 0:  # nothing comparable: null in the JSON report, never NaN
        return {f"{k}_{suffix}": None for k in ("max", "mean", "median", "p99")}
    return {
        f"max_{suffix}": float(values.max()),
        f"mean_{suffix}": float(values.mean()),
        f"median_{suffix}": float(np.median(values)),
        f"p99_{suffix}": float(np.percentile(values, 99)),
    }


def check_gate(precision: str, sets: Sequence[dict], size: int, nme: dict | None) -> list[dict]:
    """Evaluate the precision's gates. Each result names the measure, its value, the limit, whether it passed,
    whether it counts (`gated`; a weak model's reduced-precision point statistic does not) and, when it failed,
    what the user can do (`advice`)."""
    gate = PRECISIONS[precision].gate
    results = []
    gated = [s for s in sets if s["source"] in gate.sources]
    limit = gate.limit_at(size)
    weak = weak_model(precision, nme)
    for s in gated:
        stats = s["landmarks"]
        name = f"{gate.stat} ({s['source']}, batch {s['batch']})"
        value = None if stats[gate.stat] is None else stats[gate.stat] * (size if gate.unit == "px" else 1.0)
        comparable = s.get("points", 0) - s.get("tied_points", 0)
        if weak:
            results.append(_result(name, value, limit, gate.unit, value is not None and value <= limit, gated=False,
                                   advice=WEAK_MODEL_NOTE.format(nme=100 * nme["fp32_onnx"])))
        elif comparable < MIN_COMPARABLE_POINTS or value is None:
            results.append(_result(f"comparable points ({s['source']}, batch {s['batch']}; "
                                   f"{s.get('tied_points', 0)} of {s.get('points', 0)} tie)", comparable,
                                   MIN_COMPARABLE_POINTS, "points", False, advice=UNDERTRAINED_ADVICE))
        else:
            passed = bool(value <= limit) and stats["nan"] == 0 and stats["inf"] == 0
            results.append(_result(name, value, limit, gate.unit, passed, advice=POINT_ADVICE[precision]))
    if not gated:
        results.append(_result(f"{gate.stat} on {'/'.join(gate.sources)} inputs", None, limit, gate.unit, False,
                               advice="no input of that kind was available: pass --calib-data with face images"))
    for s in sets:  # NaN/Inf fail every precision on every input set
        if s["source"] not in gate.sources and (s["landmarks"]["nan"] or s["landmarks"]["inf"]):
            bad = s["landmarks"]["nan"] + s["landmarks"]["inf"]
            results.append(_result(f"NaN/Inf ({s['source']}, batch {s['batch']})", bad, 0, "count", False,
                                   advice=POINT_ADVICE[precision]))
    results += _score_gates(precision, sets)
    if gate.nme_increase is not None and nme and nme.get("faces"):
        increase = nme["candidate"] - nme["fp32_onnx"]
        allowed = gate.nme_allowance(nme["fp32_onnx"])
        results.append(_result("validation NME increase over fp32 ONNX", increase, allowed, "NME",
                               bool(increase <= allowed), advice=POINT_ADVICE[precision]))
    return results


# What a user can do when a gate fails (docs/CLI.md, "Train and export your own model").
NO_VERIFY = ("--no-verify writes the file anyway, marked unverified in its metadata; the runtime then warns and "
             "its JSON says so")
UNDERTRAINED_ADVICE = ("most points decode to a tie between two grid cells: the model is too undertrained to "
                       "compare point by point; train longer, or " + NO_VERIFY)
WEAK_MODEL_NOTE = ("not gated: the model's fp32 ONNX validation NME is {nme:.1f} %, above which its flat score maps "
                   "flip cells under any rounding; this precision is judged by its NME gate")
POINT_ADVICE = {
    "fp32": "the ONNX graph computes something else than the checkpoint: report it as a bug; " + NO_VERIFY,
    "fp16": "try --precision fp16w (fp16 weights, fp32 math) or fp32; " + NO_VERIFY,
    "fp16w": "try --precision fp32; " + NO_VERIFY,
    "int8": "try --int8-activations int8 (S8S8), --precision fp16 or fp32, or more --calib-data faces; " + NO_VERIFY,
}


def weak_model(precision: str, nme: dict | None) -> bool:
    """A reduced precision (with an NME gate, which then decides) of a model whose fp32 validation NME says its
    points are not yet meaningful."""
    has_nme_gate = PRECISIONS[precision].gate.nme_increase is not None
    return has_nme_gate and bool(nme and nme.get("faces")) and nme["fp32_onnx"] > WEAK_MODEL_NME


def _result(name: str, value: float | None, limit: float | None, unit: str, passed: bool, gated: bool = True,
            advice: str = "") -> dict:
    out = {"name": name, "value": value, "limit": limit, "unit": unit, "passed": passed, "gated": gated}
    if advice and (not passed or not gated):
        out["advice"] = advice
    return out


def gates_passed(gates: Sequence[dict]) -> bool:
    """Every gate that counts passed."""
    return all(g["passed"] for g in gates if g.get("gated", True))


def _score_gates(precision: str, sets: Sequence[dict]) -> list[dict]:
    """The score outputs (in [0, 1]): fp32 within SCORE_FP32_LIMIT everywhere; fp16/int8 `face_score` within
    SCORE_REDUCED_LIMIT on real faces (a threshold is applied to it); no NaN/Inf anywhere."""
    results = []
    for s in sets:
        for name, stats in (s.get("scores") or {}).items():
            where = f"{name} ({s['source']}, batch {s['batch']})"
            if stats["nan"] or stats["inf"]:
                results.append(_result(f"NaN/Inf {where}", stats["nan"] + stats["inf"], 0, "count", False,
                                       advice=POINT_ADVICE[precision]))
                continue
            if precision == "fp32":
                limit = SCORE_FP32_LIMIT
            elif name == FACE_SCORE and s["source"] == REAL:
                limit = SCORE_REDUCED_LIMIT
            else:
                continue
            results.append(_result(f"max_abs {where}", stats["max_abs"], limit, "score",
                                   bool(stats["max_abs"] <= limit), advice=POINT_ADVICE[precision]))
    return results


def summary_line(report: dict) -> str:
    """One line for the CLI, the metadata and ParityError: the figures, then each failed gate with its statistic,
    its limit and what to do."""
    if not report.get("checked"):
        return f"{report['precision']}: not verified (--no-verify)"
    real = [s["landmarks"] for s in report["sets"] if s["source"] == REAL and s["landmarks"]["max_abs"] is not None]
    others = [s["landmarks"] for s in report["sets"] if s["landmarks"]["max_abs"] is not None]
    text = f"{report['precision']} vs eager PyTorch fp32"
    if real or others:
        worst = max(real or others, key=lambda st: st["max_abs"])
        text += (f" on {'face crops' if real else 'noise inputs'}: max abs {worst['max_abs']:.3g} "
                 f"({worst['px']['max_abs']:.3g} px of the {report['crop_size']} px crop)")
    if report.get("nme") and report["nme"].get("faces"):
        n = report["nme"]
        text += f", validation NME {100 * n['candidate']:.2f}% (fp32 ONNX {100 * n['fp32_onnx']:.2f}%)"
    failed = [g for g in report["gates"] if g.get("gated", True) and not g["passed"]]
    if not failed:
        return f"{text}: passed"
    reasons = "; ".join(f"{g['name']} = {figure(g['value'])} "
                        f"{'<' if g['unit'] == 'points' else '>'} {figure(g['limit'])} {g['unit']}" for g in failed)
    advice = list(dict.fromkeys(g["advice"] for g in failed if g.get("advice")))
    return f"{text}: FAILED gate: {reasons}" + (f". What to do: {' / '.join(advice)}" if advice else "")


def figure(value: float | None, spec: str = ".4g") -> str:
    """A statistic for a report line or table: "n/a" where it could not be computed (None, NaN)."""
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def strict_json_value(value: object) -> object:
    """`value` with every non-finite float as None (JSON has no NaN/Inf; strict parsers refuse them)."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json_value(v) for v in value]
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value
