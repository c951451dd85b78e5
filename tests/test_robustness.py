"""Nothing lost, nothing silently wrong (issue 12): shared landmarker across threads, streaming and resumable
predict, interrupted runs, one extension list, bad annotations, bad models, API input errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLES
from test_runtime import export_tiny_onnx

from facemark import metadata as md
from facemark.cli import run
from facemark.data import load_records, read_pts_folder
from facemark.errors import ImageError, ModelError
from facemark.imageio import read_image
from facemark.runtime.landmarker import FaceLandmarker
from facemark.runtime.predict.inputs import collect_inputs
from facemark.runtime.predict.writers import read_jsonl_entries

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_tiny_onnx(tiny_checkpoint, tmp_path_factory.getbasetemp() / "runtime-models" / "tiny.onnx")


def photos() -> list[Path]:
    return sorted(p for p in SAMPLES.glob("*.jpg"))


# --- thread safety ---------------------------------------------------------------------------------------------
def test_shared_landmarker_across_threads_gives_the_sequential_results(tiny_onnx):
    landmarker = FaceLandmarker(tiny_onnx, provider="cpu", threads=1)
    images = [read_image(p) for p in photos()] * 4
    sequential = [landmarker.detect(im) for im in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(landmarker.detect, images))
    for seq, par in zip(sequential, parallel, strict=True):
        assert len(seq) == len(par)
        for a, b in zip(seq, par, strict=True):
            assert a.detector_box == b.detector_box
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-4)


# --- predict: JSONL streaming, resume, interruption, output checks ---------------------------------------------
def test_jsonl_has_one_line_per_input_in_order_and_equals_the_json_entries(tmp_path, tiny_onnx):
    jsonl, doc_path = tmp_path / "out.jsonl", tmp_path / "out.json"
    inputs = [str(p) for p in photos()]
    code = run(["runtime", "predict", *inputs, "--model", str(tiny_onnx), "--device", "cpu", "--jsonl",
                str(jsonl), "--json", str(doc_path)])
    assert code == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    doc = json.loads(doc_path.read_text())
    assert [entry["path"] for entry in lines] == inputs
    runs = [entry.pop("run") for entry in lines]
    assert all(entry.pop("pipeline") == doc["pipeline"] for entry in lines)  # each line records its settings
    assert lines == doc["images"] and doc["complete"] is True
    assert all(set(entry) == {"path", "width", "height", "faces", "error"} for entry in lines)
    assert all(run == runs[0] for run in runs) and len(runs[0]["model_sha256"]) == 64


def test_resume_skips_complete_lines_and_redoes_a_truncated_last_line(tmp_path, tiny_onnx):
    jsonl = tmp_path / "out.jsonl"
    inputs = [str(p) for p in photos()]
    assert run(["runtime", "predict", *inputs, "--model", str(tiny_onnx), "--device", "cpu",
                "--jsonl", str(jsonl)]) == 0
    full = jsonl.read_text().splitlines()
    # A run killed while writing its third line: two complete lines and half of the third.
    jsonl.write_text(full[0] + "\n" + full[1] + "\n" + full[2][: len(full[2]) // 2])
    assert set(read_jsonl_entries(jsonl)) == {os.path.realpath(p) for p in inputs[:2]}
    assert jsonl.read_text().count("\n") == 2  # the cut line is gone
    assert run(["runtime", "predict", *inputs, "--model", str(tiny_onnx), "--device", "cpu",
                "--jsonl", str(jsonl), "--resume"]) == 0
    assert jsonl.read_text().splitlines() == full


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_predict_writes_what_is_done_and_exits_128_plus_signal(tmp_path, tiny_onnx, sig):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):
        shutil.copy(photos()[i % len(photos())], folder / f"{i:03d}.jpg")
    doc_path, jsonl = tmp_path / "doc.json", tmp_path / "doc.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "facemark", "runtime", "predict", str(folder), "--model",
                             str(tiny_onnx), "--device", "cpu", "--json", str(doc_path), "--jsonl", str(jsonl)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and (not jsonl.is_file() or jsonl.read_text().count("\n") < 3):
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig.value, err.decode()
    doc = json.loads(doc_path.read_text())
    assert doc["complete"] is False and 3 <= len(doc["images"]) < 60
    assert [e["path"] for e in doc["images"]] == [json.loads(x)["path"] for x in jsonl.read_text().splitlines()]
    assert b"interrupted" in err


def test_unwritable_output_fails_before_any_image_is_processed(tmp_path, tiny_onnx, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = run(["runtime", "predict", str(SAMPLES), "--model", str(tiny_onnx), "--device", "cpu",
                "--json", str(blocker / "sub" / "out.json")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot create the folder" in err and "images" not in err


# --- one extension list ------------------------------------------------------------------------------------------
def test_folder_scanning_finds_every_readable_extension_any_case(tmp_path):
    image = read_image(photos()[0])
    names = ["a.webp", "b.PGM", "c.ppm", "d.gif", "e.JPG", "f.tiff", "g.pbm"]
    for name in names:
        path = tmp_path / name
        if name.lower().endswith(".gif"):
            from PIL import Image

            Image.fromarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).save(path, format="GIF")
        else:
            ext = Path(name).suffix.lower()
            pixels = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if ext in (".pgm", ".pbm") else image
            ok, buf = cv2.imencode(ext, pixels)
            assert ok
            path.write_bytes(buf.tobytes())
    files, failures = collect_inputs([tmp_path])
    assert not failures and sorted(f.name for f in files) == sorted(names)
    for f in files:
        assert read_image(f).shape[:2] == image.shape[:2]


# --- bad annotations ------------------------------------------------------------------------------------------
def test_pts_with_non_finite_or_far_outside_points_is_reported_and_skipped(tmp_path):
    shutil.copy(photos()[0], tmp_path / "good.jpg")
    shutil.copy(photos()[0], tmp_path / "huge.jpg")
    shutil.copy(photos()[0], tmp_path / "nan.jpg")
    points = np.tile([[100.0, 100.0]], (68, 1)) + np.arange(68)[:, None]

    def write(name: str, pts: np.ndarray) -> None:
        body = "\n".join(f"{x} {y}" for x, y in pts)
        (tmp_path / f"{name}.pts").write_text(f"version: 1\nn_points: 68\n{{\n{body}\n}}")

    write("good", points)
    huge = points.copy()
    huge[5] = (1e12, 3.0)
    write("huge", huge)
    nan = points.copy()
    nan[7] = (float("nan"), 1.0)
    write("nan", nan)
    warnings: list[str] = []
    records = read_pts_folder(tmp_path, warnings.append)
    assert [r.image_path.name for r in records] == ["good.jpg"]
    assert any("huge.pts" in w and "far outside" in w for w in warnings)
    assert any("nan.pts" in w and "non-finite" in w for w in warnings)


# --- models -------------------------------------------------------------------------------------------------------
def graph_model(path: Path, points: int = 68, poison: bool = False, ir_version: int | None = None) -> Path:
    """A small real ONNX model with facemark metadata: image [N,1,64,64] -> landmarks [N, points, 2]
    (a linear map of the pixels; times NaN with `poison`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from facemark.contract import CropContract

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((64 * 64, points * 2)) * 1e-4).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1, points, 2], np.int64), "shape"),
             numpy_helper.from_array(np.array(np.nan if poison else 1.0, np.float32), "k")]
    nodes = [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["mm"]),
             helper.make_node("Reshape", ["mm", "shape"], ["pts"]),
             helper.make_node("Mul", ["pts", "k"], ["landmarks"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 64, 64])],
        [helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, ["batch", points, 2])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = ir_version or 8
    onnx.helper.set_model_props(proto, {md.FORMAT: md.MODEL_FORMAT, md.CONTRACT: CropContract(size=64).to_json(),
                                        md.POINTS: "ibug68", md.PRECISION: "fp32"})
    onnx.save(proto, str(path))
    return path


