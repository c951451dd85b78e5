"""Smaller / faster variants of an fp32 ONNX model: fp16 (weights and math), fp16w (fp16 weights, fp32 math)
and static int8 QDQ.

fp16w: every float initializer stored as fp16 behind a Cast to fp32. ONNX Runtime folds the Casts when the
session loads, so the file is half the size of fp32 and the arithmetic is fp32 -- the variant for x86 CPUs,
whose ONNX Runtime kernels have no fast fp16 path (there fp16 math runs slower than fp32).

fp16: onnxruntime's `convert_float_to_float16` with `keep_io_types=True`, so the interface stays float32
[N,1,S,S] -> [N,68,2] and the runtime feeds every variant the same tensor.

int8: `quant_pre_process` (symbolic shape inference + ORT graph optimisation, which folds what quantization
should not see), then static `quantize_static` in QDQ format with per-channel int8 weights. Activations are
QUInt8 (U8S8): measured on this 2-core AVX-512 VNNI EPYC with ORT 1.31 on one thread (ResNet18 at 96 px, batch
1) U8S8 ran 4.4 ms against 8.7 ms for S8S8 (fp32: 10.8 ms), with the same error (p99 1.95 px of the crop, NME
+0.05 points on 60 300-W validation faces). Caveat: on x86 CPUs without VNNI, U8S8 can saturate; the parity
gates run on the exporting machine's CPU, so export on the kind of CPU you deploy to, or pass
`activation_type="int8"`. Calibration: the 99.9th percentile of each activation's histogram over real face
crops made by the runtime's own preprocessing (`CropContract.prepare` on landmark boxes), `CALIBRATION_FACES`
of them (fewer when fewer are given). Measured on the trained 160 px model (300-W validation split, fp32 ONNX
5.54 % NME): MinMax 6.24 %, Entropy 6.23 %, percentile 99.999 6.06 %, 99.99 5.80 %, 99.9 5.60 %, 99.5 5.98 %;
keeping the final Gemm in fp32 changed nothing (6.23 %), so the whole graph is quantized.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

from facemark.errors import FacemarkError
from facemark.metadata import INPUT_NAME

CALIBRATION_FACES = 256
CALIBRATION_METHOD = "Percentile 99.9"
CALIBRATION_FALLBACK = "MinMax"  # where the percentile histogram cannot be built (to_int8)
CALIBRATION_PERCENTILE = 99.9
CALIBRATION_BATCH = 16
# The presence layer (node /presence_fc/Gemm) stays fp32: a quantised presence score floors near 0.5 on
# non-faces, and OpenCV DNN 4.x computes a quantised output layer wrongly (max abs 1.47 on `landmarks` of a
# regression int8 file, every layer before it exact). Each head names its own output layers
# (facemark.train.heads.HeadUnit.fp32_modules).
PRESENCE_MODULES = ("presence_fc",)
# The stem (7x7 conv1 on the raw image, and its max-pool) stays fp32: on the pip model quantising conv1 alone
# cost +0.74 NME points (its per-tensor output range is dominated by a few channels); kept fp32 the whole int8
# model is +0.02 points. It is ~1 % of the network's arithmetic.
FP32_STEM_NODES = ("/conv1/Conv", "/maxpool/MaxPool")


FP16_WEIGHTS_MIN_ELEMENTS = 64  # smaller tensors (shapes, biases of tiny layers) stay fp32: no size to save


def to_fp16_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 storage of the float weights, each followed by a Cast back to fp32 (folded by ORT at load)."""
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    casts = []
    for index, init in enumerate(list(graph.initializer)):
        if init.data_type != TensorProto.FLOAT or np.prod(init.dims) < FP16_WEIGHTS_MIN_ELEMENTS:
            continue
        name = init.name  # before the CopyFrom below rewrites `init` in place
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{name}__fp16")
        graph.initializer[index].CopyFrom(half)
        casts.append(helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT, name=f"{name}__to_fp32"))
    nodes = casts + list(graph.node)  # Casts first: the graph stays topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(proto, keep_io_types=True))
    converted.topological_sort()  # the converter appends the input/output Casts at the end of the graph
    return fold_constant_casts(converted.model)


