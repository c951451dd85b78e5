"""A bounded load test of `facemark serve` on loopback: `facemark bench --serve` and
`python -m facemark.benchmarks.serve_load`.

Starts the server in its own process (free loopback ports) unless --url names one, sends `requests` pipeline
requests (one encoded photo each, photos taken in turn) from `clients` concurrent threads, each with its own
HTTP connection, and stops by itself. Reports requests/s, p50/p90/p99 latency, errors and the server's peak RSS
(its whole process tree: facemark serve, tritonserver, the Python-backend stubs, the decoders), and checks that
the server's faces equal local predict's on every photo used (same model, same settings). Then the same load
again with one damaged upload (a JPEG 2000 that crashes OpenCV 4.11's decoder) every `damaged_every`
requests and one JSON request 8 MB over the limits (sent as `curl -d` sends it) every `oversized_every`: each
damaged upload must fail alone, each oversized request be refused with 413, and the server must not exit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import select
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
from facemark.runtime.defaults import DEFAULT_MAX_REQUEST_MB
from facemark.runtime.landmarker import DEFAULT_MODEL_PATH, FaceLandmarker, resolve_model_path
from facemark.runtime.serving.client import ServerError, TritonLandmarker, server_address
from facemark.runtime.serving.server import process_stats

READY_TIMEOUT_S = 240.0
DAMAGED_EVERY = 100
DAMAGED_SOURCE = DEFAULT_MODEL_PATH.parent / "samples" / "2008_002470.jpg"


def damaged_jpeg2000(photo: Path = DAMAGED_SOURCE) -> bytes:
    """A damaged JPEG 2000 made from `photo` with Pillow: a few bytes replaced (seed 34 of this recipe makes
    OpenCV 4.11's imdecode die of SIGSEGV with the shipped sample below)."""
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(photo) as image:
        image.convert("RGB").save(buffer, "JPEG2000", quality_mode="rates", quality_layers=[40])
    data = bytearray(buffer.getvalue())
    rng = np.random.default_rng(34)
    for position in rng.integers(0, len(data), int(rng.integers(1, 6))):
        data[position] = int(rng.integers(0, 256))
    return bytes(data)


INFER_PATH = "/v2/models/facemark/infer"
OVERSIZED_EVERY = 50
FORM_TYPE = "application/x-www-form-urlencoded"  # what `curl -d` sends


def json_request_body(text: str) -> bytes:
    """A KServe v2 JSON request of model `facemark` whose one image is `text`."""
    return json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}).encode()


def oversized_json_body(limit_mb: float = DEFAULT_MAX_REQUEST_MB) -> bytes:
    """A JSON request 8 MB over the server's --max-request-mb (+1 MB for its header): the guard's 413."""
    return json_request_body("A" * int((limit_mb + 9) * 1e6))


