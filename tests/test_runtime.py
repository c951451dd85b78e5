"""facemark.runtime: sessions and providers, Haar detector, calibration, FaceLandmarker, torch-free import.

The test model is the `tiny_checkpoint` (random ResNet18 at 64 px) exported here to ONNX with facemark
metadata (`export_tiny_onnx`; the export stage's own exporter is tested in its own files).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DLIB_EXAMPLES, SAMPLES, TINY_SIZE, requires_dlib_examples

from facemark import metadata as md
from facemark.contract import BoxCalibration, CropContract, box_from_landmarks, box_iou
from facemark.data import FaceRecord, load_records
from facemark.errors import ImageError, ModelError, ProviderError
from facemark.imageio import read_gray, read_image, to_gray
from facemark.runtime import session
from facemark.runtime.calibration import detect_records, fit_calibration, haar_box_source, match_detection
from facemark.runtime.detector import Detection, HaarDetector, default_cascade_path
from facemark.runtime.landmarker import Face, FaceLandmarker

REPO = Path(__file__).resolve().parents[1]
SAMPLE_XML = SAMPLES / "landmarks.xml"


def export_tiny_onnx(checkpoint: Path, output: Path, calibration: BoxCalibration | None = None) -> Path:
    """Export a checkpoint to ONNX opset 17 with the facemark metadata the runtime reads (tests only)."""
    if output.is_file():
        return output
    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from facemark.train.checkpoint import load_model

    model, contract, doc = load_model(checkpoint)
    dummy = torch.zeros(2, 1, contract.size, contract.size)
    output.parent.mkdir(parents=True, exist_ok=True)
    raw = output.with_suffix(".raw.onnx")
    torch.onnx.export(model, (dummy,), str(raw), dynamo=False, opset_version=17, input_names=[md.INPUT_NAME],
                      output_names=[md.OUTPUT_NAME],
                      dynamic_axes={md.INPUT_NAME: {0: "batch"}, md.OUTPUT_NAME: {0: "batch"}})
    proto = onnx.load(str(raw))
    props = {md.FORMAT: md.MODEL_FORMAT, md.CONTRACT: contract.to_json(), md.POINTS: "ibug68",
             md.ARCH: doc["model"]["arch"], md.PRECISION: "fp32"}
    if calibration is not None:
        props[md.DETECTOR_CALIBRATION] = calibration.to_json()
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(output))
    raw.unlink()
    return output


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_tiny_onnx(tiny_checkpoint, tmp_path_factory.getbasetemp() / "runtime-models" / "tiny.onnx")


@pytest.fixture(scope="module")
def landmarker(tiny_onnx) -> FaceLandmarker:
    return FaceLandmarker(tiny_onnx, device="cpu", threads=1)


# --- providers and sessions ----------------------------------------------------------------------------------
def test_auto_resolves_to_a_provider_that_loads_and_cpu_is_always_there():
    loadable = session.available_providers()
    assert loadable[-1] == session.CPU
    chain = session.resolve_providers("auto")
    first = chain[0] if isinstance(chain[0], str) else chain[0][0]
    assert first == loadable[0]
    assert session.resolve_providers("cpu") == [session.CPU]


@pytest.mark.skipif(session.CUDA in session.available_providers(), reason="CUDA runs here")
def test_explicit_cuda_that_cannot_run_is_an_error_not_a_cpu_fallback(tiny_onnx):
    with pytest.raises(ProviderError, match="cannot run here"):
        session.resolve_providers("cuda")
    with pytest.raises(ProviderError):
        session.LandmarkModel(tiny_onnx, provider="cuda")


@pytest.mark.skipif(session.TENSORRT in session.available_providers(), reason="TensorRT runs here")
def test_explicit_tensorrt_that_cannot_run_is_an_error():
    with pytest.raises(ProviderError, match="tensorrt"):
        session.resolve_providers("tensorrt")


def test_unknown_provider_is_rejected():
    with pytest.raises(ProviderError, match="unknown provider"):
        session.resolve_providers("opencl")


def test_tensorrt_options_carry_fp16_cache_and_batch_profile(tmp_path):
    options = session.provider_options(session.TENSORRT, image_size=160, trt_fp16=True, trt_cache_dir=tmp_path,
                                       max_batch=16)
    assert options["trt_fp16_enable"] == "True"
    assert options["trt_engine_cache_path"] == str(tmp_path)
    assert options["trt_profile_min_shapes"] == "image:1x1x160x160"
    assert options["trt_profile_max_shapes"] == "image:16x1x160x160"
    assert session.provider_options(session.CPU) == {}


def test_model_reports_metadata_providers_and_predicts_any_batch(tiny_onnx):
    model = session.LandmarkModel(tiny_onnx, provider="auto", threads=1, max_batch=3)
    assert model.providers[0] in session.available_providers()
    assert model.contract == CropContract(size=TINY_SIZE)
    assert model.info.calibration is None and model.path == tiny_onnx
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1, 1, (7, 1, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    out = model.predict(batch)  # 7 > max_batch: run in chunks, same answer as one by one
    assert out.shape == (7, 68, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[5], model.predict(batch[5:6])[0], atol=1e-4)
    assert model.predict(batch[:0]).shape == (0, 68, 2)
    with pytest.raises(ValueError, match="shape"):
        model.predict(batch[:, :, :32])


def test_model_matches_the_torch_checkpoint(tiny_checkpoint, tiny_onnx):
    from facemark.train.predictor import TorchPredictor

    batch = np.random.default_rng(1).uniform(-1, 1, (2, 1, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    eager = TorchPredictor(tiny_checkpoint).predict(batch)
    np.testing.assert_allclose(session.LandmarkModel(tiny_onnx, "cpu").predict(batch), eager, atol=1e-4)


def test_bad_model_files_are_clear_model_errors(tmp_path, tiny_onnx):
    with pytest.raises(ModelError, match="no such model file"):
        session.LandmarkModel(tmp_path / "missing.onnx")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="empty model file"):
        session.LandmarkModel(empty)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ModelError, match="garbage.onnx: not a loadable ONNX model"):
        session.LandmarkModel(garbage)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny_onnx.read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated.onnx"):
        session.LandmarkModel(truncated)


def test_model_without_facemark_metadata_is_refused(tmp_path):
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(session._PROBE_MODEL)
    with pytest.raises(ModelError, match="not a facemark model"):
        session.LandmarkModel(plain)


def test_missing_default_model_says_how_to_pass_one(monkeypatch, tmp_path):
    from facemark.runtime import landmarker as landmarker_module

    monkeypatch.setattr(landmarker_module, "DEFAULT_MODEL_PATH", tmp_path / "absent.onnx")
    with pytest.raises(ModelError, match="default model is not installed"):
        FaceLandmarker()


# --- detector --------------------------------------------------------------------------------------------------
def test_haar_finds_the_annotated_sample_faces_and_none_on_dogs_or_blank():
    detector = HaarDetector()
    records = load_records([SAMPLE_XML], warn=pytest.fail)
    pairs = detect_records(records, detector)
    found = sum(d is not None for _, d in pairs)
    assert found >= len(records) - 1, f"found {found} of {len(records)} sample faces"
    assert detector.detect(read_gray(SAMPLES / "dogs.jpg")) == []
    assert detector.detect(np.full((480, 640), 128, np.uint8)) == []
    assert detector.detect(np.zeros((10, 10), np.uint8)) == []


def test_haar_boxes_map_back_from_the_downscaled_copy():
    gray = read_gray(SAMPLES / "2009_004587.jpg")
    big = cv2.resize(gray, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    small_boxes = HaarDetector(max_side=None).detect(gray)
    big_boxes = HaarDetector(max_side=max(gray.shape)).detect(big)  # searched at the original resolution
    assert small_boxes and len(big_boxes) == len(small_boxes)
    for a, b in zip(sorted(d.box for d in small_boxes), sorted(d.box for d in big_boxes), strict=True):
        np.testing.assert_allclose(np.array(b) / 3, a, atol=4)


def test_haar_min_score_and_min_face_filter_boxes():
    gray = read_gray(SAMPLES / "2009_004587.jpg")
    every = HaarDetector(min_face_fraction=0.0).detect(gray)
    assert [d.score for d in every] == sorted((d.score for d in every), reverse=True)
    assert HaarDetector(min_score=1e9).detect(gray) == []
    assert len(HaarDetector(min_face_fraction=0.9).detect(gray)) <= len(every)


def test_haar_bad_cascade_and_bad_knobs_are_clear(tmp_path):
    with pytest.raises(ModelError, match="cascade file not found"):
        HaarDetector(cascade=tmp_path / "none.xml")
    junk = tmp_path / "junk.xml"
    junk.write_text("<nothing/>")
    with pytest.raises(ModelError, match="not a loadable OpenCV cascade"):
        HaarDetector(cascade=junk)
    with pytest.raises(ValueError, match="scale_factor"):
        HaarDetector(scale_factor=1.0)


@requires_dlib_examples
def test_haar_on_dlib_example_photos():
    detector = HaarDetector()
    records = load_records([DLIB_EXAMPLES / "testing_with_face_landmarks.xml",
                            DLIB_EXAMPLES / "training_with_face_landmarks.xml"], warn=pytest.fail)
    pairs = detect_records(records, detector)
    rate = sum(d is not None for _, d in pairs) / len(pairs)
    assert rate >= 0.8, f"detection rate {rate:.2f}"
    assert detector.detect(read_gray(DLIB_EXAMPLES / "dogs.jpg")) == []


# --- calibration -----------------------------------------------------------------------------------------------
def test_match_detection_picks_best_iou_above_threshold():
    target = (100.0, 100.0, 50.0, 60.0)
    near = Detection((95.0, 90.0, 60.0, 60.0), 1.0)
    far = Detection((300.0, 300.0, 50.0, 50.0), 9.0)
    shifted = Detection((120.0, 120.0, 50.0, 60.0), 5.0)
    assert match_detection([far, shifted, near], target) is near
    assert match_detection([far], target) is None
    assert match_detection([], target) is None


class _FixedDetector:
    """Returns the landmark box distorted by a known calibration: what fit_calibration must recover."""

    name = "synthetic"

    def __init__(self, truth: BoxCalibration, records: list[FaceRecord]) -> None:
        self.truth = truth
        self.by_shape = {read_gray(r.image_path).shape: r for r in records}

    def detect(self, image):  # fit_calibration hands every detector the decoded photo (colour)
        record = self.by_shape[image.shape[:2]]
        x, y, w, h = box_from_landmarks(record.landmarks)
        # inverse of BoxCalibration.apply: a detector box that the true calibration maps onto the target
        dw, dh = w / self.truth.sw, h / self.truth.sh
        cx, cy = x + w / 2 - self.truth.dx * dw, y + h / 2 - self.truth.dy * dh
        return [Detection((cx - dw / 2, cy - dh / 2, dw, dh), 1.0)]


def test_fit_calibration_recovers_a_known_box_mapping():
    records = [r for r in load_records([SAMPLE_XML], warn=pytest.fail)]
    records = list({read_gray(r.image_path).shape: r for r in records}.values())
    truth = BoxCalibration(dx=0.02, dy=0.12, sw=0.78, sh=0.85)
    fitted = fit_calibration(records, _FixedDetector(truth, records), min_iou=0.1)
    assert fitted.detector == "synthetic" and fitted.samples == len(records)
    for key in ("dx", "dy", "sw", "sh"):
        assert getattr(fitted, key) == pytest.approx(getattr(truth, key), abs=1e-6)


def test_fit_calibration_on_real_haar_boxes_moves_them_onto_the_landmark_box():
    records = load_records([SAMPLE_XML], warn=pytest.fail)
    detector = HaarDetector()
    calibration = fit_calibration(records, detector)
    assert calibration.detector == detector.name and calibration.samples >= 1
    pairs = [(r, d) for r, d in detect_records(records, detector) if d is not None]

    before = np.mean([box_iou(d.box, box_from_landmarks(r.landmarks)) for r, d in pairs])
    after = np.mean([box_iou(calibration.apply(d.box), box_from_landmarks(r.landmarks)) for r, d in pairs])
    assert after > before


def test_haar_box_source_drives_evaluation_with_and_without_calibration(landmarker):
    from facemark.evaluation import evaluate

    records = load_records([SAMPLE_XML], warn=pytest.fail)
    detector = landmarker.detector
    calibration = fit_calibration(records, detector)
    raw = evaluate(landmarker.model, records, haar_box_source(detector))
    calibrated = evaluate(landmarker.model, records, haar_box_source(detector, calibration))
    found = sum(d is not None for _, d in detect_records(records, detector))
    assert raw.total == len(records) and len(raw.missed) == len(records) - found
    assert raw.summary()["detection_rate"] == pytest.approx(found / len(records))
    assert calibrated.keys == raw.keys and calibrated.errors != raw.errors


# --- FaceLandmarker --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("refine", [0, 2])
def test_landmarker_detects_sample_faces_in_one_batched_call_per_pass(tiny_onnx, refine, monkeypatch):
    landmarker = FaceLandmarker(tiny_onnx, device="cpu", threads=1, refine=refine)
    image = read_image(SAMPLES / "2009_004587.jpg")
    calls = []
    original = landmarker.model.predict_outputs
    monkeypatch.setattr(landmarker.model, "predict_outputs",
                        lambda batch, *a: calls.append(len(batch)) or original(batch, *a))
    faces, times = landmarker.detect_timed(image)
    assert len(faces) >= 2, "this sample holds several faces"
    assert calls == [len(faces)] * (refine + 1)
    assert set(times) == {"detect", "landmarks"}
    assert all(v >= 0 for v in times.values())
    for face in faces:
        assert isinstance(face, Face) and face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
        assert face.detector_score is not None and face.detector_box is not None
        assert face.score is None, "a model without a presence head has no face score"
        if refine == 0:
            assert face.box == landmarker.calibration.apply(face.detector_box)
        doc = json.loads(json.dumps(face.to_json()))
        assert len(doc["box"]) == 4 and len(doc["landmarks"]) == 68


def test_landmarks_decode_through_the_contract(landmarker):
    """The image points are the model output mapped back through the crop: check against a manual decode."""
    image = read_image(SAMPLES / "2008_002470.jpg")
    box = (274.0, 181.0, 52.0, 53.0)
    [face] = landmarker.landmarks_for_boxes(image, [box])
    batch, [matrix] = landmarker.contract.prepare(to_gray(image), [box])
    expected = landmarker.contract.decode_points(landmarker.model.predict(batch)[0], matrix)
    np.testing.assert_allclose(face.landmarks, expected, atol=1e-3)
    assert face.box == box and face.score is None


def test_landmarker_accepts_gray_bgra_and_16_bit_arrays(landmarker):
    bgr = read_image(SAMPLES / "2009_004587.jpg")
    reference = landmarker.detect(bgr)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    deep = bgr.astype(np.uint16) * 257
    for variant in (gray, gray[:, :, None], bgra, deep):
        faces = landmarker.detect(variant)
        assert len(faces) == len(reference)
        np.testing.assert_allclose(faces[0].landmarks, reference[0].landmarks, atol=0.05)
    with pytest.raises(ImageError, match="float64"):
        landmarker.detect(bgr.astype(np.float64))


def test_no_face_is_an_empty_list(landmarker):
    assert landmarker.detect(read_image(SAMPLES / "dogs.jpg")) == []
    assert landmarker.detect(np.zeros((240, 320, 3), np.uint8)) == []
    assert landmarker.landmarks_for_boxes(np.zeros((240, 320, 3), np.uint8), []) == []


def test_model_calibration_is_applied_to_detector_boxes(tiny_checkpoint, tmp_path):
    calibration = BoxCalibration(dx=0.0, dy=0.1, sw=0.8, sh=0.9, detector="opencv-haar", samples=10)
    path = export_tiny_onnx(tiny_checkpoint, tmp_path / "calibrated.onnx", calibration)
    landmarker = FaceLandmarker(path, device="cpu", threads=1, refine=0)
    assert landmarker.calibration == calibration
    face = landmarker.detect(read_image(SAMPLES / "2009_004587.jpg"))[0]
    np.testing.assert_allclose(face.box, calibration.apply(face.detector_box))


@requires_dlib_examples
def test_whole_pipeline_on_dlib_example_photos(landmarker):
    for name in ("2008_001322.jpg", "bald_guys.jpg", "Tom_Cruise_avp_2014_4.jpg"):
        image = read_image(DLIB_EXAMPLES / name)
        faces = landmarker.detect(image)
        assert faces, name
        for face in faces:
            assert np.isfinite(face.landmarks).all()
    assert landmarker.detect(read_image(DLIB_EXAMPLES / "dogs.jpg")) == []


# --- torch-free ------------------------------------------------------------------------------------------------
def test_runtime_imports_and_cli_help_without_torch():
    code = (
        "import sys, facemark.runtime\n"
        "from facemark.runtime import FaceLandmarker, HaarDetector, LandmarkModel, available_providers\n"
        "import facemark.runtime.video, facemark.runtime.predict.runner, facemark.runtime.predict.writers\n"
        "import facemark.runtime.calibration, facemark.runtime.serving.protocol\n"
        "from facemark.cli import run\n"
        "code = run(['runtime', '--help'])\n"
        "assert code == 0, code\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "print('TORCH-FREE')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "TORCH-FREE" in done.stdout and "predict" in done.stdout and "video" in done.stdout


# --- throughput: many images at once -------------------------------------------------------------------------
def _sample_paths() -> list[Path]:
    return sorted(SAMPLES.glob("*.jpg"))  # five photos with faces and dogs.jpg (no face)


def _same_faces(a: list[Face], b: list[Face], atol: float = 0.05) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.landmarks, y.landmarks, atol=atol)
        np.testing.assert_allclose(x.box, y.box, atol=atol)
        assert x.detector_box == y.detector_box


@pytest.mark.parametrize("refine", [0, 1])
def test_detect_many_equals_one_by_one_with_one_model_call_per_pass(tiny_onnx, refine, monkeypatch):
    landmarker = FaceLandmarker(tiny_onnx, device="cpu", threads=1, refine=refine)
    images = [read_image(p) for p in _sample_paths()]
    alone = [landmarker.detect_full(image) for image in images]
    calls = []
    original = landmarker.model.predict_outputs
    monkeypatch.setattr(landmarker.model, "predict_outputs",
                        lambda batch, *a: calls.append(len(batch)) or original(batch, *a))
    together = landmarker.detect_many(images, workers=3)
    assert len(together) == len(images)
    total = sum(len(r.faces) for r in alone)
    assert total >= 6 and any(not r.faces for r in alone), "samples: several faces, and dogs.jpg without one"
    assert calls == [total] * (refine + 1), "one batched model call per pass over every image's faces"
    for one, many in zip(alone, together, strict=True):
        _same_faces(one.faces, many.faces)
        assert set(many.times) == {"detect", "landmarks"} and all(v >= 0 for v in many.times.values())
    assert landmarker.detect_many([]) == []


def test_detect_many_takes_paths_and_pil_images_like_detect(landmarker):
    from PIL import Image

    path = _sample_paths()[0]
    reference = landmarker.detect(read_image(path))
    from_path, from_pil = landmarker.detect_many([path, Image.open(path)], workers=2)
    _same_faces(from_path.faces, reference)
    _same_faces(from_pil.faces, reference)


@pytest.mark.parametrize("workers", [2, 3])
def test_pipelined_folder_run_keeps_order_and_equals_one_by_one_and_survives_a_bad_file(
        landmarker, tmp_path, workers):
    from facemark.runtime.predict.runner import predict_files
    from facemark.runtime.predict.writers import OUTPUTS_MANIFEST

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    samples = _sample_paths()
    files = samples[:3] + [broken] + samples[3:] + samples[:2]  # the bad file in the middle, some twice
    sequential = predict_files(landmarker, files, workers=1)
    seen: list[str] = []
    pipelined = predict_files(landmarker, files, tmp_path / "out", workers=workers,
                              on_result=lambda r: seen.append(r.path))
    assert [r.path for r in pipelined] == [str(f) for f in files] == seen
    for one, many in zip(sequential, pipelined, strict=True):
        assert (one.error is None) == (many.error is None)
        _same_faces(one.faces, many.faces)
        assert (one.width, one.height) == (many.width, many.height)
    [bad] = [r for r in pipelined if r.error]
    assert bad.path == str(broken) and str(broken) in bad.error and not bad.faces
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != OUTPUTS_MANIFEST)
    assert len(written) == len(set(files)) - 1, "one annotated picture per readable file, none for the bad one"
    assert all(r.output for r in pipelined if not r.error)


def test_pipelined_run_stops_between_groups_with_a_prefix_in_order(landmarker):
    from facemark.runtime.predict.runner import predict_files

    files = _sample_paths() * 5  # 30 files: several groups
    done: list[str] = []
    results = predict_files(landmarker, files, workers=2, on_result=lambda r: done.append(r.path),
                            stop_requested=lambda: len(done) >= 1)
    assert 1 <= len(results) < len(files)
    assert [r.path for r in results] == [str(f) for f in files[: len(results)]]


def test_haar_copy_follows_the_smallest_face_wanted():
    detector = HaarDetector(min_face_fraction=0.1, min_face_windows=1.5, max_side=None)
    window = detector._window[0]
    assert detector.copy_factor(640, 480) == pytest.approx(1.5 * window / 48)
    assert detector.copy_factor(1920, 1080) == pytest.approx(1.5 * window / 108)
    assert detector.copy_factor(64, 48) == 1.0, "never upscaled"
    assert HaarDetector(min_face_fraction=0.1, max_side=None, min_face_windows=None).copy_factor(1920, 1080) == 1.0
    assert HaarDetector(min_face_fraction=0.1, max_side=None).copy_factor(1920, 1080) < 1.0, "sized by default"
    assert HaarDetector(min_face_fraction=0.0, min_face_windows=1.5, max_side=None).copy_factor(640, 480) == 1.0
    assert HaarDetector(min_face_fraction=0.1, min_face_windows=4, max_side=800).copy_factor(1920, 1080) == \
        pytest.approx(800 / 1920), "max_side shrinks more here"
    with pytest.raises(ValueError, match="min_face_windows"):
        HaarDetector(min_face_windows=0.5)


def test_haar_on_a_smaller_copy_finds_the_same_faces_in_image_pixels():
    gray = read_gray(SAMPLES / "2009_004587.jpg")
    big = cv2.resize(gray, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    full = HaarDetector(max_side=None, min_face_fraction=0.1).detect(big)
    cheap = HaarDetector(max_side=None, min_face_fraction=0.1, min_face_windows=1.5)
    assert cheap.copy_factor(big.shape[1], big.shape[0]) < 0.5
    small = cheap.detect(big)
    assert small and len(small) == len(full)
    for a, b in zip(sorted(d.box for d in full), sorted(d.box for d in small), strict=True):
        np.testing.assert_allclose(b, a, atol=0.15 * a[2])


@pytest.mark.parametrize("min_neighbors", [1, 4])
def test_group_hits_groups_raw_cascade_hits_as_opencv_does(min_neighbors):
    from facemark.runtime.detector import group_hits

    cascade = cv2.CascadeClassifier(str(default_cascade_path()))
    for name in ("2009_004587.jpg", "2008_002470.jpg"):
        gray = read_gray(SAMPLES / name)
        raw = cascade.detectMultiScale3(gray, 1.1, 0, minSize=(30, 30), outputRejectLevels=True)
        grouped = cascade.detectMultiScale3(gray, 1.1, min_neighbors, minSize=(30, 30), outputRejectLevels=True)
        rects, levels, weights = (np.asarray(a, dtype=np.float64).reshape(len(raw[0]), -1) for a in raw)
        mine = group_hits(rects, levels.ravel().astype(int), weights.ravel(), min_neighbors)
        theirs = [(tuple(map(float, r)), float(w)) for r, w in zip(np.asarray(grouped[0]).reshape(-1, 4),
                                                                   np.asarray(grouped[2]).ravel(), strict=True)]
        assert len(rects) > len(theirs) > 0
        assert len(mine) == len(theirs)
        for (box, score), (their_box, their_score) in zip(sorted(mine), sorted(theirs), strict=True):
            np.testing.assert_allclose(box, their_box, atol=1)  # OpenCV rounds a float32 mean
            assert score == pytest.approx(their_score)


def test_group_hits_at_zero_neighbours_groups_and_keeps_a_single_hit():
    from facemark.runtime.detector import group_hits

    cluster = [(100, 100, 50, 50), (102, 101, 50, 50), (99, 103, 52, 52)]
    lonely = (300, 40, 30, 30)
    rects = np.asarray([*cluster, lonely], dtype=np.float64)
    levels, weights = np.zeros(4, dtype=np.int64), np.array([1.0, 3.0, 2.0, 0.5])
    kept = group_hits(rects, levels, weights, 0)
    assert len(kept) == 2  # not the four raw hits OpenCV returns at minNeighbors=0
    boxes = dict((box, score) for box, score in kept)
    np.testing.assert_allclose(min(boxes), np.rint(np.mean(cluster, axis=0)))
    assert boxes[min(boxes)] == 3.0 and boxes[tuple(map(float, lonely))] == 0.5
    assert [box for box, _ in group_hits(rects, levels, weights, 1)] == [min(boxes)]
    assert group_hits(np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0), 0) == []


def test_group_hits_in_row_blocks_equals_one_block(monkeypatch):
    from facemark.runtime import detector

    cascade = cv2.CascadeClassifier(str(default_cascade_path()))
    raw = cascade.detectMultiScale3(read_gray(SAMPLES / "2008_002470.jpg"), 1.1, 0, minSize=(30, 30),
                                    outputRejectLevels=True)
    rects, levels, weights = (np.asarray(a, dtype=np.float64).reshape(len(raw[0]), -1) for a in raw)
    assert len(rects) > 50
    whole = detector.group_hits(rects, levels.ravel().astype(int), weights.ravel(), 0)
    monkeypatch.setattr(detector, "GROUP_ROWS", 7)
    assert detector.group_hits(rects, levels.ravel().astype(int), weights.ravel(), 0) == whole


def test_haar_at_zero_neighbours_finds_every_face_of_one_neighbour_and_more():
    for name in ("2009_004587.jpg", "2008_002470.jpg"):
        gray = read_gray(SAMPLES / name)
        strict = HaarDetector(min_neighbors=1).detect(gray)
        loose = HaarDetector(min_neighbors=0).detect(gray)
        assert strict and len(loose) > len(strict), name
        for d in strict:  # the same faces, about the same boxes
            assert max(box_iou(d.box, o.box) for o in loose) > 0.7, name
    with pytest.raises(ValueError, match="min_neighbors"):
        HaarDetector(min_neighbors=-1)


def test_shrunk_face_scenes_place_each_face_at_the_asked_size_on_a_faceless_background():
    from facemark.benchmarks.detector_sweep import shrunk_face_scenes

    records = load_records([SAMPLE_XML], warn=pytest.fail)[:6]
    scenes = shrunk_face_scenes(records, 0.1)
    empty = shrunk_face_scenes([], 0.1)
    assert len(scenes) == 6 and empty == []
    for scene, (x, y, w, h) in scenes:
        assert scene.shape == (480, 640)
        assert max(w, h) == pytest.approx(48, abs=1)  # 10 % of the frame's height
        assert 0 <= x and 0 <= y and x + w <= 640 and y + h <= 480
        # the face is pasted: its box holds detail the blurred background lacks
        face = scene[int(y):int(y + h), int(x):int(x + w)].astype(float)
        assert np.abs(np.diff(face, axis=1)).mean() > 2 * np.abs(np.diff(scene[:20].astype(float), axis=1)).mean()


def test_presence_detector_defaults_find_every_sample_face_at_the_smallest_size_wanted():
    """The fast defaults (step 1.25, single hits kept) must still find faces of --min-face (8 % of the frame):
    the validation split alone has none that small. Coarser settings fail here (1.4 / 1.5 windows: 76 %)."""
    from facemark.benchmarks.detector_sweep import shrunk_face_scenes, small_face_recall
    from facemark.runtime.detector import DEFAULT_MIN_FACE_FRACTION, default_detector_options

    records = load_records([SAMPLE_XML], warn=pytest.fail)
    scenes = {f: shrunk_face_scenes(records, f) for f in (DEFAULT_MIN_FACE_FRACTION, 0.13)}
    recall = small_face_recall(HaarDetector(**default_detector_options(has_presence_score=True)), scenes)
    assert min(recall.values()) >= 0.95, recall


def test_sweep_grid_searches_each_smallest_face_asked_for():
    """--min-faces is a grid dimension: a detector of the 13 % row does not search 8 % faces, the 8 % row does."""
    from facemark.benchmarks.detector_sweep import grid, shrunk_face_scenes, small_face_recall

    rows = grid("1.25", "2", 0, "haarcascade_frontalface_alt2.xml", min_faces="0.08,0.13")
    assert [r["min_face_fraction"] for r in rows] == [0.08, 0.13]
    records = load_records([SAMPLE_XML], warn=pytest.fail)
    scenes = {f: shrunk_face_scenes(records, f) for f in (0.08, 0.13)}
    fine, coarse = (small_face_recall(HaarDetector(**row), scenes) for row in rows)
    assert fine["0.08"] >= 0.9 and coarse["0.08"] == 0.0, (fine, coarse)
    assert coarse["0.13"] >= 0.9, coarse


def test_haar_octaves_find_the_faces_of_the_one_call_search_faster_per_window():
    records = load_records([SAMPLE_XML], warn=pytest.fail)
    plain = detect_records(records, HaarDetector())
    octaves = detect_records(records, HaarDetector(octaves=True))
    found_plain = sum(d is not None for _, d in plain)
    found_octaves = sum(d is not None for _, d in octaves)
    assert found_octaves >= found_plain - 1, f"octaves found {found_octaves}, one call {found_plain}"
    for (_, a), (_, b) in zip(plain, octaves, strict=True):
        if a is not None and b is not None:  # the same face, about the same box
            np.testing.assert_allclose(b.box, a.box, atol=0.2 * a.box[2])
    detector = HaarDetector(octaves=True)
    assert detector.detect(read_gray(SAMPLES / "dogs.jpg")) == []
    assert detector.config()["octaves"] is True
    # Faces of every size, on a copy the detector does not shrink, are searched by one octave or another.
    gray = read_gray(SAMPLES / "2009_004587.jpg")
    whole = {"min_face_fraction": 0.0, "max_side": None, "min_face_windows": None}
    for size in (0.5, 1.0, 2.0, 3.0):
        scaled = cv2.resize(gray, None, fx=size, fy=size, interpolation=cv2.INTER_CUBIC)
        one_call = HaarDetector(**whole).detect(scaled)
        by_octave = HaarDetector(**whole, octaves=True).detect(scaled)
        assert len(one_call) >= 2 and len(by_octave) >= len(one_call) - 1, f"scale {size}"
        for d in one_call[:2]:  # the two most confident faces of one call are found by octaves too
            assert max(box_iou(d.box, o.box) for o in by_octave) > 0.5, f"scale {size}"
    # around a tracked face too, down to regions no octave fits
    x, y, w, h = one_call[0].box
    assert HaarDetector(octaves=True).detect_near(scaled, [(x, y, w, h)])
    assert HaarDetector(octaves=True).detect_near(scaled, [(x, y, 11, 11)]) == []


def test_sessions_do_not_spin_unless_asked(tiny_onnx):
    quiet = session.LandmarkModel(tiny_onnx, provider="cpu").session.get_session_options()
    spinning = session.LandmarkModel(tiny_onnx, provider="cpu", spin=True).session.get_session_options()
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"