def test_model_with_5_points_is_refused_at_load(tmp_path):
    path = graph_model(tmp_path / "five.onnx", points=5)
    with pytest.raises(ModelError, match=r"output 'landmarks' has shape .*expected \[N, 68, 2\]"):
        FaceLandmarker(path, provider="cpu")
    assert FaceLandmarker(graph_model(tmp_path / "ok.onnx"), provider="cpu").model.output_names == ["landmarks"]


def test_non_finite_model_output_drops_the_face_and_marks_the_image(tmp_path):
    path = graph_model(tmp_path / "nan.onnx", poison=True)
    doc_path = tmp_path / "out.json"
    photo = SAMPLES / "2009_004587.jpg"  # several faces
    code = run(["runtime", "predict", str(photo), "--model", str(path), "--device", "cpu",
                "--json", str(doc_path)])
    text = doc_path.read_text()
    doc = json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token} in the JSON document"))
    assert code == 1
    image = doc["images"][0]
    assert image["faces"] == [] and "non-finite" in image["error"]


def test_model_load_error_keeps_its_whole_cause(tmp_path):
    path = graph_model(tmp_path / "future.onnx", ir_version=99)
    with pytest.raises(ModelError) as info:
        FaceLandmarker(path, provider="cpu")
    assert "max supported IR version" in str(info.value)


