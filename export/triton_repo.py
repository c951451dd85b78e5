"""`facemark export ... --triton-repo DIR`: a model repository for a stock Triton server (GPU fleets), serving the
landmark model on Triton's own `onnxruntime` backend (no Python in the request path):

  DIR/facemark_crops/config.pbtxt      max_batch_size, dynamic batching, dims read from the ONNX file
  DIR/facemark_crops/1/model.onnx      the exported model

`facemark serve` (PyTriton) is the other route: the whole pipeline, Haar included, in Python behind Triton.
Optionally the ONNX Runtime backend runs the model through TensorRT (fp16, engine cache); Triton's
model_config.proto (tritonclient.grpc.model_config_pb2) parses what is written here (tests check it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from facemark.errors import ModelError
from facemark.runtime.serving.protocol import CROPS_MODEL

# ONNX element types -> Triton data types (a facemark model's inputs and outputs are float; fp16 is accepted)
TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}
DEFAULT_PREFERRED = (4, 8, 16)


@dataclass(frozen=True)
class RepoOptions:
    max_batch: int = 16
    preferred_batches: tuple[int, ...] = DEFAULT_PREFERRED
    queue_delay_us: int = 500
    instance_kind: str = "KIND_GPU"  # KIND_CPU for a CPU-only server
    instances: int = 1
    tensorrt: bool = False  # ONNX Runtime's TensorRT execution accelerator (GPU instances only)
    trt_fp16: bool = True
    trt_cache: str = "/tmp/facemark-trt-cache"  # a path on the server: engines built once, reused at reload
    trt_workspace_bytes: int = 1 << 30


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: tuple[int, ...]  # without the batch dimension
    reshape_to_scalar: bool = False  # a per-item scalar (face_score [N]): dims [1] + reshape { shape: [] }


def _specs(values, source: str) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if not shape or shape[0] != -1:
            raise ModelError(f"{source}: {value.name} has no dynamic batch dimension ({shape}); Triton batching "
                             "needs one (re-export with `facemark export`)")
        if any(d < 1 for d in shape[1:]):
            raise ModelError(f"{source}: {value.name} has dynamic dimensions past the batch one ({shape})")
        if tensor.elem_type not in TRITON_TYPES:
            raise ModelError(f"{source}: {value.name} has element type {tensor.elem_type}, not float / float16")
        dims = tuple(shape[1:])
        specs.append(TensorSpec(value.name, TRITON_TYPES[tensor.elem_type], dims or (1,), reshape_to_scalar=not dims))
    return specs


def model_io(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    model = onnx.load(str(model_path), load_external_data=False)
    return _specs(model.graph.input, str(model_path)), _specs(model.graph.output, str(model_path))


def _tensor_block(specs: list[TensorSpec]) -> str:
    blocks = []
    for s in specs:
        reshape = "\n    reshape: { shape: [ ] }" if s.reshape_to_scalar else ""
        blocks.append(f'  {{\n    name: "{s.name}"\n    data_type: {s.data_type}\n'
                      f'    dims: [ {", ".join(map(str, s.dims))} ]{reshape}\n  }}')
    return ",\n".join(blocks)


def config_text(inputs: list[TensorSpec], outputs: list[TensorSpec], options: RepoOptions,
                name: str = CROPS_MODEL) -> str:
    """config.pbtxt (Triton's ModelConfig in protobuf text format) for the onnxruntime backend."""
    preferred = sorted({b for b in options.preferred_batches if b <= options.max_batch} or {options.max_batch})
    text = (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {options.max_batch}\n'
            f"input [\n{_tensor_block(inputs)}\n]\noutput [\n{_tensor_block(outputs)}\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
            f"  max_queue_delay_microseconds: {options.queue_delay_us}\n}}\n"
            f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {options.instance_kind}\n  }}\n]\n")
    if options.tensorrt:
        if options.instance_kind != "KIND_GPU":
            raise ValueError("the TensorRT accelerator needs GPU instances (instance_kind KIND_GPU)")
        parameters = {"precision_mode": "FP16" if options.trt_fp16 else "FP32",
                      "max_workspace_size_bytes": str(options.trt_workspace_bytes),
                      "trt_engine_cache_enable": "1", "trt_engine_cache_path": options.trt_cache}
        lines = "\n".join(f'      parameters {{ key: "{k}" value: "{v}" }}' for k, v in parameters.items())
        text += ("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n"
                 f'      {{\n      name: "tensorrt"\n{lines}\n      }}\n    ]\n  }}\n}}\n')
    return text


def write_triton_repository(model_path: str | os.PathLike, repo: str | os.PathLike,
                            options: RepoOptions = RepoOptions()) -> Path:
    """Write (or replace) DIR/facemark_crops; returns that folder. Other models in DIR are left alone. The
    folder is assembled beside its final place and renamed in, so a failed run leaves the old one whole."""
    source, repo = Path(model_path), Path(repo)
    inputs, outputs = model_io(source)
    text = config_text(inputs, outputs, options)
    repo.mkdir(parents=True, exist_ok=True)
    target = repo / CROPS_MODEL
    staging = Path(tempfile.mkdtemp(prefix=f".{CROPS_MODEL}-", dir=repo))
    staging.chmod(0o755)  # mkdtemp makes it private; a server running as another user must read it
    try:
        (staging / "1").mkdir()
        shutil.copyfile(source, staging / "1" / "model.onnx")
        (staging / "config.pbtxt").write_text(text)
        old = None
        if target.exists():
            old = repo / f".{CROPS_MODEL}-old-{os.getpid()}"
            target.rename(old)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
