"""`facemark serve`: facemark behind NVIDIA Triton Inference Server, through PyTriton (extra `facemark[serve]`).

PyTriton starts the real `tritonserver` binary its wheel carries (KServe v2 HTTP and gRPC, dynamic batching,
Prometheus metrics) with Triton's Python backend forwarding each batch to the callables bound here, which run
the torch-free pipeline of this package. The models and tensors are facemark.runtime.serving.protocol's.

Dynamic batching: Triton gathers the requests that arrive within `queue_delay_us` (up to `max_batch` images)
into one call; the pipeline model then runs Haar on a thread pool and the landmark model once over the faces of
every image of those requests (FaceLandmarker.detect_many), so concurrent clients share one model call.

Behind a load balancer (docs/SERVING.md):
- Readiness: the model repository is written before tritonserver starts and every model is loaded at its
  start-up, and this process opens the public HTTP and gRPC ports (the guards') only after that. So
  `/v2/health/ready` (and gRPC ServerReady) refuses connections until every facemark model answers, then says
  200 until shutdown begins.
- Drain: SIGTERM (or SIGINT) makes Triton close its ports to new connections and finish the requests in flight
  within `grace_s`; then the process exits 0 (1 and how many, when some could not be answered in time). The
  signal may reach every process of the server at once (`kill -TERM -- -PGID`, systemd's KillMode=control-group):
  tritonserver and everything it starts run in a process group of their own with SIGTERM blocked, tensors
  travel over PyTriton's sockets (its shared-memory helper process per stub died of SIGTERM, failing the requests
  in flight), the decoders ignore it, and only this process acts on it: it stops tritonserver with SIGINT after
  the drain, then kills what tritonserver left of its group.
- Limits: an HTTP body over --max-request-mb (+1 MB of JSON header) is refused with 413 from its head by the
  guard in front of Triton's HTTP endpoint (facemark.runtime.serving.guard, which says why), a gRPC message over
  it with RESOURCE_EXHAUSTED from its announced length by the one in front of Triton's gRPC endpoint
  (facemark.runtime.serving.grpc_guard); Triton listens on private loopback ports behind them; a request over
  `ServeLimits` is refused (every image of it gets the reason) before any decoding; uploads are decoded in
  worker processes (facemark.runtime.decode_pool), so a decoder crash costs one image.
- Logs: Triton's log goes to a file; its warnings and errors are forwarded one line each (all of it with
  `verbose`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facemark.errors import FacemarkError, ImageError
from facemark.imageio import probe_size
from facemark.runtime import defaults
from facemark.runtime.decode_pool import DecoderPool
from facemark.runtime.landmarker import Detections, FaceLandmarker
from facemark.runtime.options import RuntimeOptions
from facemark.runtime.serving.grpc_guard import GrpcGuard
from facemark.runtime.serving.guard import (
    HttpGuard,
    LoopbackGuard,
    connection_limit,
    raise_open_files_limit,
    request_limit_bytes,
)
from facemark.runtime.serving.protocol import (
    CROPS_MODEL,
    ERROR,
    FACE_COUNT,
    FACE_OUTPUTS,
    IMAGE_INPUT,
    INFO_INPUT,
    INFO_MODEL,
    INFO_OUTPUT,
    OPTIONAL_FIELDS,
    PIPELINE_MODEL,
    PRESENT,
    info_json,
    pack_detections,
    serve_extra,
)

LOGGER = logging.getLogger("facemark.serve")
DEFAULT_MAX_BATCH = 16
DEFAULT_QUEUE_DELAY_US = 2000  # how long Triton holds a request for others to batch with it
NO_TENSOR_STORE = "PYTRITON_NO_TENSORSTORE"
LEFTOVER_WAIT_S = 3.0  # for tritonserver's processes to end by themselves after it has exited


class ServeError(FacemarkError):
    """`facemark serve` cannot start: a port in use, Triton failing to come up."""


@dataclass(frozen=True)
class ServeLimits:
    """What one request of model `facemark` may hold (defaults: facemark.runtime.defaults)."""

    max_request_mb: float = defaults.DEFAULT_MAX_REQUEST_MB
    max_images: int = defaults.DEFAULT_MAX_IMAGES
    max_megapixels: float = defaults.DEFAULT_MAX_MEGAPIXELS

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)

    def refusal(self, files: Sequence[bytes]) -> str | None:
        """Why a request is refused, from its sizes and image headers alone (nothing decoded); None: accepted.
        An image whose header cannot be read counts 0 pixels here and fails on its own when decoded."""
        if len(files) > self.max_images:
            return f"request refused: {len(files)} images, the limit is {self.max_images} per request (--max-images)"
        size = sum(len(f) for f in files)
        if size > self.max_request_mb * 1e6:
            return (f"request refused: {size / 1e6:.1f} MB of images, the limit is {self.max_request_mb:g} MB per "
                    "request (--max-request-mb)")
        pixels = 0
        for data in files:
            try:
                width, height = probe_size(io.BytesIO(data))
            except ImageError:
                continue
            pixels += width * height
        if pixels > self.max_pixels:
            return (f"request refused: {pixels / 1e6:.1f} megapixels decoded, the limit is {self.max_megapixels:g} "
                    "per request (--max-megapixels)")
        return None


@dataclass(frozen=True)
class ServeConfig:
    model: Path | None = None  # default: the shipped model
    provider: str = "auto"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = DEFAULT_MAX_BATCH
    instances: int = 1
    threads: int | None = None  # ONNX Runtime threads per instance (default: the cores shared among instances)
    options: RuntimeOptions = RuntimeOptions()  # detector and pipeline (refine, tta, min_score, max_faces)
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    limits: ServeLimits = ServeLimits()
    grace_s: int = defaults.DEFAULT_GRACE_S  # SIGTERM: how long requests in flight may take to finish
    decoders: int = 2  # decoding worker processes
    verbose: bool = False  # all of Triton's log, not only its warnings and errors


def use_own_libpython() -> str:
    """Put this interpreter's libpython first on LD_LIBRARY_PATH, which tritonserver and its Python-backend stub
    inherit: without it the stub loads the system's libpython of another patch level and fails
    ("'_thread.RLock' object has no attribute '_recursion_count'"). Returns the folder."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(os.pathsep):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, current) if p)
    return libdir