def fold_constant_casts(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each Cast of a constant (initializer or Constant node) by the cast value as an initializer. The
    fp16 converter stores Resize's scales as fp16 behind a Cast back to fp32; consumers that need the scales as
    a constant (OpenCV DNN 5) then fail."""
    from onnx import helper, numpy_helper

    from facemark.train.onnx_init import graph_constants

    constants = graph_constants(proto.graph)
    kept = []
    for node in proto.graph.node:
        if node.op_type == "Cast" and node.input and node.input[0] in constants:
            to = next(a.i for a in node.attribute if a.name == "to")
            value = constants[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(to))
            proto.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        else:
            kept.append(node)
    used = {name for node in kept for name in node.input} | {o.name for o in proto.graph.output}
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]  # Constants only the Casts read
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    for tensor in [t for t in proto.graph.initializer if t.name not in used]:
        proto.graph.initializer.remove(tensor)
    return proto


class _CropReader:
    """onnxruntime's CalibrationDataReader over a stack of network inputs (N, 1, S, S), in small batches."""

    def __init__(self, crops: np.ndarray, batch: int | None) -> None:
        self._crops = crops
        self._batch = batch
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        step = self._batch or CALIBRATION_BATCH
        crops = self._crops
        # Full batches only: a fixed batch axis needs them, and ORT's histogram calibrators stack the batches
        # (np.asarray) so a short last one breaks them. Repeat faces to fill the last batch.
        crops = crops[np.arange(-(-len(crops) // step) * step) % len(crops)]
        for start in range(0, len(crops), step):
            yield {INPUT_NAME: np.ascontiguousarray(crops[start : start + step], dtype=np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


def to_int8(proto: onnx.ModelProto, calibration_crops: np.ndarray, batch: int | None = None,
            activation_type: str = "uint8", say: Callable[[str], None] | None = None
            ) -> tuple[onnx.ModelProto, str]:
    """Static QDQ int8 model calibrated on `calibration_crops` (N, 1, S, S) float32 network inputs, and the
    calibration method that made it.

    activation_type: "int8" (S8S8), "uint8" (U8S8) or "uint8-7bit" (U8S8 with 7-bit weights, ORT's
    reduce_range: the u8 x s8 pair sums of AVX2 kernels without VNNI cannot saturate, so U8S8's fast kernels
    stay exact on those CPUs).

    The percentile calibrator builds a histogram of every activation; an activation whose range is degenerate (a
    dead or constant channel of a briefly fine-tuned model: NumPy 2 refuses "Too many bins for data range",
    non-finite values) makes it raise. Then the activation ranges are calibrated by MinMax instead (said through
    `say`); a failure of that too is one FacemarkError line."""
    failures = []
    for method in (CALIBRATION_METHOD, CALIBRATION_FALLBACK):
        try:
            return _quantize(proto, calibration_crops, batch, activation_type, method), method
        except Exception as exc:  # noqa: BLE001 -- ORT's calibrators raise ValueError, RuntimeError, AssertionError
            detail = " ".join(str(exc).split())[:200] or exc.__class__.__name__
            failures.append(f"{method}: {exc.__class__.__name__}: {detail}")
            if say and method == CALIBRATION_METHOD:
                say(f"int8 calibration by {method} failed ({failures[-1]}); calibrating by {CALIBRATION_FALLBACK}")
    raise FacemarkError("int8 quantization failed (" + "; ".join(failures) + "): export at --precision fp16 or "
                        "fp32, or calibrate on other faces (--calib-data)")


def _quantize(proto: onnx.ModelProto, calibration_crops: np.ndarray, batch: int | None, activation_type: str,
              method: str) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not np.isfinite(calibration_crops).all():
        raise ValueError("non-finite values in the calibration inputs")
    reader_cls = type("CropCalibrationReader", (_CropReader, CalibrationDataReader), {})
    activations = QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8
    calibrator = {CALIBRATION_METHOD: (CalibrationMethod.Percentile, {"CalibPercentile": CALIBRATION_PERCENTILE}),
                  CALIBRATION_FALLBACK: (CalibrationMethod.MinMax, {})}[method]
    # quantize_static writes uuid-named external-data files into the current folder: keep them in `tmp`.
    with tempfile.TemporaryDirectory(prefix="facemark-int8-") as tmp, contextlib.chdir(tmp):
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        onnx.save(proto, src)
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001 -- ORT's symbolic shape inference gives up on the pip decode (a bare
            # Exception); ONNX's own shape inference, which quant_pre_process then runs, is enough for QDQ.
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        # ORT's calibrator prints progress ("Collecting tensor data ...") on stdout, which is the CLI's output.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(pre), str(out), reader_cls(calibration_crops, batch),
                quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                activation_type=activations, calibrate_method=calibrator[0],
                reduce_range=activation_type == "uint8-7bit",
                nodes_to_exclude=fp32_nodes(onnx.load(pre)),
                extra_options=calibrator[1],
            )
        return drop_unused_opsets(onnx.load(out))


def fp32_nodes(proto: onnx.ModelProto) -> list[str]:
    """Every node int8 leaves in fp32: the stem (FP32_STEM_NODES) and the pip head with its decode."""
    stem = [n.name for n in proto.graph.node if n.name in FP32_STEM_NODES]
    return sorted(set(stem + fp32_head_nodes(proto)))


def fp32_output_modules() -> tuple[str, ...]:
    """Node-name parts of the output layers int8 keeps fp32: every head's (facemark.train.heads) + presence."""
    from facemark.train.heads import fp32_head_modules

    return fp32_head_modules() + PRESENCE_MODULES


def fp32_head_nodes(proto: onnx.ModelProto) -> list[str]:
    """The nodes int8 leaves in fp32: the output layers (fp32_output_modules) and everything downstream of them
    (a head's decode)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    modules = fp32_output_modules()
    seeds = [n for n in proto.graph.node if any(h in n.name for h in modules)]
    keep, stack = {}, list(seeds)
    while stack:
        node = stack.pop()
        if node.name in keep:
            continue
        keep[node.name] = node
        for out in node.output:
            stack.extend(consumers.get(out, []))
    return sorted(keep)


def drop_unused_opsets(proto: onnx.ModelProto) -> onnx.ModelProto:
    """quant_pre_process's ORT optimisation declares every ORT domain; keep the default one and those used."""
    used = {node.domain for node in proto.graph.node} | {"", "ai.onnx"}
    kept = [entry for entry in proto.opset_import if entry.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto
