"""Why the timing harness isolates variants: an ONNX model timed alone vs call by call interleaved with eager
PyTorch in one process (what the old harness did), with ONNX Runtime's threads spinning and not.

    python -m facemark.benchmarks.studies.interference CHECKPOINT.pt MODEL.onnx [--threads 2] [--calls 300]

Prints JSON: per spin setting, the median ms per call of the model alone, interleaved with an eager forward pass
before every call, and alone again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import typer

from facemark.benchmarks.model_speed import sample_inputs
from facemark.benchmarks.variants import EagerVariant
from facemark.runtime.session import LandmarkModel
from facemark.train.checkpoint import load_model


def _median_ms(call: Callable[[], object], calls: int, between: Callable[[], object] | None = None) -> float:
    for _ in range(10):
        if between:
            between()
        call()
    times = []
    for _ in range(calls):
        if between:
            between()
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def measure(checkpoint: Path, model: Path, threads: int = 2, calls: int = 300) -> dict:
    torch.set_num_threads(threads)
    net, contract, _ = load_model(checkpoint)
    eager = EagerVariant(net, contract, checkpoint)
    x = sample_inputs(model)[:1]
    result = {}
    for spin in (True, False):
        session = LandmarkModel(model, provider="cpu", threads=threads, spin=spin)
        run = lambda session=session: session.predict(x)  # noqa: E731
        result[f"spin={spin}"] = {"alone_before": _median_ms(run, calls),
                                  "interleaved_with_eager": _median_ms(run, calls // 2, lambda: eager.predict(x)),
                                  "alone_after": _median_ms(run, calls)}
    return result


def main(checkpoint: Path = typer.Argument(...), model: Path = typer.Argument(...),
         threads: int = typer.Option(2, "--threads"), calls: int = typer.Option(300, "--calls")) -> None:
    print(json.dumps(measure(checkpoint, model, threads, calls), indent=1))


if __name__ == "__main__":
    typer.run(main)
