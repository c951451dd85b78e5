"""Milliseconds per face of several ONNX models at batch 1, timed side by side in one run.

    python -m facemark.benchmarks.model_speed MODEL.onnx [MODEL.onnx ...] [--threads 1,2] [--rounds 15]

Each (model, thread count) runs in a worker process of its own with an explicit thread budget (intra-op =
--threads, inter-op 1, no spinning), and fairness against drifting machine load comes from alternating blocks
of calls between the workers (facemark.benchmarks.isolated); the figure is the median over every timed call.
Inputs are the bundled sample faces through each model's own crop contract. The ratio column compares every
model with the first one at the same thread count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import typer

from facemark.benchmarks.isolated import ORT, Payload, WorkerSpec, time_isolated
from facemark.contract import box_from_landmarks
from facemark.data import load_records
from facemark.imageio import read_gray
from facemark.metadata import parse_metadata

SAMPLES_XML = Path(__file__).resolve().parents[1] / "facemark" / "assets" / "samples" / "landmarks.xml"


def sample_inputs(path: Path) -> np.ndarray:
    """The bundled sample faces as crops of the model's own contract (N, 1, S, S)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    contract = parse_metadata(sess.get_modelmeta().custom_metadata_map, str(path)).contract
    records = load_records([SAMPLES_XML], lambda _m: None)
    crops = [contract.prepare(read_gray(r.image_path), [box_from_landmarks(r.landmarks)])[0] for r in records]
    return np.concatenate(crops).astype(np.float32)


def model_key(path: Path, threads: int) -> str:
    return f"{path}@{threads}t"


def time_models(models: list[Path], threads: list[int], rounds: int = 15, block: int = 20) -> list[dict]:
    """Per-call ms at batch 1 of each model at each thread count, every (model, threads) in a worker process
    of its own, blocks alternating between them (facemark.benchmarks.isolated). Models of different crop sizes
    each get their own crops (the payload is per size)."""
    by_size: dict[int, list[Path]] = {}
    crops: dict[int, np.ndarray] = {}
    for m in models:
        x = sample_inputs(m)
        by_size.setdefault(x.shape[-1], []).append(m)
        crops[x.shape[-1]] = x
    results = {}
    for size, group in by_size.items():
        specs = [WorkerSpec(model_key(m, n), ORT, str(m), n) for n in threads for m in group]
        timed = time_isolated(specs, Payload(crops=crops[size]), rounds=rounds, block=block)
        if timed.errors:
            raise RuntimeError("; ".join(f"{k}: {v}" for k, v in timed.errors.items()))
        results.update({key: (stats, timed.pids[key]) for (key, _), stats in timed.stats.items()})
    rows = []
    for n in threads:
        base = results[model_key(models[0], n)][0].median_ms
        for m in models:
            stats, pid = results[model_key(m, n)]
            rows.append({"model": str(m), "threads": n, "ms_per_face": round(stats.median_ms, 3),
                         "min": round(stats.min_ms, 3), "p90": round(stats.p90_ms, 3), "p99": round(stats.p99_ms, 3),
                         "samples": stats.repeats,
                         "rounds": rounds, "block": block, "worker_pid": pid,
                         "ratio_to_first": round(stats.median_ms / base, 3)})
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
