"""Milliseconds per face of several ONNX models at batch 1, timed side by side in one run.

    python -m facemark.benchmarks.model_speed MODEL.onnx [MODEL.onnx ...] [--threads 1,2] [--rounds 15]

Each model gets its own ONNX Runtime session with an explicit thread budget (intra-op = --threads, inter-op 1,
no spinning after a call, so sessions do not steal cores from each other). Fairness against drifting machine
load comes from alternating blocks: every round runs a block of calls of each model in turn; the figure is the
median over rounds of each block's median. Inputs are the bundled sample faces through each model's own crop
contract. The ratio column compares every model with the first one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import typer

from facemark.contract import box_from_landmarks
from facemark.data import load_records
from facemark.imageio import read_gray
from facemark.metadata import INPUT_NAME, parse_metadata

SAMPLES_XML = Path(__file__).resolve().parents[1] / "facemark" / "assets" / "samples" / "landmarks.xml"


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sample_inputs(sess: ort.InferenceSession, source: str) -> np.ndarray:
    contract = parse_metadata(sess.get_modelmeta().custom_metadata_map, source).contract
    records = load_records([SAMPLES_XML], lambda _m: None)
    crops = [contract.prepare(read_gray(r.image_path), [box_from_landmarks(r.landmarks)])[0] for r in records]
    return np.concatenate(crops).astype(np.float32)


def time_models(models: list[Path], threads: list[int], rounds: int = 15, block: int = 20) -> list[dict]:
    """Median ms per face at batch 1 of each model at each thread count (module docstring for the method)."""
    rows = []
    for n in threads:
        sessions = [session(m, n) for m in models]
        inputs = [sample_inputs(s, str(m)) for s, m in zip(sessions, models, strict=True)]
        per_round: list[list[float]] = [[] for _ in models]
        for r in range(rounds + 1):
            for k, (sess, x) in enumerate(zip(sessions, inputs, strict=True)):
                times = []
                for i in range(block):
                    face = x[i % len(x)][None]
                    t0 = time.perf_counter()
                    sess.run(None, {INPUT_NAME: face})
                    times.append((time.perf_counter() - t0) * 1e3)
                if r:  # round 0 is the warm-up
                    per_round[k].append(float(np.median(times)))
        base = float(np.median(per_round[0]))
        for m, samples in zip(models, per_round, strict=True):
            med = float(np.median(samples))
            rows.append({"model": str(m), "threads": n, "ms_per_face": round(med, 3),
                         "min": round(float(np.min(samples)), 3), "p90": round(float(np.percentile(samples, 90)), 3),
                         "rounds": rounds, "block": block, "ratio_to_first": round(med / base, 3)})
    return rows


def main(models: list[Path] = typer.Argument(...), threads: str = typer.Option("1,2", "--threads"),
         rounds: int = typer.Option(15, "--rounds"), block: int = typer.Option(20, "--block"),
         json_path: Path | None = typer.Option(None, "--json")) -> None:
    rows = time_models(models, [int(t) for t in threads.split(",")], rounds, block)
    for row in rows:
        print(json.dumps(row), flush=True)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    typer.run(main)
