"""A bounded load test of `facemark serve` on loopback: `facemark bench --serve` and
`python -m facemark.benchmarks.serve_load`.

Starts the server in its own process (free loopback ports) unless --url names one, sends `requests` pipeline
requests (one encoded photo each, photos taken in turn) from `clients` concurrent threads, each with its own
HTTP connection, and stops by itself. Reports requests/s, p50/p90/p99 latency and errors, and checks that
the server's faces equal local predict's on every photo used (same model, same settings).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facemark.imageio import decode_image
from facemark.runtime.landmarker import FaceLandmarker, resolve_model_path
from facemark.runtime.remote import ServerError, TritonLandmarker

READY_TIMEOUT_S = 240.0


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class ServerProcess:
    """`facemark serve` in a child process on free loopback ports; ready once it prints {"ready": true, ...}."""

    def __init__(self, args: Sequence[str] = (), log: Path | None = None) -> None:
        self.http, self.grpc, self.metrics = free_ports(3)
        command = [sys.executable, "-m", "facemark", "serve", "--http-port", str(self.http), "--grpc-port",
                   str(self.grpc), "--metrics-port", str(self.metrics), *args]
        self.log = log
        stderr = log.open("wb") if log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.ready: dict | None = None
        reader = threading.Thread(target=self._read_ready, daemon=True)
        reader.start()
        reader.join(READY_TIMEOUT_S)
        if self.ready is None:
            self.stop()
            tail = log.read_text(errors="replace")[-2000:] if log is not None else "(no log kept)"
            raise ServerError(f"facemark serve did not become ready in {READY_TIMEOUT_S:.0f} s: {tail}")

    def _read_ready(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith("{"):
                self.ready = json.loads(line)
                return

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def stop(self) -> int:
        """SIGTERM (the server drains and stops Triton), then wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class LoadResult:
    requests: int
    clients: int
    seconds: float
    latencies_ms: list[float]
    errors: int
    first_error: str | None
    max_landmark_diff_px: float | None  # server vs local predict over every photo used
    face_count_mismatches: int
    photos: int

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms or [np.nan])
        return {"requests": self.requests, "clients": self.clients, "seconds": round(self.seconds, 2),
                "requests_per_s": round(self.requests / self.seconds, 2) if self.seconds else None,
                "p50_ms": round(float(np.percentile(lat, 50)), 2), "p90_ms": round(float(np.percentile(lat, 90)), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2), "errors": self.errors,
                "first_error": self.first_error, "photos": self.photos,
                "max_landmark_diff_px": self.max_landmark_diff_px,
                "face_count_mismatches": self.face_count_mismatches}


def _photo(path: Path) -> tuple[bytes, tuple[int, int], np.ndarray]:
    data = path.read_bytes()
    image = decode_image(data, path)
    return data, (image.shape[1], image.shape[0]), image


def run_load(url: str, photos: Sequence[Path], requests: int = 1000, clients: int = 8,
             model: Path | None = None) -> LoadResult:
    """`requests` single-photo requests from `clients` threads against `url`; then the identity check."""
    loaded = [_photo(p) for p in photos]
    remote = TritonLandmarker(url)
    for data, size, _ in loaded[:clients]:  # warm-up: sessions and connections
        remote.detect_encoded([data], [size])
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    answers: dict[int, list] = {}
    lock = threading.Lock()
    counter = iter(range(requests))

    def client(slot: int) -> None:
        own = TritonLandmarker(url)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            data, size, _ = loaded[index % len(loaded)]
            start = time.perf_counter()
            try:
                faces, error = own.detect_encoded([data], [size])[0]
            except ServerError as exc:
                with lock:
                    errors.append(str(exc))
                continue
            latencies[slot].append((time.perf_counter() - start) * 1e3)
            if error:
                with lock:
                    errors.append(error)
            elif index < len(loaded):
                answers[index] = faces

    threads = [threading.Thread(target=client, args=(slot,)) for slot in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    diff, mismatches = _compare_with_local(loaded, answers, model)
    return LoadResult(requests, clients, seconds, [v for slot in latencies for v in slot], len(errors),
                      errors[0] if errors else None, diff, mismatches, len(loaded))


def _compare_with_local(loaded, answers: dict[int, list], model: Path | None) -> tuple[float | None, int]:
    """Largest landmark difference (px) between the server's faces and local FaceLandmarker.detect_full's."""
    local = FaceLandmarker(resolve_model_path(model))
    worst, mismatches = 0.0, 0
    for index, faces in answers.items():
        mine = local.detect_full(loaded[index][2]).faces
        if len(mine) != len(faces):
            mismatches += 1
            continue
        for a, b in zip(mine, faces, strict=True):
            worst = max(worst, float(np.abs(a.landmarks - b.landmarks).max()))
    return (worst if answers else None), mismatches


def serve_benchmark(model: Path | None, photos: Sequence[Path], requests: int = 1000, clients: int = 8,
                    max_batch: int = 16, instances: int = 1, url: str | None = None,
                    log: Path | None = None) -> dict:
    """The `serve` section of a bench report: a server of its own (or `url`), the load, the identity check."""
    args = ["--max-batch", str(max_batch), "--instances", str(instances)]
    if model is not None:
        args += ["--model", str(model)]
    if url is not None:
        result = run_load(url, photos, requests, clients, model)
        return {**result.summary(), "server": url, "max_batch": None, "instances": None}
    with ServerProcess(args, log) as server:
        result = run_load(server.url, photos, requests, clients, model)
    return {**result.summary(), "server": "facemark serve " + " ".join(args), "max_batch": max_batch,
            "instances": instances}


def main(argv: Sequence[str] | None = None) -> int:
    from facemark.runtime.predict import collect_inputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="+", help="Image files or folders (the requests take them in turn).")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--url", default=None, help="A running server (default: start one).")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    files, failures = collect_inputs(args.photos)
    for failure in failures:
        print(f"error: {failure.error}", file=sys.stderr)
    summary = serve_benchmark(args.model, files, args.requests, args.clients, args.max_batch, args.instances,
                              args.url)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json is not None:
        from facemark.fileio import write_text_atomic

        write_text_atomic(args.json, text + "\n")
    return 1 if summary["errors"] or summary["face_count_mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
