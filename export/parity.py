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

The pip head decodes by argmax over grid cells. On a noise crop two cells can score within rounding of each
other, and then fp32 ONNX and eager fp32 may pick different cells: a landmark jumps by a cell although both
graphs compute the same numbers to 1e-7. Noise crops whose eager decode has two cells within TIE_MARGIN (in
logits) for any point are left out of the comparison and counted (`ties_excluded`); real faces never are.
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
DECODE_MARGIN = "_decode_margin"  # the reference runner's extra output: each crop's smallest top-2 gap
REAL_FACES = 16
RANDOM_SAMPLES = 8
LARGE_BATCH = 8


# --- sessions ----------------------------------------------------------------------------------------------
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


def decode_margin(scores: np.ndarray) -> np.ndarray:
    """Per crop, the smallest gap between a point's best and second-best cell score: (N, P, H, W) -> (N,)."""
    flat = scores.reshape(scores.shape[0], scores.shape[1], -1)
    top2 = np.sort(flat, axis=2)[:, :, -2:]
    return (top2[:, :, 1] - top2[:, :, 0]).min(axis=1)


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
    stats["px"] = {k: v * size for k, v in _summary(abs_ok, "abs").items()}
    return stats


def _summary(values: np.ndarray, suffix: str) -> dict[str, float]:
    if values.size == 0:
        return {f"{k}_{suffix}": math.nan for k in ("max", "mean", "median", "p99")}
    return {
        f"max_{suffix}": float(values.max()),
        f"mean_{suffix}": float(values.mean()),
        f"median_{suffix}": float(np.median(values)),
        f"p99_{suffix}": float(np.percentile(values, 99)),
    }


def check_gate(precision: str, sets: Sequence[dict], size: int, nme: dict | None) -> list[dict]:
    """Evaluate the precision's gates; each result names the measure, the limit and whether it passed."""
    gate = PRECISIONS[precision].gate
    results = []
    gated = [s for s in sets if s["source"] in gate.sources]
    limit = gate.limit_at(size)
    for s in gated:
        stats = s["landmarks"]
        value = stats[gate.stat] * (size if gate.unit == "px" else 1.0)
        results.append({"name": f"{gate.stat} ({s['source']}, batch {s['batch']})", "value": value,
                        "limit": limit, "unit": gate.unit,
                        "passed": bool(value <= limit) and stats["nan"] == 0 and stats["inf"] == 0})
    if not gated:
        results.append({"name": f"{gate.stat} on {'/'.join(gate.sources)} inputs", "value": math.nan,
                        "limit": limit, "unit": gate.unit, "passed": False})
    for s in sets:  # NaN/Inf fail every precision on every input set
        if s["source"] not in gate.sources and (s["landmarks"]["nan"] or s["landmarks"]["inf"]):
            bad = s["landmarks"]["nan"] + s["landmarks"]["inf"]
            results.append({"name": f"NaN/Inf ({s['source']}, batch {s['batch']})", "value": bad, "limit": 0,
                            "unit": "count", "passed": False})
    results += _score_gates(precision, sets)
    if gate.nme_increase is not None and nme and nme.get("faces"):
        increase = nme["candidate"] - nme["fp32_onnx"]
        results.append({"name": "validation NME increase over fp32 ONNX", "value": increase,
                        "limit": gate.nme_increase, "unit": "NME",
                        "passed": bool(increase <= gate.nme_increase)})
    return results


def _score_gates(precision: str, sets: Sequence[dict]) -> list[dict]:
    """The score outputs (in [0, 1]): fp32 within SCORE_FP32_LIMIT everywhere; fp16/int8 `face_score` within
    SCORE_REDUCED_LIMIT on real faces (a threshold is applied to it); no NaN/Inf anywhere."""
    results = []
    for s in sets:
        for name, stats in (s.get("scores") or {}).items():
            where = f"{name} ({s['source']}, batch {s['batch']})"
            if stats["nan"] or stats["inf"]:
                results.append({"name": f"NaN/Inf {where}", "value": stats["nan"] + stats["inf"], "limit": 0,
                                "unit": "count", "passed": False})
                continue
            if precision == "fp32":
                limit = SCORE_FP32_LIMIT
            elif name == FACE_SCORE and s["source"] == REAL:
                limit = SCORE_REDUCED_LIMIT
            else:
                continue
            results.append({"name": f"max_abs {where}", "value": stats["max_abs"], "limit": limit,
                            "unit": "score", "passed": bool(stats["max_abs"] <= limit)})
    return results


def summary_line(report: dict) -> str:
    """One line for the CLI, the metadata and ParityError."""
    if not report.get("verified"):
        return f"{report['precision']}: not verified (--no-verify)"
    failed = [g for g in report["gates"] if not g["passed"]]
    real = [s["landmarks"] for s in report["sets"] if s["source"] == REAL]
    worst = max(real, key=lambda st: st["max_abs"]) if real else report["overall"]
    text = (f"{report['precision']} vs eager PyTorch fp32 on {'face crops' if real else 'noise inputs'}: "
            f"max abs {worst['max_abs']:.3g} ({worst['px']['max_abs']:.3g} px of the "
            f"{report['crop_size']} px crop)")
    if report.get("nme") and report["nme"].get("faces"):
        n = report["nme"]
        text += f", validation NME {100 * n['candidate']:.2f}% (fp32 ONNX {100 * n['fp32_onnx']:.2f}%)"
    if failed:
        reasons = "; ".join(f"{g['name']} = {g['value']:.4g} > {g['limit']:g} {g['unit']}" for g in failed)
        return f"{text}: FAILED gate: {reasons}"
    return f"{text}: passed"
