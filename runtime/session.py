"""ONNX Runtime sessions: provider selection and the landmark model (torch-free).

Provider policy:
- "auto" picks TensorRT > CUDA > CPU among the providers that actually load here. onnxruntime-gpu lists
  CUDA/TensorRT in `get_available_providers()` even on a machine without a GPU or without the CUDA
  libraries, and then silently runs on the CPU; so each GPU provider is probed once with a tiny built-in model
  and counted only when the probe session really runs on it.
- An explicit "cuda" / "tensorrt" that cannot run raises ProviderError, never a silent CPU fallback.
- `onnxruntime.preload_dlls()` (onnxruntime >= 1.21) is called first, so the CUDA / cuDNN libraries of the
  nvidia-* pip wheels are found without LD_LIBRARY_PATH.
- TensorRT: fp16 on request, an engine cache directory (the first engine build takes minutes; the cache makes
  the next start fast), and an explicit batch profile 1..max_batch at the model's crop size. CUDA takes over
  any node TensorRT cannot run. CPU: the intra-op thread count is configurable.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from facemark.choices import PROVIDERS
from facemark.contract import CropContract
from facemark.errors import ModelError, ProviderError, setting
from facemark.metadata import FACE_SCORE, INPUT_NAME, LANDMARK_SCORES, OUTPUT_NAME, ModelInfo, parse_metadata
from facemark.scheme import NUM_POINTS

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROVIDER_NAMES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}
PROVIDER_CHOICES = PROVIDERS
GPU_PRIORITY = (TENSORRT, CUDA)
DEFAULT_MAX_BATCH = 32  # TensorRT profile upper bound; larger batches are run in chunks

# A 69-byte ONNX model (Identity on float[1], opset 17) used only to probe whether a provider loads.
_PROBE_MODEL = base64.b64decode(
    "CAg6OwoQCgF4EgF5IghJZGVudGl0eRIFcHJvYmVaDwoBeBIKCggIARIECgIIAWIPCgF5EgoKCAgBEgQKAggBQgQKABAR"
)


@functools.cache
def _preload_gpu_libraries() -> None:
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    # No CUDA wheels installed: the probe then reports CPU only. preload_dlls print()s each library it
    # cannot find; on a CPU machine that is expected, not news for the user.
    with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
        preload()


@contextlib.contextmanager
def _quiet_onnxruntime():
    """Silence ORT's own error lines and fallback banner while probing: a failed probe is an answer."""
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        ort.set_default_logger_severity(2)


@functools.cache
def _provider_loads(provider: str) -> bool:
    if provider == CPU:
        return True
    if provider not in ort.get_available_providers():
        return False
    _preload_gpu_libraries()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        with _quiet_onnxruntime():
            session = ort.InferenceSession(_PROBE_MODEL, options, providers=[provider])
    except Exception:  # ORT raises assorted types for missing libraries or devices
        return False
    return provider in session.get_providers()


def available_providers() -> list[str]:
    """The execution providers that actually load on this machine, best first (CPU always last)."""
    return [p for p in (*GPU_PRIORITY, CPU) if _provider_loads(p)]


def provider_options(
    provider: str,
    image_size: int = 224,
    trt_fp16: bool = False,
    trt_cache_dir: str | os.PathLike | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    shapes: tuple[str, str, str] | None = None,
) -> dict[str, str]:
    """ONNX Runtime options for one provider; only TensorRT takes any. `shapes`: the TensorRT profile's
    (min, opt, max) input shapes as "name:NxCxHxW" (default: the landmark model's crops, batches up to max_batch)."""
    if provider != TENSORRT:
        return {}
    if shapes is None:
        shape = f"1x{image_size}x{image_size}"
        shapes = (f"{INPUT_NAME}:1x{shape}", f"{INPUT_NAME}:{min(8, max_batch)}x{shape}",
                  f"{INPUT_NAME}:{max_batch}x{shape}")
    options = {
        "trt_fp16_enable": "True" if trt_fp16 else "False",
        "trt_profile_min_shapes": shapes[0],
        "trt_profile_opt_shapes": shapes[1],
        "trt_profile_max_shapes": shapes[2],
    }
    if trt_cache_dir is not None:
        Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
        options.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(trt_cache_dir),
                       trt_timing_cache_enable="True", trt_timing_cache_path=str(trt_cache_dir))
    return options


