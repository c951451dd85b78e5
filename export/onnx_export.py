"""PyTorch -> ONNX (fp32): the graph, its interface (GUIDE section 4) and its checks.

Exporter choice: the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`). Measured with torch 2.14.1
/ onnx 1.23 on LandmarkNet: the dynamo exporter has no opset-17 implementations, builds at opset 18 and hands
the graph to the version converter, which fails on ReduceMean (its axes became an input in opset 18:
"axes_input_to_attribute ... No initializer or constant input") and then *keeps opset 18* with only a log
message -- so `opset_version=17` silently gives an opset-18 file that a runtime pinned to 17 rejects. The
TorchScript exporter emits opset 17 directly (Conv with BatchNorm folded, Relu, MaxPool, GlobalAveragePool,
Gemm), agrees with eager PyTorch within 3e-6 and takes 0.3 s instead of 3 s. It is deprecated, so its
DeprecationWarnings are silenced here on purpose, and every exported file is checked for the declared opset,
so a future torch that drops it fails loudly here (tests run at opset 17) instead of shipping a wrong file.
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch

from facemark.errors import ModelError
from facemark.metadata import INPUT_NAME, OUTPUT_NAME
from facemark.scheme import NUM_POINTS

DEFAULT_OPSET = 17
BATCH_DIM = "batch"
MAX_PROTOBUF_BYTES = 2**31 - 1  # one self-contained file: no external-data sidecar possible above this


def export_fp32(model: torch.nn.Module, size: int, opset: int = DEFAULT_OPSET,
                batch: int | None = None) -> onnx.ModelProto:
    """Trace `model` (eval mode) to an ONNX model: input `image` [N,1,S,S], output `landmarks` [N,68,2].

    `batch=None` gives a dynamic batch axis; an int fixes it.
    """
    model = model.eval()
    example = torch.zeros(batch or 1, 1, size, size, dtype=torch.float32)
    dynamic_axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if batch is None else None
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(model, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_axes=dynamic_axes, do_constant_folding=True,
                          dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    _fix_output_shape(proto, batch)
    check_model(proto, opset, "exported model")
    return proto


def _fix_output_shape(proto: onnx.ModelProto, batch: int | None) -> None:
    """The tracer names the reshaped output dims symbolically; declare the real [N, 68, 2]."""
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    for dim, value in zip(dims[1:], (NUM_POINTS, 2), strict=True):
        dim.Clear()
        dim.dim_value = value
    dims[0].Clear()
    if batch is None:
        dims[0].dim_param = BATCH_DIM
    else:
        dims[0].dim_value = batch


def default_opset(proto: onnx.ModelProto) -> int | None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def check_model(proto: onnx.ModelProto, opset: int, what: str) -> None:
    """The file's promises: declared default-domain opset, one file, valid for onnx's full checker."""
    declared = default_opset(proto)
    if declared != opset:
        raise ModelError(f"{what}: declares default-domain opset {declared}, expected {opset}")
    if proto.ByteSize() > MAX_PROTOBUF_BYTES:
        raise ModelError(f"{what}: {proto.ByteSize()} bytes do not fit one ONNX file (2 GiB protobuf limit)")
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelError(f"{what}: initializer {tensor.name} points at external data; expected one file")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"{what}: fails onnx.checker ({exc})") from None


def set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replace `metadata_props` with `props` (keys unique by construction: a dict)."""
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
