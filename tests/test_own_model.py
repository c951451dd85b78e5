"""A model a user trains themselves, through export and the runtime (docs/CLI.md, "Train and export your own
model"): gates that judge the model and say what to do, int8 calibration that never ends in a traceback,
--no-verify marked, a presence score applied only where it is trustworthy, fine-tunes that never end worse
than their start. The end-to-end test trains for real on ../shared/data (and skips without it)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA_300W, REPO, SAMPLES, requires_300w

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from facemark import metadata as meta  # noqa: E402
from facemark.cli import run  # noqa: E402
from facemark.errors import FacemarkError  # noqa: E402
from facemark.export import parity  # noqa: E402
from facemark.export.exporter import keep_failed_report, report_path  # noqa: E402

LFPW = DATA_300W / "lfpw" / "trainset"


def _set(p99_px: float | None, points: int = 16 * 68, tied: int = 0, size: int = 128) -> dict:
    stat = None if p99_px is None else p99_px / size
    return {"source": "real", "batch": 1, "points": points, "tied_points": tied,
            "landmarks": {"p99_abs": stat, "max_abs": stat, "nan": 0, "inf": 0}}


def test_an_undertrained_model_fails_on_comparable_points_with_what_to_do():
    """When nearly every point ties between two cells, the gate says the model is too undertrained to compare
    (no NaN statistic counted as a failure), and names both ways out."""
    [gate] = parity.check_gate("fp32", [_set(None, tied=16 * 68 - 10)], 128, None)
    assert not gate["passed"] and gate["value"] == 10 and gate["limit"] == parity.MIN_COMPARABLE_POINTS
    assert "undertrained" in gate["advice"] and "train longer" in gate["advice"] and "--no-verify" in gate["advice"]
    report = {"checked": True, "precision": "fp32", "crop_size": 128, "sets": [_set(None, tied=1078)],
              "gates": [gate], "nme": None}
    line = parity.summary_line(report)
    assert "FAILED gate: comparable points" in line and "What to do:" in line and "nan" not in line.lower()
    # ... while the points that do not tie are compared: most points tied, the rest exact, the gate holds
    [ok] = parity.check_gate("fp32", [_set(0.0, tied=600)], 128, None)
    assert ok["passed"] and ok["gated"]


def test_a_weak_models_reduced_precision_is_judged_by_its_nme():
    """int8 of a model at 40 % NME moves points by cells under any rounding: its p99 is reported, not gated,
    and the NME gate (with an allowance proportional to the model's error) decides."""
    weak = {"faces": 79, "candidate": 0.3909, "fp32_onnx": 0.4008}
    gates = parity.check_gate("int8", [_set(17.5)], 128, weak)
    point = gates[0]
    assert point["gated"] is False and point["passed"] is False and "judged by its NME gate" in point["advice"]
    nme = gates[-1]
    assert nme["name"].startswith("validation NME") and nme["passed"] and nme["limit"] == pytest.approx(0.05 * 0.4008)
    assert parity.gates_passed(gates)
    worse = {"faces": 79, "candidate": 0.4800, "fp32_onnx": 0.4008}
    failed = parity.check_gate("int8", [_set(17.5)], 128, worse)
    assert not parity.gates_passed(failed) and "--int8-activations" in failed[-1]["advice"]
    # a trained model is gated on its points as before
    trained = {"faces": 205, "candidate": 0.0381, "fp32_onnx": 0.0379}
    assert not parity.gates_passed(parity.check_gate("int8", [_set(17.5)], 128, trained))


def test_reports_are_strict_json_and_a_failed_one_is_never_silently_replaced(tmp_path):
    doc = parity.strict_json_value({"a": float("nan"), "b": [float("inf"), 1.5, np.float32(2)], "c": np.int64(3)})
    assert doc == {"a": None, "b": [None, 1.5, 2.0], "c": 3}
    json.dumps(doc, allow_nan=False)
    path = tmp_path / "best.parity.json"
    path.write_text(json.dumps({"passed": False, "summary": "first"}))
    said = []
    keep_failed_report(path, said.append)
    assert not path.exists() and json.loads((tmp_path / "best.parity.failed.json").read_text())["summary"] == "first"
    path.write_text(json.dumps({"passed": False, "summary": "second"}))
    keep_failed_report(path, said.append)
    assert json.loads((tmp_path / "best.parity.failed-2.json").read_text())["summary"] == "second"
    path.write_text(json.dumps({"passed": True}))
    keep_failed_report(path, said.append)  # a passed report is simply replaced by the next export
    assert path.exists() and len(said) == 2 and "kept as" in said[0]


def _graph_with_a_nan_activation():
    """image -> Conv -> Sqrt -> Conv: half the inputs are negative, so the middle activation holds NaN, whose
    histogram ONNX Runtime's percentile calibrator cannot build."""
    from onnx import TensorProto, helper, numpy_helper

    ones = numpy_helper.from_array(np.ones((4, 1, 1, 1), np.float32), "w")
    mix = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["c"]), helper.make_node("Sqrt", ["c"], ["s"]),
         helper.make_node("Conv", ["s", "w2"], ["landmarks"])], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, ["N", 4, 8, 8])], [ones, mix])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_int8_calibration_falls_back_to_minmax_and_never_ends_in_a_traceback():
    from facemark.export.variants import CALIBRATION_FALLBACK, to_int8

    crops = np.random.default_rng(0).uniform(-1, 1, (32, 1, 8, 8)).astype(np.float32)
    said = []
    model, method = to_int8(_graph_with_a_nan_activation(), crops, None, "int8", said.append)
    assert method == CALIBRATION_FALLBACK and any("QuantizeLinear" == n.op_type for n in model.graph.node)
    assert len(said) == 1 and "calibrating by MinMax" in said[0] and "not finite" in said[0]
    crops[0, 0, 0, 0] = np.inf  # nothing can calibrate on that: one line, both tries named
    with pytest.raises(FacemarkError, match=r"int8 quantization failed \(Percentile .*; MinMax: .*--precision fp16"):
        to_int8(_graph_with_a_nan_activation(), crops, None, "int8")


