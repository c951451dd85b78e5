"""`facemark web`: the static browser folder, its module in Node (crop, decode, detector) and the page in a real
headless Chromium against `facemark runtime predict` on the same photos (docs/WEB.md).

The npm packages come from `make web-deps` (npm ci in web/) and Chromium from Debian's package; without them the
tests that need them skip and say so."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLES

from facemark.cli import run
from facemark.imageio import read_gray
from facemark.runtime.detector_files import CACHE_ENV, cached_path
from facemark.runtime.detectors import CNN_DETECTORS
from facemark.runtime.landmarker import SCORE_DIGITS, FaceLandmarker
from facemark.runtime.schema import schema_text
from facemark.web.build import CONFIG_FILE, INSTALL_HINT, find_node_modules, pinned_versions
from facemark.web.serve import dump_dom, find_chromium, serve_folder

NODE_CHECK = REPO / "web" / "test" / "node_check.mjs"
POINT_TOLERANCE_PX = 1.0  # the int8 model in WebAssembly against ONNX Runtime's CPU kernels (measured: docs/WEB.md)
RESULT = re.compile(r'<pre id="result">(.*?)</pre>', re.S)


def _modules_or_skip() -> Path:
    try:
        return find_node_modules()
    except Exception as exc:  # noqa: BLE001 (the reason is the message)
        pytest.skip(f"web runtimes missing: {exc}")


@pytest.fixture(scope="module")
def web_folder(tmp_path_factory) -> Path:
    _modules_or_skip()
    out = tmp_path_factory.mktemp("web") / "site"
    assert run(["web", str(out)]) == 0
    shutil.copytree(SAMPLES, out / "samples")  # same origin as the page
    return out


@pytest.fixture(scope="module")
def landmarker() -> FaceLandmarker:
    return FaceLandmarker(provider="cpu")


def test_the_folder_carries_the_pinned_runtimes_and_the_python_runtimes_settings(web_folder, landmarker):
    config = json.loads((web_folder / CONFIG_FILE).read_text())
    described = landmarker.describe()
    detector = dict(described["detector"])
    assert config["detector"]["name"] == detector.pop("name")
    assert {k: v for k, v in config["detector"]["settings"].items() if k != "window"} == detector
    cascade = landmarker.detector.cascade_path
    assert (web_folder / config["detector"]["cascade_file"]).read_bytes() == cascade.read_bytes()
    pipeline = dict(config["pipeline"])  # the runtime's settings and what facemark.js needs to order faces as it
    assert (pipeline.pop("face_order"), pipeline.pop("score_digits")) == ("presence", SCORE_DIGITS)
    assert {k: v for k, v in pipeline.items() if k != "duplicate_iou"} == described["pipeline"]
    assert (web_folder / config["model"]["file"]).read_bytes() == landmarker.model.path.read_bytes()
    pins = pinned_versions()
    assert f"ONNX Runtime Web v{pins['onnxruntime-web']}" in (web_folder / "ort" / "ort.wasm.min.mjs").read_text()[:200]
    assert config["runtimes"] == pins
    for name in ("index.html", "facemark.js", "LICENSES.md", "_headers", "ort/ort-wasm-simd-threaded.wasm",
                 "opencv/opencv.js", "licenses/opencv-js.LICENSE.txt"):
        assert (web_folder / name).is_file(), name
    assert "Cross-Origin-Embedder-Policy: require-corp" in (web_folder / "_headers").read_text()


def test_a_foreign_folder_missing_runtimes_or_a_cnn_detector_is_one_line_and_exit_2(tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.jpg").write_bytes(b"x")
    assert run(["web", str(foreign), "--node-modules", str(tmp_path)]) == 2
    assert "is not a facemark web folder" in capsys.readouterr().err
    assert (foreign / "keep.jpg").read_bytes() == b"x"
    assert run(["web", str(tmp_path / "site"), "--node-modules", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "make web-deps" in err and len(err.strip().splitlines()) == 1 and INSTALL_HINT.split("`")[1] in err
    assert not (tmp_path / "site").exists()


def test_a_cnn_detector_that_is_not_fetched_is_one_line_naming_the_fetch_command(tmp_path, capsys, monkeypatch):
    _modules_or_skip()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))
    assert run(["web", str(tmp_path / "site"), "--detector", "faceboxes"]) == 2
    assert "facemark detectors fetch faceboxes" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()


def test_the_module_in_node_crops_decodes_and_detects_as_the_python_runtime(web_folder, landmarker):
    """facemark.js on onnxruntime-node (the same CPU kernels as Python's ONNX Runtime): the crops are the
    Python runtime's to the bit, the points and scores its own, the Haar boxes the same."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    modules = _modules_or_skip()
    if not (modules / "onnxruntime-node").is_dir():
        pytest.skip(f"onnxruntime-node missing in {modules}: {INSTALL_HINT}")
    grays = [read_gray(SAMPLES / "2008_002470.jpg"), read_gray(SAMPLES / "2008_007676.jpg")]
    # a face box, one half outside the image, one big enough for the INTER_AREA pre-shrink of the crop
    boxes = [[270.0, 180.0, 55.0, 55.0], [-20.5, -30.25, 200.0, 180.0], [10.0, 10.0, 400.0, 300.0]]
    cases = {"images": [{"width": g.shape[1], "height": g.shape[0], "boxes": boxes,
                         "gray": base64.b64encode(g.tobytes()).decode()} for g in grays]}
    done = subprocess.run([node, str(NODE_CHECK), str(web_folder)], input=json.dumps(cases), capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, "NODE_PATH": str(modules)})
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout)["answers"]
    contract = landmarker.contract
    for gray, answer in zip(grays, answers, strict=True):
        batch, matrices = contract.prepare(gray, [tuple(b) for b in boxes])
        outputs = landmarker.model.predict_outputs(batch)
        for i, (crop, face) in enumerate(zip(answer["crops"], answer["faces"], strict=True)):
            network_input = np.frombuffer(base64.b64decode(crop["input"]), np.float32).reshape(batch.shape[2:])
            np.testing.assert_array_equal(network_input, batch[i, 0])
            np.testing.assert_allclose(np.reshape(crop["matrix"], (2, 3)), matrices[i], rtol=0, atol=1e-9)
            points = contract.decode_points(outputs["landmarks"][i], matrices[i])
            np.testing.assert_allclose(face["landmarks"], points, rtol=0, atol=1e-3)
            np.testing.assert_allclose(face["landmark_scores"], outputs["landmark_scores"][i], rtol=0, atol=1e-5)
            assert face["score"] == pytest.approx(float(outputs["face_score"][i]), abs=1e-5)
        detections = landmarker.detector.detect(gray)
        assert [d["box"] for d in answer["detections"]] == [list(d.box) for d in detections]
        assert [d["score"] for d in answer["detections"]] == pytest.approx([d.score for d in detections])
        for found, detection in zip(answer["detections"], detections, strict=True):
            np.testing.assert_allclose(found["calibrated"], landmarker.calibration.apply(detection.box), atol=1e-9)
        expected = [face.to_json() for face in landmarker.detect(gray, color="gray")]
        assert len(answer["pipeline"]) == len(expected) > 0
        for web, py in zip(answer["pipeline"], expected, strict=True):
            assert web["detector_box"] == py["detector_box"]
            np.testing.assert_allclose(web["landmarks"], py["landmarks"], atol=0.011)