# --- API input errors -------------------------------------------------------------------------------------------
def test_detect_errors_say_what_was_passed(tiny_onnx):
    landmarker = FaceLandmarker(tiny_onnx, provider="cpu")
    with pytest.raises(ImageError, match="got None: did cv2.imread fail"):
        landmarker.detect(None)
    with pytest.raises(ImageError, match=r"non-empty image.*\(0, 0, 3\)"):
        landmarker.detect(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ImageError, match="got list"):
        landmarker.detect([[1, 2], [3, 4]])


def test_dlib_xml_box_with_points_far_outside_is_skipped_not_fatal(tmp_path):
    xml = (SAMPLES / "landmarks.xml").read_text()
    bad = xml.replace("<part name='00' x='", "<part name='00' x='99999", 1)
    if bad == xml:
        bad = xml.replace('<part name="00" x="', '<part name="00" x="99999', 1)
    assert bad != xml
    target = tmp_path / "bad.xml"
    target.write_text(bad)
    for p in photos():
        shutil.copy(p, tmp_path / p.name)
    warnings: list[str] = []
    records = load_records([target], warnings.append)
    good = load_records([SAMPLES / "landmarks.xml"], lambda m: None)
    assert len(records) == len(good) - 1 and any("far outside" in w for w in warnings)


# --- export ---------------------------------------------------------------------------------------------------
def test_export_of_another_architecture_is_one_line_and_writes_nothing(tmp_path, tiny_checkpoint, capsys):
    torch = pytest.importorskip("torch")
    doc = torch.load(tiny_checkpoint, weights_only=True)
    doc["model"] = {**doc["model"], "arch": "resnet50"}
    bad = tmp_path / "other.pt"
    torch.save(doc, bad)
    out = tmp_path / "out" / "model.onnx"
    assert run(["export", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "resnet50" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not out.exists() and not out.with_suffix(".parity.json").exists()


def test_export_to_an_unwritable_path_fails_first(tmp_path, tiny_checkpoint, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run(["export", str(tiny_checkpoint), "-o", str(blocker / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert "cannot create the folder" in err and "loading" not in err


def test_untrusted_pickle_checkpoint_is_refused_without_the_weights_only_hint(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    evil = tmp_path / "evil.pt"
    torch.save({"format": "facemark-checkpoint/1", "obj": Path("x")}, evil)  # a non-plain object
    assert run(["export", str(evil), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "not a facemark checkpoint" in err and "weights_only=False" not in err