def post_status(port: int, body: bytes, headers: dict[str, str], path: str = INFER_PATH,
                timeout_s: float = 60.0) -> int:
    """POST `body` on a connection of its own to 127.0.0.1:port, the way curl does: the head, then the body in
    slices, stopping as soon as the server answers early (a refusal). The reply's status; 0: none came."""
    fields = {"Host": "127.0.0.1", "Content-Length": str(len(body)), **headers, "Connection": "close"}
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields.items()) + "\r\n"
    reply = b""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as peer:
        peer.sendall(head.encode())
        for offset in range(0, len(body), 1 << 20):
            if select.select([peer], [], [], 0)[0]:
                break  # answered before the whole body: refused
            peer.sendall(body[offset : offset + (1 << 20)])
        while b"\r\n" not in reply:
            chunk = peer.recv(4096)
            if not chunk:
                break
            reply += chunk
    parts = reply.split(b" ", 2)
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for child, fields in process_stats():
        children.setdefault(int(fields[1]), []).append(child)
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants together."""
    total = 0
    for member in process_tree(pid):
        try:
            total += os.sysconf("SC_PAGE_SIZE") * int(Path(f"/proc/{member}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total


class PeakRss:
    """Samples tree_rss_bytes(pid) on a thread while in use; `peak_mb` the largest sample."""

    def __init__(self, pid: int | None, period_s: float = 0.25) -> None:
        self.pid, self.period_s, self.peak = pid, period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.pid is not None:
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            if self._stop.wait(self.period_s):
                return

    @property
    def peak_mb(self) -> float | None:
        return round(self.peak / 2**20, 1) if self.pid is not None else None

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class ServerProcess:
    """`facemark serve` in a child process on free loopback ports (or `ports`: http, grpc, metrics); ready once
    it prints {"ready": true, ...} (the constructor waits for that unless `wait=False`: then `wait_ready()`).
    `new_session`: the server leads its own process group, as under systemd or a shell's job control."""

    def __init__(self, args: Sequence[str] = (), log: Path | None = None,
                 ports: Sequence[int] | None = None, wait: bool = True, new_session: bool = False) -> None:
        self.http, self.grpc, self.metrics = ports or free_ports(3)
        command = [sys.executable, "-m", "facemark", "serve", "--http-port", str(self.http), "--grpc-port",
                   str(self.grpc), "--metrics-port", str(self.metrics), *args]
        self.log = log
        stderr = log.open("wb") if log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                     start_new_session=new_session)
        self.ready: dict | None = None
        self.stdout_lines: list[str] = []
        self._reader = threading.Thread(target=self._read_ready, daemon=True)
        self._reader.start()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while self.ready is None and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.ready is None:
            self.stop()
            tail = self.log.read_text(errors="replace")[-2000:] if self.log is not None else "(no log kept)"
            raise ServerError(f"facemark serve did not become ready in {timeout_s:.0f} s: {tail}")
        return self.ready

    def _read_ready(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.stdout_lines.append(line)
            if line.startswith("{") and self.ready is None:
                self.ready = json.loads(line)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM (the server drains and stops Triton), then wait; the exit code. One that does not stop in
        `timeout_s` is killed with its whole process tree."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            for pid in reversed(process_tree(self.proc.pid)):
                with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                    os.kill(pid, signal.SIGKILL)
            return self.proc.wait()

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
    damaged: int = 0  # damaged uploads sent (each must come back as that image's error)
    peak_rss_mb: float | None = None
    oversized: int = 0  # oversized JSON requests sent (each must be refused with 413, the server staying up)
    oversized_refused: int = 0

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms or [np.nan])
        return {"requests": self.requests, "clients": self.clients, "seconds": round(self.seconds, 2),
                "requests_per_s": round(self.requests / self.seconds, 2) if self.seconds else None,
                "p50_ms": round(float(np.percentile(lat, 50)), 2), "p90_ms": round(float(np.percentile(lat, 90)), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2), "errors": self.errors,
                "first_error": self.first_error, "photos": self.photos,
                "max_landmark_diff_px": self.max_landmark_diff_px,
                "face_count_mismatches": self.face_count_mismatches, "damaged": self.damaged,
                "oversized": self.oversized, "oversized_refused": self.oversized_refused,
                "peak_rss_mb": self.peak_rss_mb}


def _photo(path: Path) -> tuple[bytes, tuple[int, int], np.ndarray]:
    data = path.read_bytes()
    image = decode_image(data, path)
    return data, (image.shape[1], image.shape[0]), image


