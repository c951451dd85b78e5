"""facemark export: opset 17 + checker + dynamic batch, metadata round trip, parity reports per precision,
the failure path (nothing left at the output), and the CLI. Each precision is exported once per module."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from conftest import SAMPLES, TINY_SIZE  # noqa: E402

from facemark import metadata as meta  # noqa: E402
from facemark.cli import run  # noqa: E402
from facemark.contract import CropContract  # noqa: E402
from facemark.errors import FacemarkError, ParityError  # noqa: E402
from facemark.export import exporter  # noqa: E402
from facemark.export.exporter import ExportResult, export_model, report_path  # noqa: E402
from facemark.export.parity import OnnxPredictor, error_stats, open_session  # noqa: E402
from facemark.export.precisions import PRECISIONS  # noqa: E402
from facemark.train.checkpoint import file_sha256  # noqa: E402

ALL_PRECISIONS = tuple(PRECISIONS)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory) -> dict[str, ExportResult]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("export")
    return {p: export_model(tiny_checkpoint, out / f"tiny.{p}.onnx", precision=p) for p in ALL_PRECISIONS}


def _faces(n: int) -> np.ndarray:
    """Real network inputs: crops of the bundled sample faces through the runtime's preprocessing."""
    from facemark.data import load_records

    records = load_records([SAMPLES / "landmarks.xml"], lambda _m: None)[:n]
    return exporter.face_crops(records, CropContract(size=TINY_SIZE), lambda _m: None)


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_file_declares_opset_17_passes_checker_and_has_the_interface(exported, precision):
    result = exported[precision]
    model = onnx.load(result.path)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    onnx.checker.check_model(model, full_check=True)
    assert result.size_bytes == result.path.stat().st_size
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == meta.INPUT_NAME and out.name == meta.OUTPUT_NAME
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", 1, TINY_SIZE, TINY_SIZE] and out_dims == ["batch", 68, 2]



@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_every_variant_runs_in_every_consumer_within_its_gate(exported, precision):
    """OpenCV DNN, ORT without graph optimisations and onnx's full checker load each export and agree with ORT
    within the precision's parity gate; every op is on TensorRT 10's parser list; metadata says so."""
    from facemark.export.consumers import not_on_tensorrt_list

    report = exported[precision].report["consumers"]
    rows = {r["name"]: r for r in report["consumers"]}
    assert all(r["loads"] for r in rows.values()), [r["error"] for r in rows.values()]
    assert rows["opencv dnn"]["agrees"] and rows["onnxruntime ORT_DISABLE_ALL"]["agrees"], rows
    proto = onnx.load(str(exported[precision].path))
    assert not_on_tensorrt_list(proto) == []
    stored = json.loads({p.key: p.value for p in proto.metadata_props}[meta.CONSUMERS])
    assert set(stored["consumers"]) == set(rows)

