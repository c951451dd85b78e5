"""PyTorch -> ONNX (fp32): the graph, its interface (docs/DESIGN.md section 4) and its checks.

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
from facemark.metadata import FACE_SCORE, INPUT_NAME, LANDMARK_SCORES, OUTPUT_NAME
from facemark.scheme import NUM_POINTS
from facemark.train.model import ExportGraph

DEFAULT_OPSET = 17
BATCH_DIM = "batch"
MAX_PROTOBUF_BYTES = 2**31 - 1  # one self-contained file: no external-data sidecar possible above this


# Every output the graph may have (docs/DESIGN.md section 4), with its shape after the batch axis.
OUTPUT_SHAPES: dict[str, tuple[int, ...]] = {OUTPUT_NAME: (NUM_POINTS, 2), LANDMARK_SCORES: (NUM_POINTS,),
                                             FACE_SCORE: ()}


def export_fp32(model: torch.nn.Module, size: int, opset: int = DEFAULT_OPSET,
                batch: int | None = None) -> onnx.ModelProto:
    """Trace `model` (eval mode) to an ONNX model: input `image` [N,1,S,S], outputs `landmarks` [N,68,2] and,
    for heads that have them, `landmark_scores` [N,68] and `face_score` [N] (LandmarkNet.output_names).

    `batch=None` gives a dynamic batch axis; an int fixes it.
    """
    model = model.eval()
    names = list(getattr(model, "output_names", [OUTPUT_NAME]))
    # The wrapper in eval mode too: the exporter restores the traced module's mode afterwards, and a wrapper left in
    # train mode would put the caller's model back in train mode with it.
    graph = ExportGraph(model).eval() if hasattr(model, "output_names") else model
    example = torch.zeros(batch or 1, 1, size, size, dtype=torch.float32)
    dynamic_axes = {name: {0: BATCH_DIM} for name in (INPUT_NAME, *names)} if batch is None else None
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the decode's shape arithmetic is constant
        torch.onnx.export(graph, (example,), buffer, input_names=[INPUT_NAME], output_names=names,
                          opset_version=opset, dynamic_axes=dynamic_axes, do_constant_folding=True,
                          dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    _fix_output_shapes(proto, batch)
    check_model(proto, opset, "exported model")
    return proto


def _fix_output_shapes(proto: onnx.ModelProto, batch: int | None) -> None:
    """The tracer names derived output dims symbolically; declare the real ones ([N, 68, 2], [N, 68], [N])."""
    for output in proto.graph.output:
        shape = output.type.tensor_type.shape
        del shape.dim[:]
        first = shape.dim.add()
        if batch is None:
            first.dim_param = BATCH_DIM
        else:
            first.dim_value = batch
        for value in OUTPUT_SHAPES[output.name]:
            shape.dim.add().dim_value = value


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
