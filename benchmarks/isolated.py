"""Timing in isolation: every variant in a worker process of its own, thread pools set explicitly, alternating
blocks of calls between workers.

Why: in one process, PyTorch's OpenMP threads and ONNX Runtime's intra-op threads spin-wait after each call
and steal the cores from each other (the int8 model measured 2.1 ms alone and 4.5 ms interleaved call by call
with eager PyTorch). Here each worker owns its pools: ONNX Runtime intra-op = threads, inter-op = 1, no
spinning; torch.set_num_threads(threads) with one inter-op thread; OpenCV's pool = threads. Only one worker runs
at a time: the parent sends it a block of calls and waits; the others sleep on their pipes. OpenMP keeps its
default wait policy, as users run torch: told to sleep at once (OMP_WAIT_POLICY=PASSIVE) eager fp32 on 2 threads
took 34 ms per face instead of 19 here, every layer paying a wake-up; the short spin of an idle worker after its
block falls in the next worker's untimed settle calls. Blocks alternate between workers round by round (the
order rotates), so a drift of the machine's load spreads over every variant alike. Warm-up blocks are not
counted, nor are the first calls of every block (`settle`: a worker resuming after another's block finds its
caches cold and its threads asleep). The statistics are over every timed call: min, median, p90, p99, samples.

A worker is described by a picklable WorkerSpec; workers start with the `spawn` method, so nothing of the
parent's thread pools is inherited. `plain_loop` times one spec alone, call after call, in a fresh worker:
the self-check of a report (facemark.benchmarks.selfcheck).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from facemark.benchmarks.timing import TimingStats

ORT, TORCH, DLIB, DLIB_HOG = "ort", "torch", "dlib", "dlib-hog"


@dataclass(frozen=True)
class WorkerSpec:
    key: str  # the row key, unique within a run
    kind: str  # ort | torch | dlib (predictor on given boxes) | dlib-hog (HOG detector + predictor per photo)
    path: str  # ONNX model, checkpoint, or dlib's predictor file
    threads: int
    provider: str = "cpu"  # ort: cpu | cuda | tensorrt; torch: cpu | cuda
    autocast: bool = False  # torch: bf16 (CPU) / fp16 (CUDA) autocast
    calibration: str | None = None  # dlib: BoxCalibration JSON (landmark box -> dlib's box convention)


@dataclass(frozen=True)
class Payload:
    """What the calls run on: crops (N, 1, S, S) for models; (gray image, landmark box) pairs for dlib."""

    crops: np.ndarray | None = None
    faces: tuple = ()  # ((gray, box), ...)


def _configure_threads(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    import cv2

    cv2.setNumThreads(threads)


def _build_call(spec: WorkerSpec, payload: Payload):
    """A callable taking the batch size (models) or nothing but a counter (dlib); runs one timed call."""
    if spec.kind == ORT:
        from facemark.runtime.session import LandmarkModel

        model = LandmarkModel(spec.path, provider=spec.provider, threads=spec.threads, spin=False)
        return lambda batch: model.predict(payload.crops[:batch])
    if spec.kind == TORCH:
        import torch

        torch.set_num_threads(spec.threads)
        torch.set_num_interop_threads(1)
        from facemark.benchmarks.variants import EagerVariant
        from facemark.train.checkpoint import load_model

        model, contract, _ = load_model(spec.path)
        variant = EagerVariant(model, contract, spec.path, device=spec.provider, autocast=spec.autocast)
        return lambda batch: variant.predict(payload.crops[:batch])
    if spec.kind in (DLIB, DLIB_HOG):
        from facemark.benchmarks.peer import DlibPeer, find_dlib_predictor
        from facemark.contract import BoxCalibration

        found = find_dlib_predictor()
        if isinstance(found, str):
            raise RuntimeError(found)
        dlib, path = found
        peer = DlibPeer(dlib, path, BoxCalibration.from_json(spec.calibration) if spec.calibration else
                        BoxCalibration())
        counter = iter(range(1 << 62))
        if spec.kind == DLIB:
            def call(_batch):
                gray, box = payload.faces[next(counter) % len(payload.faces)]
                return peer.predict(gray, box)
            return call
        detector = dlib.get_frontal_face_detector()

        def detect_and_predict(_batch):
            gray, _box = payload.faces[next(counter) % len(payload.faces)]
            return [peer.predictor(gray, rect) for rect in detector(gray, 0)]
        return detect_and_predict
    raise ValueError(f"unknown worker kind {spec.kind!r}")


def _worker_main(spec: WorkerSpec, payload: Payload, conn) -> None:
    """In the child: configure, build, answer ("block", batch, count) with per-call ms until None."""
    try:
        _configure_threads(spec.threads)
        call = _build_call(spec, payload)
        call(1)  # first call: lazy initialisation, not timed
    except Exception as exc:  # reported to the parent as the row's reason
        conn.send(("error", f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        message = conn.recv()
        if message is None:
            return
        _, batch, count, settle = message
        for _ in range(settle):  # untimed: the caches and threads this worker had before the others' blocks
            call(batch)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            call(batch)
            times.append((time.perf_counter() - t0) * 1e3)
        conn.send(("times", times))


class Worker:
    def __init__(self, spec: WorkerSpec, payload: Payload, context) -> None:
        self.spec = spec
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(spec, payload, child), daemon=True,
                                       name=f"facemark-bench-{spec.key}")
        self.process.start()
        child.close()
        kind, value = self.conn.recv()
        self.error: str | None = value if kind == "error" else None
        self.pid: int | None = value if kind == "ready" else None

    def block(self, batch: int, count: int, settle: int = 0) -> list[float]:
        self.conn.send(("block", batch, count, settle))
        kind, times = self.conn.recv()
        return times

    def close(self) -> None:
        if self.process.is_alive() and self.error is None:
            self.conn.send(None)
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


@dataclass
class IsolatedResult:
    stats: dict[tuple[str, int], TimingStats]  # (key, batch) -> per-call statistics
    errors: dict[str, str]  # key -> why the worker could not run
    pids: dict[str, int]  # key -> the worker's process id (the isolation is observable)


def time_isolated(specs: Sequence[WorkerSpec], payload: Payload, batch_sizes: Sequence[int] = (1,),
                  rounds: int = 10, block: int = 20, warmup_blocks: int = 1,
                  time_budget_s: float | None = None, settle: int = 5) -> IsolatedResult:
    """Per-call statistics of every spec at every batch size (module docstring for the method). dlib specs
    run at batch 1 only. With `time_budget_s` (per batch size) rounds stop early, keeping at least 3. Each block
    starts with `settle` untimed calls: the worker's caches and sleeping threads recover from the other workers'
    blocks (without them the harness read 24 % above a plain loop on this 2-core machine)."""
    context = mp.get_context("spawn")
    workers = [Worker(spec, payload, context) for spec in specs]
    errors = {w.spec.key: w.error for w in workers if w.error}
    live = [w for w in workers if w.error is None]
    stats: dict[tuple[str, int], TimingStats] = {}
    try:
        for batch in batch_sizes:
            active = [w for w in live if batch == 1 or w.spec.kind in (ORT, TORCH)]
            samples: dict[str, list[float]] = {w.spec.key: [] for w in active}
            for w in active:
                for _ in range(warmup_blocks):
                    w.block(batch, block)
            started = time.perf_counter()
            for r in range(max(rounds, 1)):
                shift = r % len(active) if active else 0
                for w in active[shift:] + active[:shift]:
                    samples[w.spec.key] += w.block(batch, block, settle)
                if time_budget_s is not None and r >= 2 and time.perf_counter() - started > time_budget_s:
                    break
            stats.update({(key, batch): TimingStats.from_samples(s) for key, s in samples.items()})
    finally:
        for w in workers:
            w.close()
    return IsolatedResult(stats, errors, {w.spec.key: w.pid for w in live if w.pid is not None})


def plain_loop(spec: WorkerSpec, payload: Payload, batch: int = 1, calls: int = 200) -> TimingStats:
    """One spec alone in a fresh worker, `calls` calls back to back after one warm-up block."""
    context = mp.get_context("spawn")
    worker = Worker(spec, payload, context)
    try:
        if worker.error:
            raise RuntimeError(f"{spec.key}: {worker.error}")
        worker.block(batch, min(calls, 20))
        return TimingStats.from_samples(worker.block(batch, calls))
    finally:
        worker.close()


SELF_CHECK_TOLERANCE = 0.10


def self_check(spec: WorkerSpec, payload: Payload, harness_ms: float, label: str, calls: int = 200) -> dict:
    """Does the harness's median for `spec` (batch 1) agree within 10 % with a plain loop run alone at the end?"""
    plain = plain_loop(spec, payload, 1, calls)
    diff = (harness_ms - plain.median_ms) / plain.median_ms
    return {"variant": label, "threads": spec.threads, "harness_ms": harness_ms, "plain_ms": plain.median_ms,
            "plain_calls": plain.repeats, "diff": diff, "agrees": abs(diff) <= SELF_CHECK_TOLERANCE}


def self_check_line(check: dict | None) -> str:
    if not check:
        return "Self-check: not run."
    verdict = ("agrees within 10 %" if check["agrees"] else
               "SELF-CHECK FAILED: the harness and a plain loop disagree by more than 10 %; do not trust the ratios")
    return (f"Self-check: {check['variant']} ({check['threads']} thread(s), batch 1) median {check['harness_ms']:.3f} "
            f"ms in the harness vs {check['plain_ms']:.3f} ms in a plain loop of {check['plain_calls']} calls run "
            f"alone at the end ({100 * check['diff']:+.1f} %): {verdict}.")
