"""The Python API speaks the command line's language (issue 40): FaceLandmarker's keywords are runtime predict's
options with `_` (one source: facemark.runtime.options), old keywords warn, detect_many gives per-image sequences
of faces with a per-image error, faces come in one documented order, close() and `with`, `color` in any case,
errors that name Python keywords in Python and flags on the command line, URLs kept whole in errors."""

from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import fields

import cv2
import numpy as np
import pytest
from conftest import SAMPLES

from facemark.cli import run
from facemark.errors import ClosedError, ImageError, ProviderError, SettingError, cli_message
from facemark.imageio import read_image
from facemark.runtime import session
from facemark.runtime.landmarker import FACE_ORDER, Detections, FaceLandmarker, presence_rank
from facemark.runtime.options import PRESETS, SETTING_NAMES, DetectorOptions, PipelineOptions, RuntimeOptions

GROUP = SAMPLES / "2008_002470.jpg"  # six faces whose presence scores are not in the detector's order
URL = "https://example.com/a.jpg"


@pytest.fixture(scope="module")
def landmarker() -> FaceLandmarker:
    return FaceLandmarker(device="cpu", threads=1)


@pytest.fixture(scope="module")
def group() -> np.ndarray:
    return read_image(GROUP)


def _flag_names() -> list[str]:
    """runtime predict's detector and pipeline flags as keywords: --min-face -> min_face."""
    decls = [f.metadata["cli"]["decls"].split("/")[0] for cls in (DetectorOptions, PipelineOptions)
             for f in fields(cls)]
    return [d.removeprefix("--").replace("-", "_") for d in decls]


# --- keywords ------------------------------------------------------------------------------------------------
def test_every_option_flag_is_a_keyword_by_the_same_name():
    keywords = inspect.signature(FaceLandmarker).parameters
    for name in [*_flag_names(), "preset", "device", "threads", "trt_fp16", "trt_cache"]:
        assert name in keywords, f"FaceLandmarker has no {name}= (runtime predict's --{name.replace('_', '-')})"
    assert set(_flag_names()) == set(SETTING_NAMES)


def test_preset_and_tta_keywords_as_on_the_command_line():
    accurate = FaceLandmarker(device="cpu", threads=1, preset="accurate")
    assert (accurate.refine, accurate.flip) == (PRESETS["accurate"]["refine"], True)
    assert accurate.pipeline_settings()["tta"] == "flip"
    explicit = FaceLandmarker(device="cpu", threads=1, preset="accurate", refine=0, tta="none", min_face=0.2)
    assert (explicit.refine, explicit.flip) == (0, False)  # keywords given win over the preset, as flags do
    assert explicit.detector.config()["min_face_fraction"] == 0.2


def test_fast_is_its_own_pipeline_and_default_the_defaults(landmarker):
    assert RuntimeOptions.from_settings(preset="fast") != RuntimeOptions.from_settings(preset="default")
    assert RuntimeOptions.from_settings(preset="default") == RuntimeOptions()
    fast = FaceLandmarker(device="cpu", threads=1, preset="fast")
    assert fast.detector.config()["min_face_fraction"] == PRESETS["fast"]["min_face"]
    assert landmarker.detector.config()["min_face_fraction"] == DetectorOptions().min_face


def test_fast_preset_on_the_command_line_reaches_the_detector(tmp_path):
    lines = tmp_path / "out.jsonl"
    assert run(["runtime", "predict", str(SAMPLES / "2009_004587.jpg"), "--jsonl", str(lines), "--preset", "fast",
                "--device", "cpu"]) == 0
    detector = json.loads(lines.read_text().splitlines()[0])["run"]["detector"]
    assert detector["min_face_fraction"] == PRESETS["fast"]["min_face"]


def test_old_keywords_still_work_with_a_deprecation_naming_the_new_one(group):
    with pytest.warns(DeprecationWarning, match="deprecated: use") as caught:
        old = FaceLandmarker(provider="cpu", threads=1, flip=True, detector_options={"min_face_fraction": 0.1})
    assert {str(w.message).split(")")[0] for w in caught} >= {"FaceLandmarker(provider=...", "FaceLandmarker(flip=..."}
    new = FaceLandmarker(device="cpu", threads=1, tta="flip", min_face=0.1)
    assert old.options == new.options
    a, b = old.detect(group), new.detect(group)
    assert len(a) == len(b) > 0 and all(np.allclose(x.landmarks, y.landmarks) for x, y in zip(a, b, strict=True))