def test_the_runtime_given_a_checkpoint_says_export_it_first(tiny_checkpoint, capsys):
    code = run(["runtime", "predict", str(SAMPLES / "dogs.jpg"), "--model", str(tiny_checkpoint)])
    err = capsys.readouterr().err
    assert code == 2 and "is a PyTorch checkpoint: run `facemark export" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("module", ["ray", "pyarrow"])
def test_ray_without_its_extra_is_one_line_naming_the_install(module, tmp_path):
    code = (f"import sys; sys.modules[{module!r}] = None\nfrom facemark.cli import run\n"
            f"sys.exit(run(['runtime', 'predict', {str(SAMPLES)!r}, '--ray', 'local', '--jsonl', "
            f"{str(tmp_path / 'r.jsonl')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: this needs the ray extra ({module} is not installed): "
                                                "pip install 'facemark[ray]'"]


def test_a_model_exported_without_verification_says_so_in_the_runtime(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "nv.onnx"
    assert run(["export", str(tiny_checkpoint), "-o", str(out), "--no-verify"]) == 0
    capsys.readouterr()
    assert run(["runtime", "predict", str(SAMPLES / "dogs.jpg"), "--model", str(out),
                "--json", str(tmp_path / "o.json")]) == 0
    err = capsys.readouterr().err
    assert err.count("exported with --no-verify") == 1 and "warning:" in err
    assert json.loads((tmp_path / "o.json").read_text())["model"]["parity"] == "unverified"


def _cli(*args: str) -> tuple[int, str]:
    """Run the CLI in a subprocess: exit code and stderr (a traceback would show there)."""
    done = subprocess.run([sys.executable, "-m", "facemark", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    return done.returncode, done.stderr


@requires_300w
def test_train_export_and_run_your_own_model_end_to_end(tmp_path):
    """A model trained for two epochs on 64 faces: every precision exports or fails with its one-line reason
    (never a traceback), the written ones find the sample photos' faces; a one-epoch fine-tune of the shipped model
    ends with best.pt no worse than its initial weights on the run's validation split."""
    run_dir = tmp_path / "tiny"
    code, err = _cli("train", "--data", str(LFPW), "--max-images", "64", "--epochs", "2", "--out-dir", str(run_dir))
    assert code == 0, err
    best = run_dir / "best.pt"
    figures = {}
    for precision in ("fp32", "fp16", "int8"):
        out = tmp_path / f"tiny.{precision}.onnx"
        code, err = _cli("export", str(best), "--precision", precision, "-o", str(out))
        assert "Traceback" not in err and code in (0, 2), err
        report = json.loads(report_path(out).read_text())  # strict JSON: json.loads refuses nothing here
        figures[precision] = (code, report["summary"])
        if code == 2:
            assert err.count("error:") == 1 and "What to do:" in err and not out.exists()
            continue
        assert report["passed"] and report["presence"]["trusted"] is False  # two epochs: no presence score yet
        doc = tmp_path / f"{precision}.json"
        code, err = _cli("runtime", "predict", str(SAMPLES), "--model", str(out), "--json", str(doc))
        assert code == 0 and "presence score is not trustworthy" in err, err
        found = json.loads(doc.read_text())
        assert sum(len(i["faces"]) for i in found["images"]) >= 20 and found["model"]["presence"] == "not trusted"
    assert figures["fp32"][0] == 0, figures  # fp32 of any model is the same graph: its comparable points agree

    tuned = tmp_path / "ft"
    shipped = REPO / "facemark" / "assets" / "facemark-68.onnx"
    code, err = _cli("train", "--init", str(shipped), "--data", str(LFPW), "--max-images", "32", "--epochs", "1",
                     "--out-dir", str(tuned))
    assert code == 0, err
    history = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1] and history[0]["train_loss"] is None
    kept = torch.load(tuned / "best.pt", weights_only=True)["metrics"]
    assert kept["val_nme"] == min(h["val_nme"] for h in history) <= history[0]["val_nme"]
    print("end-to-end figures:", json.dumps(figures), [round(100 * h["val_nme"], 2) for h in history])


def test_presence_is_recorded_in_the_metadata():
    """Models without a presence head record none (nothing to trust); ModelInfo reads a recorded one."""
    from facemark.contract import CropContract
    from facemark.metadata import parse_metadata

    base = {meta.CONTRACT: CropContract(size=64).to_json()}
    assert parse_metadata(base, "m").presence_trusted  # files from before the record: threshold applied
    record = {"auc": 0.91, "faces_kept": 0.0}
    info = parse_metadata({**base, meta.PRESENCE: meta.dumps(record)}, "m")
    assert not info.presence_trusted and info.summary()["presence"] == "not trusted"
    assert parse_metadata({**base, meta.PRESENCE: meta.dumps({"auc": 0.9999, "faces_kept": 0.99})},
                          "m").presence_trusted