def browser_results(folder: Path, chromium: str, names: list[str]) -> dict[str, dict]:
    """Each sample's image entry from the documented headless command (--dump-dom)."""
    results = {}
    with serve_folder(folder) as served:
        for name in names:
            dom = dump_dom(chromium, f"{served.url}index.html?image=samples/{name}")
            match = RESULT.search(dom)
            assert match and match.group(1), f"{name}: no result in the page: {dom[-1500:]}"
            results[name] = json.loads(html.unescape(match.group(1)))
    return results


def assert_same_faces(browser: dict[str, dict], python: dict[str, dict]) -> int:
    """The browser's image entries against runtime predict's: valid JSON, the same faces (equal detector boxes) in
    the same order, points within POINT_TOLERANCE_PX, the same scores; the number of faces compared."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(schema_text("image"))
    total = 0
    for name, web in browser.items():
        py = python[name]
        jsonschema.validate(web, schema)
        assert web["error"] is None and (web["width"], web["height"]) == (py["width"], py["height"])
        assert len(web["faces"]) == len(py["faces"]), name
        for w, p in zip(web["faces"], py["faces"], strict=True):
            np.testing.assert_allclose(w["detector_box"], p["detector_box"], rtol=0, atol=0.011, err_msg=name)
            difference = np.abs(np.subtract(w["landmarks"], p["landmarks"]))
            assert difference.max() <= POINT_TOLERANCE_PX, (name, difference.max())
            assert w["score"] == pytest.approx(p["score"], abs=0.01)
            assert w["detector_score"] == pytest.approx(p["detector_score"], abs=0.001)
            np.testing.assert_allclose(w["landmark_scores"], p["landmark_scores"], atol=0.05)
            total += 1
    return total


def predicted(tmp_path: Path, names: list[str], *options: str) -> dict[str, dict]:
    """`facemark runtime predict` on the named samples: each image entry by file name."""
    out = tmp_path / "py.json"
    assert run(["runtime", "predict", *(str(SAMPLES / n) for n in names), "--json", str(out), "--device", "cpu",
                *options]) == 0
    return {Path(image["path"]).name: image for image in json.loads(out.read_text())["images"]}


def _chromium_or_skip() -> str:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (make web-deps installs it as root: apt-get install chromium)")
    return chromium


def test_headless_chromium_finds_the_faces_and_points_of_runtime_predict(web_folder, tmp_path):
    chromium = _chromium_or_skip()
    names = sorted(p.name for p in SAMPLES.glob("*.jpg"))
    total = assert_same_faces(browser_results(web_folder, chromium, names), predicted(tmp_path, names))
    assert total >= 20  # the samples hold 25 faces; dogs.jpg none


def test_a_missing_or_undecodable_image_is_an_entry_with_one_error_line(web_folder):
    chromium = _chromium_or_skip()
    jsonschema = pytest.importorskip("jsonschema")
    with serve_folder(web_folder) as served:
        for image, reason in (("samples/missing.jpg", "HTTP 404"), ("LICENSES.md", "could not be decoded")):
            dom = dump_dom(chromium, f"{served.url}index.html?image={image}")
            entry = json.loads(html.unescape(RESULT.search(dom).group(1)))
            jsonschema.validate(entry, json.loads(schema_text("image")))
            assert entry["faces"] == [] and entry["error"].startswith(f"{image}: ") and reason in entry["error"]
            assert entry["error"].count(image) == 1  # named once
            assert 'data-error="1"' in dom and "\n" not in entry["error"]


@pytest.mark.parametrize("name", list(CNN_DETECTORS))
def test_headless_chromium_with_a_cnn_detector_finds_what_runtime_predict_finds(name, tmp_path):
    """The user's fetched CNN detector file in the folder, decoded in the page as runtime/cnn_detector.py does."""
    chromium = _chromium_or_skip()
    _modules_or_skip()
    if not cached_path(CNN_DETECTORS[name].file).is_file():
        pytest.skip(f"{name} is not fetched (`facemark detectors fetch {name}`; make test's `detectors` step)")
    site = tmp_path / "site"
    assert run(["web", str(site), "--detector", name]) == 0
    config = json.loads((site / CONFIG_FILE).read_text())
    assert config["detector"]["calibration"]["detector"] == name and (site / config["detector"]["file"]).is_file()
    names = ["2008_002470.jpg", "2008_007676.jpg"]  # 6 and 7 faces
    shutil.copytree(SAMPLES, site / "samples")
    browser = browser_results(site, chromium, names)
    assert assert_same_faces(browser, predicted(tmp_path, names, "--detector", name)) == 13
