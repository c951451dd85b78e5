"""Where an exported file runs: the consumer check `facemark export` runs after the parity gate, and the op
inventory against TensorRT's ONNX parser (docs/DESIGN.md, section 6).

Consumers, each fed the same real face crops, compared on `landmarks` with ONNX Runtime at its default graph
optimisation (ORT_ENABLE_ALL: what facemark's runtime runs), which is the reference:
- `onnx.checker` with full_check (shape inference over the whole graph);
- ONNX Runtime with ORT_DISABLE_ALL: the graph exactly as written, no fusion or constant folding;
- OpenCV DNN (`cv2.dnn.readNetFromONNX`), when OpenCV is importable.

For int8 each consumer also says whether it runs quantised kernels or simulates the Q/DQ pairs in float:
ONNX Runtime's optimised graph (QLinear* / *Integer nodes) or OpenCV's layer types (*Int8) tell.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from facemark.metadata import INPUT_NAME, OUTPUT_NAME

CONSUMER_FACES = 32  # real crops compared per consumer
TIMED_RUNS = 20  # batch-1 calls timed per consumer (after WARMUP_RUNS)
WARMUP_RUNS = 3
REFERENCE = "onnxruntime ORT_ENABLE_ALL"

# ONNX operators that TensorRT 10's ONNX parser supports, limited to those a facemark export can contain,
# with the restriction that matters here. Source: onnx/onnx-tensorrt, docs/operators.md of the release/10.x
# branches ("Supported ONNX Operators"). An op missing here fails tests/test_consumers.py.
TENSORRT10_OPS: dict[str, str] = {
    "Add": "", "ArgMax": "FP32/FP16 input", "Cast": "", "Concat": "", "Constant": "", "Conv": "weights an initializer",
    "DequantizeLinear": "zero point must be 0 (symmetric int8)", "Div": "", "Flatten": "", "Gather": "",
    "GatherElements": "", "Gemm": "", "GlobalAveragePool": "", "Identity": "", "MatMul": "", "MaxPool": "",
    "Mul": "", "QuantizeLinear": "zero point must be 0 (symmetric int8)", "ReduceMax": "", "Relu": "",
    "Reshape": "", "Resize": "nearest/linear", "Sigmoid": "", "Slice": "", "Squeeze": "", "Sub": "",
    "Transpose": "", "Unsqueeze": "",
}


def op_inventory(proto: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the graph has (default domain shown bare, others as domain.op)."""
    return dict(sorted(Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                               for n in proto.graph.node).items()))


def not_on_tensorrt_list(proto: onnx.ModelProto) -> list[str]:
    return sorted(op for op in op_inventory(proto) if op not in TENSORRT10_OPS)


def tensorrt_notes(proto: onnx.ModelProto) -> list[str]:
    """Restrictions of TENSORRT10_OPS that this graph breaks (asymmetric int8 activations, say)."""
    init = {t.name: t for t in proto.graph.initializer}
    notes = []
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = init.get(node.input[2])
            if zero is not None and np.any(onnx.numpy_helper.to_array(zero) != 0):
                notes.append("int8 activations have non-zero zero points (asymmetric): TensorRT's parser needs "
                             "symmetric int8; give TensorRT the fp32 or fp16 file")
                break
    return notes


def decode_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The decode tail: every node downstream of the output layers (facemark.export.variants.fp32_head_nodes),
    without those layers (the head convolutions, the fully connected layers) themselves."""
    from facemark.export.variants import fp32_head_nodes, fp32_output_modules

    names = set(fp32_head_nodes(proto))
    return [n for n in proto.graph.node if n.name in names and not (
        n.op_type in ("Conv", "Gemm") and any(h in n.name for h in fp32_output_modules()))]


def agreement_limit(precision: str) -> tuple[str, float]:
    """(statistic, limit in normalised units) a consumer must meet against the reference: the parity gate of
    the precision (facemark.export.precisions.PRECISIONS) on real faces."""
    from facemark.export.precisions import PRECISIONS

    gate = PRECISIONS[precision].gate
    return gate.stat, gate.normalised_limit()


def check_consumers(proto: onnx.ModelProto, crops: np.ndarray, precision: str) -> dict:
    """Run every consumer on `crops` (N, 1, S, S) and compare `landmarks` with the reference.

    Returns {"reference", "faces", "gate", "consumers": [{name, version, loads, error, max_abs, mean_abs, p99_abs,
    agrees, ms_per_face, quantized_kernels}], "ops", "decode_nodes", "tensorrt": {...}}; a consumer that fails
    is reported, never raised."""
    fixed = _fixed_batch(proto)
    crops = _fit_batch(np.ascontiguousarray(crops[:CONSUMER_FACES], dtype=np.float32), fixed)
    batch = fixed or len(crops)  # crops per call: the static batch, or all at once
    stat, limit = agreement_limit(precision)
    data = proto.SerializeToString()
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    rows = [_checker_row(proto)]
    reference, ref_row = _ort_row(data, crops, batch, "ORT_ENABLE_ALL", quantized)
    rows.append(ref_row)
    _, row = _ort_row(data, crops, batch, "ORT_DISABLE_ALL", quantized, reference)
    rows.append(row)
    rows.append(_opencv_row(data, crops, batch, quantized, reference))
    for row in rows:
        if row.get(stat) is not None:
            row["agrees"] = bool(row[stat] <= limit)
    missing = not_on_tensorrt_list(proto)
    return {"reference": REFERENCE, "faces": int(len(crops)), "gate": {"stat": stat, "limit": limit},
            "consumers": rows, "ops": op_inventory(proto),
            "decode_nodes": len(decode_nodes(proto)),
            "tensorrt": {"ops_not_supported": missing, "notes": tensorrt_notes(proto),
                         "list": "TensorRT 10 ONNX parser (onnx-tensorrt docs/operators.md)"}}


def consumers_summary(report: dict) -> dict:
    """The compact form stored in the model's metadata (facemark.consumers)."""
    return {"reference": report["reference"], "faces": report["faces"],
            "consumers": {r["name"]: {k: r[k] for k in ("version", "loads", "agrees", "max_abs", "p99_abs",
                                                        "ms_per_face", "quantized_kernels") if r.get(k) is not None}
                          for r in report["consumers"]},
            "tensorrt_ops_not_supported": report["tensorrt"]["ops_not_supported"]}