def test_an_unknown_keyword_is_a_type_error_listing_the_valid_ones():
    with pytest.raises(TypeError, match="unknown keyword.*min_faces;.*device.*min_face.*tta"):
        FaceLandmarker(device="cpu", min_faces=3)


def test_values_are_checked_against_the_flags_bounds():
    with pytest.raises(ValueError, match="max_faces=0"):
        FaceLandmarker(device="cpu", max_faces=0)
    with pytest.raises(ValueError, match="min_score=1.5"):
        FaceLandmarker(device="cpu", min_score=1.5)
    for keyword, value in (("min_face", 5), ("scale_factor", 1.0), ("max_side", 10), ("min_face_windows", 0.5)):
        with pytest.raises(SettingError, match=f"^{keyword}={value}: must be"):  # the Haar detector's limits
            FaceLandmarker(device="cpu", **{keyword: value})
    with pytest.raises(SettingError, match="min_face: Haar options, not for detector='faceboxes'"):
        FaceLandmarker(device="cpu", detector="faceboxes", min_face=0.1)  # refused as on the command line


# --- detect_many ---------------------------------------------------------------------------------------------
def test_detect_many_gives_one_sequence_of_faces_per_image_and_a_bad_image_only_its_own_error(landmarker, group,
                                                                                             tmp_path):
    missing = tmp_path / "missing.jpg"
    results = landmarker.detect_many([group, None, group.astype(np.float32), str(missing), group], workers=2)
    assert len(results) == 5
    alone = landmarker.detect(group)
    for good in (results[0], results[4]):
        assert good.error is None and len(good) == len(alone) > 0 and bool(good)
        assert [f.box for f in good] == [f.box for f in alone]  # iteration
        assert good[0].box == alone[0].box and good[-1].box == alone[-1].box  # indexing
    for bad, reason in zip(results[1:4], ("None", "float32", "no such file"), strict=True):
        assert len(bad) == 0 and not bad and list(bad) == []
        assert reason in bad.error and "\n" not in bad.error
    assert isinstance(results[0], Detections) and results[0].faces == list(results[0])
    with pytest.raises(ImageError, match="color"):  # a wrong color is the caller's: the call fails
        landmarker.detect_many([group], color="hsv")


# --- face order ----------------------------------------------------------------------------------------------
def test_faces_come_by_presence_score_then_detector_score_in_detect_and_detect_many(landmarker, group):
    faces = landmarker.detect(group)
    keys = [(presence_rank(f.score), f.detector_score) for f in faces]
    assert len(faces) > 2 and keys == sorted(keys, reverse=True), FACE_ORDER
    assert [f.box for f in landmarker.detect_many([group])[0]] == [f.box for f in faces]
    plain = FaceLandmarker(device="cpu", threads=1, min_score=0)
    plain.by_presence = False  # as for a model without a (trusted) presence score: the detector's order
    scores = [f.detector_score for f in plain.detect(group)]
    assert len(scores) > 2 and scores == sorted(scores, reverse=True)


def test_max_faces_keeps_the_first_of_that_order(landmarker, group):
    everything = landmarker.detect(group)
    two = FaceLandmarker(device="cpu", threads=1, max_faces=2).detect(group)
    assert [presence_rank(f.score) for f in two] == sorted((presence_rank(f.score) for f in everything),
                                                             reverse=True)[:2]
    assert [f.box for f in two] == [f.box for f in everything[:2]]


# --- close ---------------------------------------------------------------------------------------------------
def test_close_and_with_release_the_model_and_later_use_is_a_clear_error(group):
    with FaceLandmarker(device="cpu", threads=1) as landmarker:
        assert len(landmarker.detect(group)) > 0
    assert landmarker.closed
    for use in (lambda: landmarker.detect(group), lambda: landmarker.detect_many([group]), lambda: landmarker.info):
        with pytest.raises(ClosedError, match="closed"):
            use()
    landmarker.close()  # twice is harmless
    assert "closed" in repr(landmarker)