def _pytriton():
    for module in ("pytriton.triton", "pytriton.model_config", "pytriton.decorators", "pytriton.server.triton_server"):
        serve_extra(module, "facemark serve")
    return serve_extra("pytriton", "facemark serve")


def _threads_per_instance(config: ServeConfig) -> int:
    return config.threads or max(1, (os.cpu_count() or 1) // config.instances)


def build_landmarker(config: ServeConfig) -> FaceLandmarker:
    return FaceLandmarker(config.model, device=config.provider, threads=_threads_per_instance(config),
                          max_batch_size=max(config.max_batch, 1), options=config.options)


def _request_bytes(request_images: np.ndarray) -> list[bytes]:
    """The encoded files of one request: BYTES arrive as an object array of bytes, shape (B, 1)."""
    return [bytes(item) for item in request_images.reshape(-1)]


def pipeline_callable(landmarker: FaceLandmarker, decoders: DecoderPool, limits: ServeLimits
                      ) -> Callable[[Sequence], list[dict[str, np.ndarray]]]:
    """The `facemark` model: every image of every request in the batch, detected together (one model call).
    A request over the limits gets its reason as every image's error; the other requests go on."""
    threads = ThreadPoolExecutor(max(1, decoders.workers), thread_name_prefix="facemark-decode")

    def decode(data: bytes, index: int) -> np.ndarray | str:
        try:
            return decoders.decode(data, f"image {index} of the request")
        except ImageError as exc:
            return str(exc)

    def infer(requests: Sequence) -> list[dict[str, np.ndarray]]:
        per_request: list[list[bytes]] = [_request_bytes(r[IMAGE_INPUT]) for r in requests]
        refusals = [limits.refusal(files) for files in per_request]
        jobs = [threads.submit(decode, data, index) if refusal is None else None
                for files, refusal in zip(per_request, refusals, strict=True) for index, data in enumerate(files)]
        refused = iter(r for files, r in zip(per_request, refusals, strict=True) for _ in files)
        decoded: list[np.ndarray | str] = [next(refused) if job is None else job.result() for job in jobs]
        images = [d for d in decoded if not isinstance(d, str)]
        found = iter(landmarker.detect_many(images))
        outcomes: list[Detections | str] = [d if isinstance(d, str) else next(found) for d in decoded]
        responses, start = [], 0
        for files in per_request:
            responses.append(pack_detections(outcomes[start : start + len(files)]))
            start += len(files)
        return responses

    return infer


def crops_callable(landmarker: FaceLandmarker) -> Callable:
    """The `facemark_crops` model: the landmark model alone, batched by Triton. Crops holding NaN or Inf are
    refused (Triton answers the batch with the error), and so is a non-finite answer: none leaves the server."""
    batch = _pytriton().decorators.batch

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        if not np.isfinite(image).all():
            raise ValueError("refused: the crops hold NaN or Inf values (expected finite floats)")
        outputs = landmarker.model.predict_outputs(image)
        if not all(np.isfinite(value).all() for value in outputs.values()):
            raise ValueError("the landmark model gave non-finite values for these crops")
        return {name: value.reshape(len(image), *(value.shape[1:] or (1,))) for name, value in outputs.items()}

    return infer


def info_callable(header: dict) -> Callable:
    def infer(requests: Sequence) -> list[dict[str, np.ndarray]]:
        return [{INFO_OUTPUT: info_json(header)} for _ in requests]

    return infer


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Refuse, before anything loads, a port that another process listens on (or one given twice): otherwise
    PyTriton would talk to that other server. SO_REUSEADDR: a port left in TIME_WAIT is free on Linux."""
    held: list[socket.socket] = []
    try:
        for what, port in ports.items():
            probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            held.append(probe)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
                probe.listen(1)  # listening, so the same port given twice is caught too
            except OSError as exc:
                raise ServeError(f"{host}:{port} (--{what}-port): {exc.strerror or exc}; another server listens "
                                 f"there: stop it or choose another port") from None
    finally:
        for probe in held:
            probe.close()


class OneLineFormatter(logging.Formatter):
    """`facemark serve`'s log without --verbose: every record one line (a traceback, say from a request PyTriton
    failed, is cut to its first line: the client got the error already)."""

    def format(self, record: logging.LogRecord) -> str:
        record.exc_info = record.exc_text = None
        lines = super().format(record).splitlines() or [""]
        return lines[0][:400] + (" ..." if len(lines) > 1 or len(lines[0]) > 400 else "")


TRITON_LOG_LINE = re.compile(r"^([IWE])\d{4} [\d:.]+\s+\d+ [^\]]+\] (.*)$")


def follow_triton_log(path: Path, stop: threading.Event, verbose: bool, poll_s: float = 0.2) -> threading.Thread:
    """Forward Triton's log file as it grows: its warnings and errors one line each (the quoted message), or
    every line with `verbose`."""

    def forward(line: str) -> None:
        match = TRITON_LOG_LINE.match(line)
        if verbose:
            sys.stderr.write(line + "\n")
        elif match and match.group(1) in "WE":
            LOGGER.warning("triton %s: %s", "warning" if match.group(1) == "W" else "error",
                           match.group(2).strip().strip('"'))

    def run() -> None:
        while not path.exists() and not stop.wait(poll_s):
            pass
        with open(path, encoding="utf-8", errors="replace") as log:
            while True:
                line = log.readline()
                if line:
                    forward(line.rstrip("\n"))
                elif stop.wait(poll_s):
                    for rest in log:  # what Triton wrote while stopping
                        forward(rest.rstrip("\n"))
                    return

    thread = threading.Thread(target=run, name="facemark-triton-log", daemon=True)
    thread.start()
    return thread


class FacemarkServer:
    """The Triton server with facemark's three models; `start()` returns once every model is ready.

    Everything that can fail without Triton is checked in the constructor, before Triton starts: the serve
    extra, the ports, the model (FaceLandmarker loads it).

    >>> with FacemarkServer(ServeConfig(http_port=8000)) as server:  # doctest: +SKIP
    ...     server.wait(stop_event)  # until SIGINT / SIGTERM, then drain
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        _pytriton()
        check_ports_free(config.host, {"http": config.http_port, "grpc": config.grpc_port,
                                       "metrics": config.metrics_port})
        if config.limits.max_images > config.max_batch:
            raise ServeError(f"--max-images {config.limits.max_images} is above --max-batch-size {config.max_batch} "
                             "(Triton refuses a request larger than its batch)")
        self.landmarkers = [build_landmarker(config) for _ in range(max(1, config.instances))]
        self.decoders = DecoderPool(config.decoders, max_pixels=config.limits.max_pixels)
        self._triton = None
        self._log_dir = tempfile.TemporaryDirectory(prefix="facemark-serve-")
        self.triton_log = Path(self._log_dir.name) / "triton.log"
        self._log_stop = threading.Event()
        self._log_thread: threading.Thread | None = None
        self._drain_log: list[str] = []  # Triton's log as it stopped (its folder is removed)
        # Triton's HTTP and gRPC endpoints on private loopback ports, behind guards on the public ones (guard.py
        # and grpc_guard.py say why)
        limit = request_limit_bytes(config.limits.max_request_mb)
        connections = connection_limit(raise_open_files_limit())  # before Triton starts: it inherits the limit
        self.http_guard = HttpGuard(config.host, config.http_port, free_loopback_port(), limit, connections)
        self.grpc_guard = GrpcGuard(config.host, config.grpc_port, free_loopback_port(), limit, connections)
        self.guards: tuple[LoopbackGuard, ...] = (self.http_guard, self.grpc_guard)

    def describe(self) -> dict:
        return self.landmarkers[0].describe()

    def start(self) -> None:
        pt = _pytriton()
        use_own_libpython()
        c = self.config
        # PyTriton kills tritonserver 30 s after asking it to stop; the drain may take `grace_s`.
        pt.server.triton_server.SERVER_OUTPUT_TIMEOUT_SECS = c.grace_s + 15
        triton_config = pt.triton.TritonConfig(
            http_address="127.0.0.1", http_port=self.http_guard.upstream_port, grpc_address="127.0.0.1",
            grpc_port=self.grpc_guard.upstream_port,
            metrics_address=c.host, metrics_port=c.metrics_port, allow_metrics=True, allow_gpu_metrics=False,
            allow_cpu_metrics=True, exit_timeout_secs=c.grace_s, log_verbose=1 if c.verbose else 0,
            log_file=self.triton_log)
        # Models written to the repository before tritonserver starts and loaded at its start-up: Triton opens
        # its ports only once all of them are ready (honest readiness, see the module docstring).
        policy = pt.triton.TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True)
        self._triton = _quiet(pt)(config=triton_config, triton_lifecycle_policy=policy)
        self._log_thread = follow_triton_log(self.triton_log, self._log_stop, c.verbose)
        # Tensors between the stubs and this process travel over PyTriton's sockets, not through a shared-memory
        # helper process per stub: that helper dies of a SIGTERM sent to every process of the server (systemd's
        # KillMode=control-group), failing the requests in flight; read by PyTriton as the models are bound.
        os.environ[NO_TENSOR_STORE] = "1"
        self._bind(pt)
        try:
            self._triton.run()
        except Exception as exc:  # PyTriton's TimeoutError and friends: one line with Triton's last error
            raise ServeError(f"Triton did not start ({exc.__class__.__name__}: {exc}){self._last_triton_error()}"
                             ) from None
        for guard in self.guards:
            guard.start()  # the public ports open once every model is ready

    def _triton_log_lines(self) -> list[str]:
        return self.triton_log.read_text(errors="replace").splitlines() if self.triton_log.exists() else []

    def _last_triton_error(self) -> str:
        errors = [m.group(2) for m in map(TRITON_LOG_LINE.match, self._triton_log_lines()) if m and m.group(1) == "E"]
        return f"; Triton's last error: {errors[-1][:300]}" if errors else ""

    def _why_stopped(self) -> str:
        """Which process ended and how: tritonserver's exit code or signal (its last error only with an exit code,
        where it says why), else the model whose handler stopped."""
        process = self._triton._triton_server
        deadline = time.monotonic() + 5  # sh records the exit on a thread of its own, a moment after it
        while getattr(process, "ended", None) is None and not process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = getattr(process, "ended", None)
        if ended is not None:
            cause = self._last_triton_error() if ended.code > 0 else ""  # a signal: its log does not say why
            return f"tritonserver (pid {ended.pid}) {ended.how()}{cause}"
        dead = [model.model_name for model in self._triton._model_manager.models if not model.is_alive()]
        return f"the inference handler of model {', '.join(dead) or '?'} in this process stopped"

    def _bind(self, pt) -> None:
        Tensor, ModelConfig = pt.model_config.Tensor, pt.model_config.ModelConfig
        c, first = self.config, self.landmarkers[0]
        batcher = pt.model_config.DynamicBatcher(max_queue_delay_microseconds=c.queue_delay_us)
        batching = ModelConfig(max_batch_size=c.max_batch, batcher=batcher)
        outputs = [Tensor(name=name, dtype=dtype, shape=(-1, *shape)) for name, (dtype, shape) in FACE_OUTPUTS.items()]
        outputs += [Tensor(name=PRESENT, dtype=np.uint8, shape=(-1, len(OPTIONAL_FIELDS))),
                    Tensor(name=FACE_COUNT, dtype=np.int32, shape=(1,)), Tensor(name=ERROR, dtype=bytes, shape=(1,))]
        self._triton.bind(model_name=PIPELINE_MODEL,
                          infer_func=[pipeline_callable(lm, self.decoders, c.limits) for lm in self.landmarkers],
                          inputs=[Tensor(name=IMAGE_INPUT, dtype=bytes, shape=(1,))], outputs=outputs,
                          config=batching)
        size = first.contract.size
        self._triton.bind(
            model_name=CROPS_MODEL, infer_func=[crops_callable(lm) for lm in self.landmarkers],
            inputs=[Tensor(name="image", dtype=np.float32, shape=(1, size, size))],
            outputs=[Tensor(name=name, dtype=np.float32, shape=tuple(shape) or (1,))
                     for name, shape in first.model.output_shapes.items()],
            config=batching)
        self._triton.bind(model_name=INFO_MODEL, infer_func=info_callable(self.describe()),
                          inputs=[Tensor(name=INFO_INPUT, dtype=bytes, shape=(1,))],
                          outputs=[Tensor(name=INFO_OUTPUT, dtype=bytes, shape=(1,))],
                          config=ModelConfig(batching=False))

    def wait(self, stop: threading.Event, poll_s: float = 0.5) -> int:
        """Serve until `stop` is set (SIGTERM / SIGINT: drain, then 0, or 1 when requests in flight were cut) or
        until Triton dies (1)."""
        while not stop.wait(poll_s):
            if not self._triton.is_alive():
                LOGGER.error("stopped on its own: %s", self._why_stopped())
                self.stop()
                return 1
        self._drain_guards()
        LOGGER.warning("draining: no new connections; requests in flight have up to %d s", self.config.grace_s)
        self.stop()
        shortfall = drain_shortfall(self.http_guard.cut, self._drain_log, self.grpc_guard.cut)
        if shortfall is not None:
            LOGGER.error("the drain did not finish within --grace %d s: %s", self.config.grace_s, shortfall)
            return 1
        return 0

    def stop(self) -> None:
        """Stop Triton (it finishes the requests in flight within grace_s first), the decoders, the log."""
        self._drain_guards()
        if self._triton is not None:
            self._triton.stop()
            kill_leftovers(getattr(self._triton._triton_server, "group", None))
        for guard in self.guards:
            guard.stop()
        self.decoders.close()
        self._log_stop.set()
        if self._log_thread is not None:
            self._log_thread.join(5)
        self._drain_log = self._drain_log or self._triton_log_lines()
        self._log_dir.cleanup()

    def _drain_guards(self) -> None:
        for guard in self.guards:
            guard.drain()

    def __enter__(self) -> FacemarkServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def urls(self) -> dict[str, str]:
        c = self.config
        return {"http": f"http://{c.host}:{c.http_port}", "grpc": f"{c.host}:{c.grpc_port}",
                "metrics": f"http://{c.host}:{c.metrics_port}/metrics"}

    def ready_line(self) -> dict:
        """The one line `facemark serve` prints on stdout once every model is ready."""
        c, model = self.config, self.describe()["model"]
        return {"ready": True, **self.urls(), "models": [PIPELINE_MODEL, CROPS_MODEL, INFO_MODEL],
                "model": model.get("path"), "providers": model["providers"], "instances": c.instances,
                "max_batch": c.max_batch, "limits": {"max_request_mb": c.limits.max_request_mb,
                                                     "max_images": c.limits.max_images,
                                                     "max_megapixels": c.limits.max_megapixels},
                "grace_s": c.grace_s, "probes": {"readiness": "/v2/health/ready", "liveness": "/v2/health/live"}}