def summary_lines(report: dict) -> list[str]:
    lines = []
    for r in report["consumers"]:
        if not r["loads"]:
            lines.append(f"{r['name']} {r['version']}: FAILS ({r['error']})")
            continue
        parts = [f"{r['name']} {r['version']}: loads"]
        if r.get("max_abs") is not None:
            verdict = "agrees" if r.get("agrees") else "DISAGREES"
            parts.append(f"{verdict} with {report['reference']}: landmarks max {r['max_abs']:.2g}, "
                         f"p99 {r['p99_abs']:.2g}, mean {r['mean_abs']:.2g}")
        if r.get("ms_per_face") is not None:
            parts.append(f"{r['ms_per_face']:.2f} ms/face")
        if r.get("quantized_kernels") is not None:
            parts.append("int8 kernels" if r["quantized_kernels"] else "Q/DQ simulated in float")
        lines.append(", ".join(parts))
    trt = report["tensorrt"]
    lines.append("TensorRT 10 op list: " + (f"NOT supported: {', '.join(trt['ops_not_supported'])}"
                                             if trt["ops_not_supported"] else "every op supported")
                 + "".join(f"; {n}" for n in trt["notes"]))
    return lines


# --- consumers ---------------------------------------------------------------------------------------------
def _row(name: str, version: str, **values) -> dict:
    return {"name": name, "version": version, "loads": True, "error": None, "agrees": None, "max_abs": None,
            "p99_abs": None, "mean_abs": None, "ms_per_face": None, "quantized_kernels": None, **values}


def _checker_row(proto: onnx.ModelProto) -> dict:
    try:
        onnx.checker.check_model(proto, full_check=True)
        return _row("onnx.checker full_check", onnx.__version__)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return _row("onnx.checker full_check", onnx.__version__, loads=False, error=_one_line(exc))


def _ort_row(data: bytes, crops: np.ndarray, batch: int, level: str, quantized: bool,
             reference: np.ndarray | None = None) -> tuple[np.ndarray | None, dict]:
    import onnxruntime as ort

    name = f"onnxruntime {level}"
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = _threads()
    options.log_severity_level = 3  # saving the optimised graph warns that it is machine-specific: we know
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        if quantized:  # the optimised graph tells whether int8 kernels run; nothing to learn from it otherwise
            options.optimized_model_filepath = str(optimized)
        try:
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 -- ORT raises its own types for a graph it cannot load
            return None, _row(name, ort.__version__, loads=False, error=_one_line(exc))
        kernels = _ort_runs_int8(onnx.load(str(optimized))) if quantized and optimized.exists() else None
    run = lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]  # noqa: E731
    landmarks = _batched(run, crops, batch)
    values = _compare(landmarks, reference if reference is not None else landmarks)
    return landmarks, _row(name, ort.__version__, ms_per_face=_time_per_face(run, crops, batch),
                           quantized_kernels=kernels, **values)


def _ort_runs_int8(optimized: onnx.ModelProto) -> bool:
    return any(n.op_type.startswith("QLinear") or n.op_type.endswith("Integer") for n in optimized.graph.node)


