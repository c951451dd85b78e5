"""`facemark serve`: facemark behind NVIDIA Triton Inference Server, through PyTriton (extra `facemark[serve]`).

PyTriton starts the real `tritonserver` binary its wheel carries (KServe v2 HTTP and gRPC, dynamic batching,
Prometheus metrics) with Triton's Python backend forwarding each batch to the callables bound here, which run
the torch-free pipeline of this package. The models and tensors are facemark.runtime.serving's.

Dynamic batching: Triton gathers the requests that arrive within `queue_delay_us` (up to `max_batch` images)
into one call; the pipeline model then runs Haar on a thread pool and the landmark model once over the faces of
every image of those requests (FaceLandmarker.detect_many), so concurrent clients share one model call.
"""

from __future__ import annotations

import logging
import os
import signal
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facemark.errors import FacemarkError
from facemark.imageio import decode_image
from facemark.runtime.defaults import DEFAULT_MIN_SCORE, DEFAULT_REFINE
from facemark.runtime.landmarker import Detections, FaceLandmarker
from facemark.runtime.serving import (
    CROPS_MODEL,
    ERROR,
    FACE_COUNT,
    FACE_OUTPUTS,
    IMAGE_INPUT,
    INFO_INPUT,
    INFO_MODEL,
    INFO_OUTPUT,
    PIPELINE_MODEL,
    info_json,
    pack_detections,
    serve_extra,
)

LOGGER = logging.getLogger("facemark.serve")
DEFAULT_MAX_BATCH = 16
DEFAULT_QUEUE_DELAY_US = 2000  # how long Triton holds a request for others to batch with it


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
    refine: int = DEFAULT_REFINE
    min_score: float | None = DEFAULT_MIN_SCORE
    max_faces: int | None = None
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    detector_options: dict = field(default_factory=dict)


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
    for module in ("pytriton.triton", "pytriton.model_config", "pytriton.decorators"):
        serve_extra(module, "facemark serve")
    return serve_extra("pytriton", "facemark serve")


def _threads_per_instance(config: ServeConfig) -> int:
    return config.threads or max(1, (os.cpu_count() or 1) // config.instances)


def build_landmarker(config: ServeConfig) -> FaceLandmarker:
    return FaceLandmarker(config.model, provider=config.provider, threads=_threads_per_instance(config),
                          max_batch=max(config.max_batch, 1), refine=config.refine, min_score=config.min_score,
                          max_faces=config.max_faces, detector_options=config.detector_options)


def _request_bytes(request_images: np.ndarray) -> list[bytes]:
    """The encoded files of one request: BYTES arrive as an object array of bytes, shape (B, 1)."""
    return [bytes(item) for item in request_images.reshape(-1)]


def pipeline_callable(landmarker: FaceLandmarker) -> Callable[[Sequence], list[dict[str, np.ndarray]]]:
    """The `facemark` model: every image of every request in the batch, detected together (one model call)."""

    def infer(requests: Sequence) -> list[dict[str, np.ndarray]]:
        per_request: list[list[bytes]] = [_request_bytes(r[IMAGE_INPUT]) for r in requests]
        decoded: list[np.ndarray | str] = []
        for files in per_request:
            for index, data in enumerate(files):
                try:
                    decoded.append(decode_image(data, f"image {index} of the request"))
                except FacemarkError as exc:
                    decoded.append(str(exc))
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
    """The `facemark_crops` model: the landmark model alone, batched by Triton."""
    batch = _pytriton().decorators.batch

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        outputs = landmarker.model.predict_outputs(image)
        return {name: value.reshape(len(image), *(value.shape[1:] or (1,))) for name, value in outputs.items()}

    return infer


def info_callable(header: dict) -> Callable:
    def infer(requests: Sequence) -> list[dict[str, np.ndarray]]:
        return [{INFO_OUTPUT: info_json(header)} for _ in requests]

    return infer


class FacemarkServer:
    """The Triton server with facemark's three models; `start()` returns once every model is ready.

    >>> with FacemarkServer(ServeConfig(http_port=8000)) as server:  # doctest: +SKIP
    ...     server.wait()  # until SIGINT / SIGTERM
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.landmarkers = [build_landmarker(config) for _ in range(max(1, config.instances))]
        self._triton = None

    def describe(self) -> dict:
        return self.landmarkers[0].describe()

    def start(self) -> None:
        pt = _pytriton()
        use_own_libpython()
        c = self.config
        triton_config = pt.triton.TritonConfig(
            http_address=c.host, http_port=c.http_port, grpc_address=c.host, grpc_port=c.grpc_port,
            metrics_address=c.host, metrics_port=c.metrics_port, allow_metrics=True, allow_gpu_metrics=False,
            allow_cpu_metrics=True, exit_timeout_secs=5, log_verbose=0)
        self._triton = pt.triton.Triton(config=triton_config)
        self._bind(pt)
        self._triton.run()

    def _bind(self, pt) -> None:
        Tensor, ModelConfig = pt.model_config.Tensor, pt.model_config.ModelConfig
        c, first = self.config, self.landmarkers[0]
        batcher = pt.model_config.DynamicBatcher(max_queue_delay_microseconds=c.queue_delay_us)
        batching = ModelConfig(max_batch_size=c.max_batch, batcher=batcher)
        outputs = [Tensor(name=name, dtype=dtype, shape=(-1, *shape)) for name, (dtype, shape) in FACE_OUTPUTS.items()]
        outputs += [Tensor(name=FACE_COUNT, dtype=np.int32, shape=(1,)), Tensor(name=ERROR, dtype=bytes, shape=(1,))]
        self._triton.bind(model_name=PIPELINE_MODEL, infer_func=[pipeline_callable(lm) for lm in self.landmarkers],
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

    def wait(self, poll_s: float = 1.0) -> None:
        """Serve until SIGINT or SIGTERM, or until Triton dies; then stop it (in-flight requests drain)."""
        def interrupt(_signum, _frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            while self._triton.is_alive():
                time.sleep(poll_s)
            LOGGER.error("Triton or a model stopped on its own")
        except KeyboardInterrupt:
            LOGGER.info("stopping")
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.stop()

    def stop(self) -> None:
        if self._triton is not None:
            self._triton.stop()

    def __enter__(self) -> FacemarkServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def urls(self) -> dict[str, str]:
        c = self.config
        return {"http": f"http://{c.host}:{c.http_port}", "grpc": f"{c.host}:{c.grpc_port}",
                "metrics": f"http://{c.host}:{c.metrics_port}/metrics"}


def summary_line(server: FacemarkServer) -> str:
    urls = server.urls()
    model = server.describe()["model"]
    return (f"facemark serve: models {PIPELINE_MODEL}, {CROPS_MODEL}, {INFO_MODEL} ready; HTTP {urls['http']}, "
            f"gRPC {urls['grpc']}, metrics {urls['metrics']}; model {model.get('path')} on "
            f"{', '.join(model['providers'])}; {server.config.instances} instance(s), max batch "
            f"{server.config.max_batch}")