# Triton's log when its exit timeout (--grace) ends the drain: the inferences each model version still ran, then
# the give-up line
INFLIGHT_INFERENCES = re.compile(r"Model '([^']+)' \(version \d+\) has (\d+) in-flight inferences")
EXIT_TIMEOUT_EXPIRED = "Exit timeout expired"


def drain_shortfall(http_cut: int, log_lines: Sequence[str], grpc_cut: int = 0) -> str | None:
    """What the drain left unanswered: None when it finished in time. `http_cut`, `grpc_cut`: the HTTP requests
    and gRPC calls in flight whose connection ended without their answer (the guards count them); from Triton's
    log, whether its exit timeout expired and the inferences it still ran then (any protocol; requests still
    queued are not among them)."""
    inflight: dict[str, int] = {}
    expired = False
    for line in log_lines:
        if (match := INFLIGHT_INFERENCES.search(line)) is not None:
            inflight[match.group(1)] = int(match.group(2))
        elif EXIT_TIMEOUT_EXPIRED in line:
            expired = True
    if not expired and not http_cut and not grpc_cut:
        return None
    running = ", ".join(f"{count} of model {name}" for name, count in inflight.items()) or "none"
    return (f"{http_cut} HTTP request(s) in flight were not answered"
            + (f"; {grpc_cut} gRPC call(s) in flight were not answered" if grpc_cut else "")
            + (f"; Triton's exit timeout expired with inference(s) still running: {running}" if expired else ""))