def _opencv_row(data: bytes, crops: np.ndarray, batch: int, quantized: bool, reference: np.ndarray | None) -> dict:
    try:
        import cv2
    except ImportError:
        return _row("opencv dnn", "-", loads=False, error="OpenCV is not installed")
    threads = cv2.getNumThreads()
    cv2.setNumThreads(_threads())
    try:
        net = cv2.dnn.readNetFromONNX(np.frombuffer(data, np.uint8))
        layer_types = set(net.getLayerTypes())

        def run(x: np.ndarray) -> np.ndarray:
            net.setInput(x)
            return net.forward(OUTPUT_NAME)

        landmarks = _batched(run, crops, batch).reshape(len(crops), -1, 2)
        if reference is None:
            return _row("opencv dnn", cv2.__version__, error="no reference output")
        return _row("opencv dnn", cv2.__version__, ms_per_face=_time_per_face(run, crops, batch),
                    quantized_kernels=any(t.endswith("Int8") for t in layer_types) if quantized else None,
                    **_compare(landmarks, reference))
    except cv2.error as exc:
        return _row("opencv dnn", cv2.__version__, loads=False, error=_one_line(exc))
    finally:
        cv2.setNumThreads(threads)


def _fixed_batch(proto: onnx.ModelProto) -> int | None:
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value or None


def _fit_batch(crops: np.ndarray, batch: int | None) -> np.ndarray:
    """A static-batch model takes exactly `batch` crops: repeat them up to a whole number of batches."""
    if batch is None or len(crops) == 0:
        return crops
    whole = max(1, len(crops) // batch) * batch
    return np.resize(crops, (whole, *crops.shape[1:])).astype(np.float32)


def _batched(run, crops: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([run(crops[i:i + batch]) for i in range(0, len(crops), batch)])


def _compare(landmarks: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(landmarks.reshape(reference.shape).astype(np.float64) - reference)
    if not np.all(np.isfinite(diff)):
        return {"max_abs": float("inf"), "p99_abs": float("inf"), "mean_abs": float("inf")}
    return {"max_abs": float(diff.max()), "p99_abs": float(np.percentile(diff, 99)), "mean_abs": float(diff.mean())}


def _time_per_face(run, crops: np.ndarray, batch: int) -> float:
    """ms per face at batch 1 (a dynamic model) or at the model's fixed batch, divided by it."""
    one = crops[:1] if batch == len(crops) else crops[:batch]
    for _ in range(WARMUP_RUNS):
        run(one)
    start = time.perf_counter()
    for _ in range(TIMED_RUNS):
        run(one)
    return (time.perf_counter() - start) / TIMED_RUNS * 1000.0 / len(one)


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:300]}"


def sample_face_crops(contract) -> np.ndarray:
    """The bundled sample faces on their landmark boxes, cropped by `contract` (a CropContract)."""
    import facemark
    from facemark.contract import box_from_landmarks
    from facemark.data import load_records
    from facemark.imageio import read_gray

    samples = Path(facemark.__file__).parent / "assets" / "samples" / "landmarks.xml"
    crops = [contract.prepare(read_gray(r.image_path), [box_from_landmarks(r.landmarks)])[0]
             for r in load_records([samples], lambda _m: None)]
    return np.concatenate(crops)


def main(argv: list[str] | None = None) -> int:
    """`python -m facemark.export.consumers MODEL.onnx ...`: the consumer check of exported files, on the
    bundled sample faces, one Markdown row per consumer (docs/BENCHMARKS.md, "Where the exported file runs")."""
    import argparse

    from facemark.contract import CropContract
    from facemark.metadata import CONTRACT, PRECISION

    parser = argparse.ArgumentParser(prog="python -m facemark.export.consumers", description=main.__doc__)
    parser.add_argument("models", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print("| file | precision | consumer | version | loads | agrees (gate) | max / p99 abs diff | ms per face | "
          "int8 kernels |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.models:
        proto = onnx.load(str(path))
        props = {p.key: p.value for p in proto.metadata_props}
        precision = props.get(PRECISION, "fp32")
        report = check_consumers(proto, sample_face_crops(CropContract.from_json(props[CONTRACT])), precision)
        gate = f"{report['gate']['stat']} <= {report['gate']['limit']:.2g}"
        for r in report["consumers"]:
            diff = "-" if r["max_abs"] is None else f"{r['max_abs']:.2g} / {r['p99_abs']:.2g}"
            agrees = "-" if r["agrees"] is None else ("yes" if r["agrees"] else "NO") + f" ({gate})"
            ms = "-" if r["ms_per_face"] is None else f"{r['ms_per_face']:.2f}"
            kernels = {None: "-", True: "yes", False: "no (Q/DQ in float)"}[r["quantized_kernels"]]
            loads = "yes" if r["loads"] else f"NO: {r['error']}"
            print(f"| {path.name} | {precision} | {r['name']} | {r['version']} | {loads} | {agrees} | {diff} | {ms} "
                  f"| {kernels} |")
        trt = report["tensorrt"]
        print(f"| {path.name} | {precision} | TensorRT 10 op list | - | "
              f"{'every op listed' if not trt['ops_not_supported'] else ', '.join(trt['ops_not_supported'])} | "
              f"{'; '.join(trt['notes']) or '-'} | - | - | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