def resolve_providers(
    requested: str,
    image_size: int = 224,
    trt_fp16: bool = False,
    trt_cache_dir: str | os.PathLike | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    shapes: tuple[str, str, str] | None = None,
) -> list[str | tuple[str, dict[str, str]]]:
    """The `providers=` list for an InferenceSession: the chosen provider first, then its fallbacks for nodes
    it cannot run (TensorRT -> CUDA -> CPU). Raises ProviderError for an explicit provider that cannot run."""
    key = requested.lower()
    if key not in PROVIDER_CHOICES:
        raise ProviderError.worded(lambda cli: f"{setting('device', requested, cli=cli)}: unknown provider; choose "
                                   f"one of {', '.join(PROVIDER_CHOICES)}")
    loadable = available_providers()
    if key == "auto":
        chosen = loadable[0]
    else:
        chosen = PROVIDER_NAMES[key]
        if chosen not in loadable:
            raise ProviderError.worded(
                lambda cli: f"{setting('device', key, cli=cli)}: {chosen} cannot run here (loadable: "
                f"{', '.join(loadable)}); check the GPU driver and the CUDA/cuDNN/TensorRT libraries, or use "
                f"{setting('device', 'cpu', cli=cli)} or {setting('device', 'auto', cli=cli)}"
            )
    chain = [p for p in (TENSORRT, CUDA, CPU) if p in loadable]
    chain = chain[chain.index(chosen):]
    return [
        (p, provider_options(p, image_size, trt_fp16, trt_cache_dir, max_batch, shapes)) if p == TENSORRT else p
        for p in chain
    ]


def session_options(threads: int | None, spin: bool) -> ort.SessionOptions:
    """The session options of every facemark session (landmark model and CNN detector alike)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # No spin-waiting after a call unless asked: spinning intra-op threads steal the cores that Haar and the
    # pipelined runner's workers need (measured: folder throughput 12.1 -> 15.9 images/s, docs/MODEL.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if threads is not None:
        if threads < 1:
            raise ProviderError.worded(lambda cli: f"{setting('threads', threads, cli=cli)}: must be >= 1")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def _provider_name(entry: str | tuple[str, dict]) -> str:
    return entry if isinstance(entry, str) else entry[0]


class LandmarkModel:
    """A facemark ONNX model on ONNX Runtime: normalised crops (N, 1, S, S) -> normalised points (N, 68, 2).

    Implements facemark.evaluation's CropPredictor (`.contract`, `.predict`).
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        provider: str = "auto",
        threads: int | None = None,
        trt_fp16: bool = False,
        trt_cache_dir: str | os.PathLike | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        spin: bool = False,
    ) -> None:
        """spin: ONNX Runtime's intra-op threads spin-wait after each call (its own default; lowest latency
        for one stream on an otherwise idle machine, slower beside other work such as Haar)."""
        self.path: Path | None = None if isinstance(model, bytes) else Path(model)
        source = "<model bytes>" if self.path is None else str(self.path)
        data = model if isinstance(model, bytes) else _read_model_file(self.path)
        self.max_batch = max_batch
        options = session_options(threads, spin)
        # The crop size is needed for the TensorRT profile before the session exists: read the metadata first
        # from a CPU session only when TensorRT is in play (it is cheap next to an engine build).
        probe_size = 224
        providers = resolve_providers(provider, probe_size, trt_fp16, trt_cache_dir, max_batch)
        if any(_provider_name(p) == TENSORRT for p in providers):
            probe_size = _contract_of(data, source).size
            providers = resolve_providers(provider, probe_size, trt_fp16, trt_cache_dir, max_batch)
        self.session = started_session(data, options, providers, source)
        self.info: ModelInfo = parse_metadata(self.session.get_modelmeta().custom_metadata_map, source)
        self.contract: CropContract = self.info.contract
        self.providers: list[str] = self.session.get_providers()
        self._input_dtype, self._outputs = _check_io(self.session, self.contract, source)

    @property
    def output_names(self) -> list[str]:
        """The model's outputs: `landmarks`, then `landmark_scores` / `face_score` where the head has them."""
        return list(self._outputs)

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each output's shape per crop (without the batch dimension), as checked at load."""
        return {name: tuple(shape) for name, shape in self._outputs.items()}

    @property
    def has_face_score(self) -> bool:
        return FACE_SCORE in self._outputs

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Normalised crops (N, 1, S, S) float32 -> normalised landmarks (N, 68, 2) float32."""
        return self.predict_outputs(batch, [OUTPUT_NAME])[OUTPUT_NAME]

    def predict_outputs(self, batch: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Every output (or `names`) by name, float32: landmarks (N, 68, 2), landmark_scores (N, 68) and
        face_score (N,) where the model has them."""
        x = np.asarray(batch)
        size = self.contract.size
        if x.ndim != 4 or x.shape[1:] != (1, size, size):
            raise ValueError(f"expected a batch of shape (N, 1, {size}, {size}), got {x.shape}")
        names = list(names or self._outputs)
        if len(x) == 0:
            return {n: np.zeros((0, *self._outputs[n]), np.float32) for n in names}
        x = np.ascontiguousarray(x, dtype=self._input_dtype)
        parts = [self.session.run(names, {INPUT_NAME: x[i : i + self.max_batch]})
                 for i in range(0, len(x), self.max_batch)]
        return {n: np.concatenate([p[k] for p in parts]).astype(np.float32, copy=False)
                for k, n in enumerate(names)}

    def __repr__(self) -> str:
        return f"LandmarkModel({self.path or '<bytes>'}, providers={self.providers}, size={self.contract.size})"