@dataclass(frozen=True)
class Ended:
    """How tritonserver ended: its pid and exit code (negative: the signal that killed it)."""

    pid: int
    code: int

    def how(self) -> str:
        if self.code < 0:
            return f"was killed by {signal.Signals(-self.code).name}"
        return f"exited with code {self.code}"


def kill_leftovers(group: int | None) -> None:
    """SIGKILL what is left of tritonserver's process group once it has exited: a Python-backend stub whose
    model was still executing when Triton's exit timeout ended it waits for an answer forever otherwise."""
    if group is None:
        return
    deadline = time.monotonic() + LEFTOVER_WAIT_S  # stubs of models unloaded normally are just ending
    while (left := [pid for pid in _group_members(group) if pid != group]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):  # gone meanwhile
            os.kill(pid, signal.SIGKILL)
    if left:
        LOGGER.warning("tritonserver left %d process(es) of its own running; killed: %s", len(left),
                       " ".join(map(str, left)))


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command name: state, ppid, pgrp, ...) of every process
    (Linux); a process that ends meanwhile is skipped."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue


def _group_members(group: int) -> list[int]:
    """The live processes of a process group."""
    return [pid for pid, fields in process_stats() if int(fields[2]) == group and fields[0] != "Z"]


def _triton_child_setup() -> None:
    """In tritonserver's process, between fork and exec. SIGTERM blocked: the mask is inherited by every process
    Triton starts (Python-backend stubs, their shared-memory helpers), so a SIGTERM sent to the whole process
    group or control group reaches only facemark serve, which drains and then stops Triton with SIGINT (which
    Triton, the stubs and the helpers handle). SIGINT, not PyTriton's SIGTERM, when facemark serve dies: Triton
    drains and exits rather than stay orphaned."""
    import ctypes
    import ctypes.util

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    pr_set_pdeathsig = 1
    ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl(pr_set_pdeathsig, signal.SIGINT)