def run_load(url: str, photos: Sequence[Path], requests: int = 1000, clients: int = 8,
             model: Path | None = None, damaged_every: int = 0, server_pid: int | None = None,
             oversized_every: int = 0) -> LoadResult:
    """`requests` single-photo requests from `clients` threads against `url`; then the identity check. With
    `damaged_every`, every such request sends a damaged JPEG 2000 instead, whose only right answer is an error
    for that image (anything else counts as an error). With `oversized_every`, every such request is a JSON
    request over the server's limits sent as `curl -d` sends it, whose only right answer is 413 (anything else
    counts as an error; not in the latencies). `server_pid`: whose process tree's peak RSS to report."""
    loaded = [_photo(p) for p in photos]
    damaged = damaged_jpeg2000() if damaged_every else b""
    oversized = oversized_json_body() if oversized_every else b""
    port = int(server_address(url).rsplit(":", 1)[1])
    refused = [0]
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
            broken = damaged_every > 0 and (index + 1) % damaged_every == 0
            if oversized_every > 0 and (index + 1) % oversized_every == 0:
                status = post_status(port, oversized, {"Content-Type": FORM_TYPE})
                with lock:
                    if status == 413:
                        refused[0] += 1
                    else:
                        errors.append(f"request {index}: an oversized JSON request got {status or 'no reply'}, "
                                      "not 413")
                continue
            start = time.perf_counter()
            try:
                faces, error = own.detect_encoded([damaged if broken else data], [size])[0]
            except ServerError as exc:
                with lock:
                    errors.append(str(exc))
                continue
            latencies[slot].append((time.perf_counter() - start) * 1e3)
            if broken:
                if not error:
                    with lock:
                        errors.append(f"request {index}: a damaged upload came back without an error")
            elif error:
                with lock:
                    errors.append(error)
            elif index < len(loaded):
                answers[index] = faces

    threads = [threading.Thread(target=client, args=(slot,)) for slot in range(clients)]
    with PeakRss(server_pid) as rss:
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    diff, mismatches = _compare_with_local(loaded, answers, model)
    return LoadResult(requests, clients, seconds, [v for slot in latencies for v in slot], len(errors),
                      errors[0] if errors else None, diff, mismatches, len(loaded),
                      requests // damaged_every if damaged_every else 0, rss.peak_mb,
                      requests // oversized_every if oversized_every else 0, refused[0])


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
                    log: Path | None = None, damaged_every: int = DAMAGED_EVERY,
                    oversized_every: int = OVERSIZED_EVERY) -> dict:
    """The `serve` section of a bench report: a server of its own (or `url`), the load and the identity check,
    then (`damaged_every` or `oversized_every` > 0) the same load with damaged uploads and oversized JSON
    requests mixed in, in "damaged", and whether the server exited meanwhile ("server_exits", 0 or 1: nothing
    restarts it here)."""
    args = ["--max-batch-size", str(max_batch), "--instances", str(instances)]
    if model is not None:
        args += ["--model", str(model)]
    hostile = damaged_every > 0 or oversized_every > 0
    if url is not None:
        result = run_load(url, photos, requests, clients, model)
        damaged = (run_load(url, photos, requests, clients, model, damaged_every, oversized_every=oversized_every)
                   if hostile else None)
        return {**result.summary(), "damaged": damaged and damaged.summary(), "server": url, "max_batch": None,
                "instances": None, "server_exits": None}
    with ServerProcess(args, log) as server:
        result = run_load(server.url, photos, requests, clients, model, server_pid=server.proc.pid)
        damaged = (run_load(server.url, photos, requests, clients, model, damaged_every, server.proc.pid,
                            oversized_every) if hostile else None)
        exits = int(server.proc.poll() is not None)
    return {**result.summary(), "damaged": damaged and damaged.summary(),
            "server": "facemark serve " + " ".join(args), "max_batch": max_batch, "instances": instances,
            "server_exits": exits}


def main(argv: Sequence[str] | None = None) -> int:
    from facemark.runtime.predict.inputs import collect_inputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="+", help="Image files or folders (the requests take them in turn).")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--url", default=None, help="A running server (default: start one).")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch-size", dest="max_batch", type=int, default=16)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--damaged-every", type=int, default=DAMAGED_EVERY,
                        help="The second load sends a damaged upload every N requests (0: none).")
    parser.add_argument("--oversized-every", type=int, default=OVERSIZED_EVERY,
                        help="The second load sends a JSON request over the limits every N requests (0: none; "
                        "with --damaged-every 0 too: no second load).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    files, failures = collect_inputs(args.photos)
    for failure in failures:
        print(f"error: {failure.error}", file=sys.stderr)
    summary = serve_benchmark(args.model, files, args.requests, args.clients, args.max_batch, args.instances,
                              args.url, damaged_every=args.damaged_every, oversized_every=args.oversized_every)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json is not None:
        from facemark.fileio import write_text_atomic

        write_text_atomic(args.json, text + "\n")
    damaged = summary["damaged"] or {}
    failed = summary["errors"] or summary["face_count_mismatches"] or damaged.get("errors") or summary["server_exits"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