def test_variants_really_change_the_weights(exported):
    def initializer_types(precision: str) -> set[int]:
        return {t.data_type for t in onnx.load(exported[precision].path).graph.initializer}

    assert onnx.TensorProto.FLOAT16 in initializer_types("fp16")
    assert onnx.TensorProto.INT8 in initializer_types("int8")
    int8_ops = {n.op_type for n in onnx.load(exported["int8"].path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= int8_ops
    sizes = {p: exported[p].size_bytes for p in ALL_PRECISIONS}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    assert abs(sizes["fp16w"] - sizes["fp16"]) < 0.02 * sizes["fp32"], "fp16w stores the weights as fp16"


def test_fp16w_folds_to_fp32_arithmetic_in_onnx_runtime(exported, tmp_path):
    import onnxruntime as ort

    stored = onnx.load(exported["fp16w"].path)
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in stored.graph.initializer}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(exported["fp16w"].path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    weight_casts = [n for n in optimized.graph.node if n.op_type == "Cast" and n.name.endswith("__to_fp32")]
    assert not weight_casts, "ONNX Runtime folds the weight Casts: the convolutions run on fp32 weights"
    conv_weights = {n.input[1] for n in optimized.graph.node if n.op_type == "Conv"}
    types = {t.name: t.data_type for t in optimized.graph.initializer}
    assert conv_weights and all(types.get(w) == onnx.TensorProto.FLOAT for w in conv_weights)


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_dynamic_batch_runs_at_1_and_5_with_consistent_rows(exported, precision):
    session = open_session(exported[precision].path)
    batch = _faces(5)
    assert batch.shape == (5, 1, TINY_SIZE, TINY_SIZE)
    five = session.run(None, {meta.INPUT_NAME: batch})[0]
    ones = np.concatenate([session.run(None, {meta.INPUT_NAME: batch[i : i + 1]})[0] for i in range(5)])
    assert five.shape == (5, 68, 2) and five.dtype == np.float32
    np.testing.assert_allclose(five, ones, atol=1e-5)


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_metadata_round_trip(exported, tiny_checkpoint, precision):
    model = onnx.load(exported[precision].path)
    props = {p.key: p.value for p in model.metadata_props}
    assert len(props) == len(model.metadata_props)  # keys unique
    # no --calib-data: no calibration; no presence head: no presence record
    assert set(meta.ALL_KEYS) - set(props) == {meta.DETECTOR_CALIBRATION, meta.PRESENCE}
    info = meta.parse_metadata(props, str(exported[precision].path))
    assert info.contract == CropContract(size=TINY_SIZE)
    assert (info.precision, info.points, info.calibration) == (precision, "ibug68", None)
    assert props[meta.FORMAT] == meta.MODEL_FORMAT and props[meta.ARCH] == "resnet18"
    assert props[meta.SOURCE_SHA256] == file_sha256(tiny_checkpoint)
    assert json.loads(props[meta.TRAIN_DATA]) == ["synthetic"]
    assert json.loads(props[meta.VAL_NME]) is None
    assert {"torch", "onnx", "onnxruntime", "facemark"} <= set(json.loads(props[meta.VERSIONS]))
    parity = json.loads(props[meta.PARITY])
    assert parity["verified"] and parity["passed"] and parity["max_abs"] >= 0


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_parity_report_per_precision(exported, precision):
    result = exported[precision]
    report = result.report
    assert result.passed and report["passed"] and report["checked"]
    assert json.loads(report_path(result.path).read_text()) == json.loads(json.dumps(report))
    assert {(s["source"], s["batch"]) for s in report["sets"]} == {("real", 1), ("real", 8), ("random", 1),
                                                                   ("random", 8)}
    for s in report["sets"]:
        stats = s["landmarks"]
        for key in ("max_abs", "mean_abs", "median_abs", "p99_abs", "max_rel", "mean_rel", "median_rel",
                    "p99_rel", "min_atol", "min_rtol", "nan", "inf"):
            assert key in stats
        assert stats["nan"] == stats["inf"] == 0
        assert stats["px"]["max_abs"] == pytest.approx(stats["max_abs"] * TINY_SIZE)
        assert stats["median_abs"] <= stats["p99_abs"] <= stats["max_abs"] == stats["min_atol"]
    assert report["inputs"]["real_faces"] == 16 and report["nme"] is None
    gate = PRECISIONS[precision].gate
    assert report["gate"]["stat"] == gate.stat and all(g["passed"] for g in report["gates"])
    real_max = max(s["landmarks"]["max_abs"] for s in report["sets"] if s["source"] == "real")
    if precision == "fp32":
        assert report["overall"]["max_abs"] <= 1e-4 and len(report["gates"]) == 4
    else:  # a real conversion leaves a measurable, bounded error
        assert 1e-5 < real_max < 0.1
    if precision == "int8":
        assert report["int8"]["calibration_faces"] == 25 and report["int8"]["calibration"] == "Percentile 99.9"


def test_error_stats_are_polygraphy_style():
    ref = np.array([[1.0, -2.0], [0.5, 0.0]])
    cand = np.array([[1.1, -2.0], [0.5, np.nan]])
    stats = error_stats(cand, ref, size=100)
    assert stats["nan"] == 1 and stats["inf"] == 0
    assert stats["max_abs"] == pytest.approx(0.1) and stats["max_rel"] == pytest.approx(0.1)
    assert stats["px"]["max_abs"] == pytest.approx(10.0)


def _perturbed(model):
    """A reference that no longer matches what was exported: the mismatch the gate must catch."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.backbone.fc.bias.add_(0.01)
    return broken.eval()


def test_mismatched_model_fails_the_gate_and_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "reference_model", _perturbed)
    out = tmp_path / "broken.onnx"
    with pytest.raises(ParityError, match="FAILED gate"):
        export_model(tiny_checkpoint, out)
    assert not out.exists()
    report = json.loads(report_path(out).read_text())
    assert report["passed"] is False and report["written"] is False
    assert min(g["value"] for g in report["gates"]) > 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.parity.json"]  # no temp files either


def test_cli_failed_gate_exits_non_zero_without_a_model(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(exporter, "reference_model", _perturbed)
    out = tmp_path / "broken.onnx"
    assert run(["export", str(tiny_checkpoint), "--output", str(out)]) == 2
    assert not out.exists()
    captured = capsys.readouterr()
    assert "FAILED gate" in captured.err and "gates" in captured.out  # one error line + the printed table


def test_cli_static_batch(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "static.onnx"
    assert run(["export", str(tiny_checkpoint), "--output", str(out), "--batch-size", "3", "--opset", "17"]) == 0
    assert str(out) in capsys.readouterr().out
    model = onnx.load(out)
    input_dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert input_dims == [3, 1, TINY_SIZE, TINY_SIZE]
    report = json.loads(report_path(out).read_text())
    assert report["batch"] == 3 and {s["batch"] for s in report["sets"]} == {3} and report["passed"]
    session = open_session(out)
    assert session.run(None, {meta.INPUT_NAME: _faces(3)})[0].shape == (3, 68, 2)


def test_cli_no_verify_is_an_explicit_opt_out(tiny_checkpoint, tmp_path):
    out = tmp_path / "unverified.onnx"
    assert run(["export", str(tiny_checkpoint), "-o", str(out), "--no-verify"]) == 0
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(props[meta.PARITY]) == {"verified": False}
    report = json.loads(report_path(out).read_text())
    assert report["checked"] is False and report["passed"] is None and "not verified" in report["summary"]


def test_bad_arguments_are_one_line_errors(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(FacemarkError, match="precision 'int4'"):
        export_model(tiny_checkpoint, tmp_path / "x.onnx", precision="int4")
    assert run(["export", str(tiny_checkpoint), "-o", str(tmp_path / "x.onnx"), "--batch-size", "zero"]) == 2
    assert run(["export", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx"))


def test_calib_data_embeds_detector_calibration_and_validation_nme(tiny_checkpoint, tmp_path):
    """--calib-data: Haar calibration fitted on the training split, NME on the validation split."""
    out = tmp_path / "calibrated.onnx"
    result = export_model(tiny_checkpoint, out, calib_data=[SAMPLES / "landmarks.xml"])
    nme = result.report["nme"]
    assert nme["faces"] == 4 and nme["candidate"] == pytest.approx(nme["fp32_onnx"])  # samples: 21 / 4 split
    assert "validation split" in result.report["inputs"]["real_faces_from"]
    info = meta.parse_metadata({p.key: p.value for p in onnx.load(out).metadata_props}, str(out))
    assert info.calibration is not None and info.calibration.samples > 0
    # The NME in the report is that of the deployed model on the validation faces.
    from facemark.data import load_records, split_records
    from facemark.evaluation import evaluate

    _, val = split_records(load_records([SAMPLES / "landmarks.xml"], lambda _m: None))
    own = evaluate(OnnxPredictor(open_session(out), info.contract), val).summary()["nme"]
    assert own == pytest.approx(nme["candidate"], rel=1e-5)


def test_uint8_7bit_int8_keeps_weights_in_seven_bits_and_passes_its_gates(tiny_checkpoint, tmp_path):
    from onnx import numpy_helper

    result = export_model(tiny_checkpoint, tmp_path / "u7.onnx", precision="int8", int8_activations="uint8-7bit")
    assert result.passed and result.report["int8"]["activations"] == "QUInt8"
    model = onnx.load(result.path)
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights, "int8 weights present"
    # ORT reduce_range: symmetric 7-bit weights in [-64, 64]; 255 * 64 * 2 < 2**15, so the AVX2 pair sum cannot saturate
    assert all(w.min() >= -64 and w.max() <= 64 for w in weights)
    assert max(int(np.abs(w).max()) for w in weights) == 64, "the range is used, not collapsed"
    activations = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert activations, "uint8 activation zero points (U8S8)"


def test_export_leaves_the_callers_model_in_eval_mode():
    from facemark.export.onnx_export import export_fp32
    from facemark.train.model import LandmarkNet

    model = LandmarkNet(image_size=TINY_SIZE).eval()
    export_fp32(model, TINY_SIZE)
    assert not any(m.training for m in model.modules())


def test_pixel_gates_scale_with_the_crop_size():
    """int8's p99 limit is 8 px of a 224 px crop, so 4 px of a 112 px crop (the same fraction of the crop)."""
    from facemark.export.parity import check_gate

    def sets(p99_fraction: float) -> list[dict]:
        return [{"source": "real", "batch": 1, "points": 16 * 68, "tied_points": 0,
                 "landmarks": {"p99_abs": p99_fraction, "nan": 0, "inf": 0}}]

    # 6 px at 112 px: within 8 px, beyond the 112 px crop's 4 px limit
    assert not check_gate("int8", sets(6 / 112), 112, None)[0]["passed"]
    assert check_gate("int8", sets(3 / 112), 112, None)[0]["passed"]
    assert check_gate("int8", sets(7 / 224), 224, None)[0]["passed"]
    assert check_gate("int8", sets(7 / 224), 224, None)[0]["limit"] == 8.0