# --- color ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("color", ["RGB", "Rgb"])
def test_color_is_case_insensitive(landmarker, group, color):
    rgb = cv2.cvtColor(group, cv2.COLOR_BGR2RGB)
    expected = [f.box for f in landmarker.detect(rgb, color="rgb")]
    assert [f.box for f in landmarker.detect(rgb, color=color)] == expected
    assert [f.box for f in landmarker.detect(cv2.cvtColor(group, cv2.COLOR_BGR2GRAY), color="GRAY")] == \
        [f.box for f in landmarker.detect(cv2.cvtColor(group, cv2.COLOR_BGR2GRAY), color="gray")]


# --- errors in the caller's words ----------------------------------------------------------------------------
@pytest.mark.skipif(session.CUDA in session.available_providers(), reason="CUDA runs here")
def test_a_device_that_cannot_run_names_python_keywords_in_python_and_flags_on_the_command_line(capsys):
    with pytest.raises(ProviderError) as caught:
        FaceLandmarker(device="cuda")
    assert "device='cpu'" in str(caught.value) and "--" not in str(caught.value)
    assert "--device cpu" in cli_message(caught.value)
    assert run(["runtime", "predict", str(GROUP), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cpu" in err and "device='cpu'" not in err


def test_option_errors_name_the_keyword_in_python_and_the_flag_on_the_command_line(capsys):
    with pytest.raises(SettingError) as caught:
        FaceLandmarker(device="cpu", detector_input_side=320)
    assert str(caught.value).startswith("detector_input_side:") and "--" not in str(caught.value)
    assert run(["runtime", "predict", str(GROUP), "--detector-input-side", "320"]) == 2
    assert "--detector-input-side" in capsys.readouterr().err
    assert run(["runtime", "predict", str(GROUP), "--min-face", "5"]) == 2
    assert "--min-face 5.0: must be" in capsys.readouterr().err  # not the detector's internal min_face_fraction


def test_a_missing_default_model_says_how_to_pass_one_in_the_callers_words(monkeypatch, tmp_path):
    from facemark.errors import ModelError
    from facemark.runtime import landmarker as landmarker_module

    monkeypatch.setattr(landmarker_module, "DEFAULT_MODEL_PATH", tmp_path / "absent.onnx")
    with pytest.raises(ModelError) as caught:
        FaceLandmarker(device="cpu")
    assert "FaceLandmarker('model.onnx')" in str(caught.value) and "--model" not in str(caught.value)
    assert "--model model.onnx" in cli_message(caught.value)


# --- URLs ----------------------------------------------------------------------------------------------------
def test_a_url_keeps_its_slashes_and_says_it_is_not_fetched(landmarker, capsys):
    with pytest.raises(ImageError) as caught:
        landmarker.detect(URL)
    assert str(caught.value).startswith(URL + ":") and "URL" in str(caught.value)
    assert URL in landmarker.detect_many([URL])[0].error
    assert run(["runtime", "predict", URL, "--json", "-"]) == 1
    error = json.loads(capsys.readouterr().out)["images"][0]["error"]
    assert error.startswith(URL + ":") and "URL" in error


def test_a_file_over_the_size_limit_names_the_keyword_in_python_and_the_flag_on_the_command_line(tmp_path, capsys):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes((SAMPLES / "2008_002470.jpg").read_bytes())
    with pytest.raises(ImageError) as caught:
        read_image(photo, max_bytes=1000)
    assert "max_bytes" in str(caught.value) and "--max-file-mb" not in str(caught.value)
    assert "--max-file-mb" in cli_message(caught.value)
    assert run(["runtime", "predict", str(photo), "--max-file-mb", "0.001", "--json", "-"]) == 1
    error = json.loads(capsys.readouterr().out)["images"][0]["error"]
    assert "larger than the limit" in error and "--max-file-mb" in error and "max_bytes" not in error


def test_deprecation_warnings_are_not_raised_by_the_current_keywords():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        FaceLandmarker(device="cpu", threads=1, tta="flip", trt_cache=None, max_batch_size=8)
