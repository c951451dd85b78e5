"""One exported graph, every consumer: the shipped model and the decode in OpenCV DNN, ONNX Runtime without graph
optimisations and onnx's full checker; every op on TensorRT 10's parser list (docs/DESIGN.md, section 6).
Exports of fresh tiny models are checked in test_export.py (regression) and test_heads.py (pip)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO, SAMPLES

onnx = pytest.importorskip("onnx")
cv2 = pytest.importorskip("cv2")

from facemark.contract import CropContract  # noqa: E402
from facemark.export.consumers import (  # noqa: E402
    check_consumers,
    decode_nodes,
    not_on_tensorrt_list,
    op_inventory,
    sample_face_crops,
)
from facemark.metadata import CONTRACT, PRECISION  # noqa: E402
from facemark.runtime.landmarker import DEFAULT_MODEL_PATH  # noqa: E402

# The shipped file's decode tail had 91 nodes of shape arithmetic and floor division before it was rewritten in
# plain ops (decode_nodes on the previous facemark-68.onnx).
DECODE_NODES_BEFORE = 91
SHAPE_ARITHMETIC_OPS = {"Shape", "Xor", "Mod", "Where", "Not", "And", "Equal", "Less", "Expand", "ConstantOfShape"}


@pytest.fixture(scope="module")
def shipped():
    proto = onnx.load(str(DEFAULT_MODEL_PATH))
    props = {p.key: p.value for p in proto.metadata_props}
    return proto, props


def test_shipped_model_runs_in_every_consumer_within_its_gate(shipped):
    proto, props = shipped
    crops = sample_face_crops(CropContract.from_json(props[CONTRACT]))
    report = check_consumers(proto, crops, props[PRECISION])
    rows = {r["name"]: r for r in report["consumers"]}
    assert set(rows) == {"onnx.checker full_check", "onnxruntime ORT_ENABLE_ALL", "onnxruntime ORT_DISABLE_ALL",
                         "opencv dnn"}
    assert all(r["loads"] for r in rows.values()), [r["error"] for r in rows.values() if not r["loads"]]
    for name in ("onnxruntime ORT_DISABLE_ALL", "opencv dnn"):
        assert rows[name]["agrees"], (name, rows[name], report["gate"])
    assert rows["onnxruntime ORT_ENABLE_ALL"]["quantized_kernels"] is True  # int8 runs int8 kernels in ORT


@pytest.fixture(scope="module")
def reexported(tmp_path_factory) -> dict:
    """The shipped network (read back from the file by `train --init`'s reader) exported at each precision."""
    pytest.importorskip("torch")
    from facemark.export.exporter import export_model
    from facemark.train.checkpoint import save_checkpoint
    from facemark.train.model import build_model
    from facemark.train.onnx_init import checkpoint_from_onnx

    out = tmp_path_factory.mktemp("reexport")
    doc = checkpoint_from_onnx(DEFAULT_MODEL_PATH)
    model = build_model(doc["model"])
    model.load_state_dict(doc["state_dict"])
    checkpoint = out / "shipped.pt"
    save_checkpoint(checkpoint, model.eval(), CropContract.from_dict(doc["contract"]), doc["train"], doc["metrics"])
    return {p: export_model(checkpoint, out / f"shipped.{p}.onnx", precision=p, calib_data=[SAMPLES / "landmarks.xml"])
            for p in ("fp32", "fp16", "int8")}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_shipped_weights_exported_again_run_in_every_consumer(reexported, precision):
    """Full, half and int8 precision of the trained network: every consumer loads the file and agrees with ORT
    within the precision's gate."""
    rows = {r["name"]: r for r in reexported[precision].report["consumers"]["consumers"]}
    assert all(r["loads"] for r in rows.values()), [r["error"] for r in rows.values()]
    assert rows["opencv dnn"]["agrees"] and rows["onnxruntime ORT_DISABLE_ALL"]["agrees"], rows


CV5_PYTHON = REPO / ".venv-cv5" / "bin" / "python"
CV5_SCRIPT = """
import sys, numpy as np, cv2
x, ref = np.load(sys.argv[2]), np.load(sys.argv[3])
net = cv2.dnn.readNetFromONNX(sys.argv[1])
net.setInput(x)
out = net.forward("landmarks").reshape(ref.shape)
print(cv2.__version__, float(np.percentile(np.abs(out - ref), 99)), float(np.abs(out - ref).max()))
"""


@pytest.mark.skipif(not CV5_PYTHON.is_file(), reason=".venv-cv5 absent: `make test` creates it (OpenCV 5 + numpy)")
def test_opencv_5_loads_the_shipped_model_and_every_precision(reexported, tmp_path):
    """A second OpenCV major (5.x, in a venv of its own: it needs numpy 2) loads each file and agrees with ORT."""
    import subprocess

    import onnxruntime as ort

    from facemark.export.consumers import agreement_limit

    files = {"shipped int8": (DEFAULT_MODEL_PATH, "int8"),
             **{f"re-exported {p}": (r.path, p) for p, r in reexported.items()}}
    for label, (path, precision) in files.items():
        proto = onnx.load(str(path))
        crops = sample_face_crops(CropContract.from_json({p.key: p.value for p in proto.metadata_props}[CONTRACT]))
        ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["landmarks"],
                                                                                    {"image": crops})[0]
        np.save(tmp_path / "x.npy", crops)
        np.save(tmp_path / "ref.npy", ref)
        done = subprocess.run([str(CV5_PYTHON), "-c", CV5_SCRIPT, str(path), str(tmp_path / "x.npy"),
                               str(tmp_path / "ref.npy")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (label, done.stderr[-1500:])
        version, p99, largest = done.stdout.split()
        stat, limit = agreement_limit(precision)
        assert version.startswith("5.") and float(p99 if stat == "p99_abs" else largest) <= limit, (label, done.stdout)


def test_shipped_decode_is_plain_ops_on_the_tensorrt_list(shipped):
    proto, _ = shipped
    assert not_on_tensorrt_list(proto) == []
    assert not SHAPE_ARITHMETIC_OPS & set(op_inventory(proto))
    assert len(decode_nodes(proto)) <= DECODE_NODES_BEFORE // 4


def test_an_op_off_the_tensorrt_list_is_named():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mod", ["a", "b"], ["m"]), helper.make_node("Relu", ["m"], ["y"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.INT64, [2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2])])
    assert not_on_tensorrt_list(helper.make_model(graph)) == ["Mod"]


def test_pip_decode_equals_a_per_point_reference():
    """The plain-op decode (one gather, a cell table, one matrix) is the PIP decode: argmax cell + own offset,
    averaged with the neighbours' votes, computed here point by point in numpy."""
    torch = pytest.importorskip("torch")
    from facemark.train.codecs import nearest_neighbors
    from facemark.train.head_pip import PipCodec

    rng = np.random.default_rng(0)
    grid, p, k, n = 8, 68, 10, 3
    neighbors = nearest_neighbors(rng.uniform(size=(p, 2)), k)
    codec = PipCodec(grid, neighbors)
    raw = {"scores": rng.normal(size=(n, p, grid, grid)), "offsets": rng.uniform(size=(n, 2 * p, grid, grid)),
           "neighbors": rng.normal(size=(n, 2 * p * k, grid, grid))}
    decoded = codec.decode({key: torch.tensor(v, dtype=torch.float32) for key, v in raw.items()})

    expected = np.zeros((n, p, 2))
    for b in range(n):
        cells = raw["scores"][b].reshape(p, -1).argmax(axis=1)
        estimates = [[] for _ in range(p)]
        for i in range(p):
            cy, cx = divmod(int(cells[i]), grid)
            flat = lambda channel, b=b, c=int(cells[i]): raw_flat(raw, b, channel, c)  # noqa: E731
            estimates[i].append((cx + flat(("offsets", i)), cy + flat(("offsets", p + i))))
            for m, j in enumerate(neighbors[i]):
                estimates[j].append((cx + flat(("neighbors", i * k + m)), cy + flat(("neighbors", p * k + i * k + m))))
        expected[b] = [np.mean(e, axis=0) / grid - 0.5 for e in estimates]
    np.testing.assert_allclose(decoded["landmarks"].numpy(), expected, atol=1e-5)
    best = raw["scores"].reshape(n, p, -1).max(axis=2)
    np.testing.assert_allclose(decoded["landmark_scores"].numpy(), 1 / (1 + np.exp(-best)), atol=1e-6)


def raw_flat(raw: dict, batch: int, channel: tuple[str, int], cell: int) -> float:
    name, index = channel
    return float(raw[name][batch, index].reshape(-1)[cell])