def _read_model_file(path: Path) -> bytes:
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    data = path.read_bytes()
    if not data:
        raise ModelError(f"{path}: empty model file")
    if is_torch_checkpoint(data):
        raise ModelError(f"{path} is a PyTorch checkpoint: run `facemark export {path}` first and give the .onnx "
                         "file it writes")
    return data


def is_torch_checkpoint(data: bytes) -> bool:
    """torch.save's files: a zip archive (PyTorch >= 1.6) or a bare pickle (older), never an ONNX protobuf."""
    return data[:4] == b"PK\x03\x04" or data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def create_session(data: bytes, options: ort.SessionOptions, providers: list, source: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(data, options, providers=providers)
    except Exception as exc:  # ORT raises InvalidProtobuf, Fail, InvalidGraph ... for a bad file
        # The whole message on one line: the cause ("max supported IR version: 13") is often at its end.
        detail = " ".join(str(exc).split()) or exc.__class__.__name__
        raise ModelError(f"{source}: not a loadable ONNX model ({detail})") from None


def started_session(data: bytes, options: ort.SessionOptions, providers: list, source: str) -> ort.InferenceSession:
    """A session on the first of `providers`, or ProviderError when ORT fell back although the probe said it
    loads."""
    session = create_session(data, options, providers, source)
    wanted = _provider_name(providers[0])
    if wanted not in session.get_providers():
        raise ProviderError(f"{source}: {wanted} failed to start (the session runs on {session.get_providers()})")
    return session


def _contract_of(data: bytes, source: str) -> CropContract:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = create_session(data, options, [CPU], source)
    return parse_metadata(session.get_modelmeta().custom_metadata_map, source).contract


def _check_io(session: ort.InferenceSession, contract: CropContract, source: str
              ) -> tuple[type, dict[str, tuple[int, ...]]]:
    """Check the model's input/outputs against its contract and docs/DESIGN.md section 4; return the input dtype (fp16
    models take fp16) and the known outputs with their shapes after the batch axis."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ModelError(f"{source}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found "
                         f"{sorted(inputs)} -> {sorted(outputs)}")
    shape = inputs[INPUT_NAME].shape
    expected = (1, contract.size, contract.size)
    if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected, strict=True)):
        raise ModelError(f"{source}: input shape {shape} does not match the contract's "
                         f"[N, 1, {contract.size}, {contract.size}]")
    known = {OUTPUT_NAME: (NUM_POINTS, 2), LANDMARK_SCORES: (NUM_POINTS,), FACE_SCORE: ()}
    found: dict[str, tuple[int, ...]] = {}
    for name, tail in known.items():
        if name not in outputs:
            continue
        dims = outputs[name].shape
        if len(dims) != 1 + len(tail) or any(not isinstance(d, int) or d != e
                                             for d, e in zip(dims[1:], tail, strict=True)):
            want = ", ".join(["N", *map(str, tail)])
            raise ModelError(f"{source}: output {name!r} has shape {dims}, expected [{want}]")
        found[name] = tail
    return (np.float16 if inputs[INPUT_NAME].type == "tensor(float16)" else np.float32), found