def _triton_process_class(pt):
    """PyTriton's TritonServer (the tritonserver subprocess) started with _triton_child_setup in a session and
    process group of its own (`group`: a signal to facemark serve's group does not reach it, and what it leaves
    behind can be found), recording how it ended (`ended`), with its own stdout (lines Triton prints outside its
    log file, such as "Signal (2) received.") kept rather than echoed onto ours, where the ready line goes."""

    class TritonProcess(pt.server.triton_server.TritonServer):
        ended: Ended | None = None
        group: int | None = None  # tritonserver's process group: it and every process it starts

        def start(self) -> None:  # PyTriton's start, with facemark's child setup
            import sh

            command, *rest = self._server_path.as_posix().split(" ", 1)
            self._tritonserver_logs = ""
            self._tritonserver_running_cmd = sh.Command(command).bake(*rest)(
                *self._server_config.to_args_list(), _env=self._get_env(), _err_to_out=True, _out=self._record_logs,
                _out_bufsize=0, _err_bufsize=0, _bg=True, _bg_exc=False, _done=self._handle_exit,
                _preexec_fn=_triton_child_setup, _new_session=True)
            self.group = self._tritonserver_running_cmd.pid

        def _handle_exit(self, command, success, exit_code) -> None:
            self.ended = Ended(command.pid, exit_code)
            super()._handle_exit(command, success, exit_code)

    return TritonProcess


def _quiet(pt):
    """PyTriton's Triton with its tritonserver started as _triton_process_class says."""
    process_class = _triton_process_class(pt)

    class QuietTriton(pt.triton.Triton):
        def _initialize_server(self) -> None:
            super()._initialize_server()
            started = self._triton_server
            self._triton_server = process_class(path=started._server_path, libs_path=started._server_libs_path,
                                                config=started._server_config, verbose=False)

    return QuietTriton
