"""The runtime's options, declared once (facemark.runtime.options) and shared by every command that runs the
pipeline: the same flags everywhere, presets, FaceLandmarker(options=...) equal to its keywords."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest
from conftest import SAMPLES

from facemark.cli import run
from facemark.imageio import read_image
from facemark.runtime.options import PRESETS, DetectorOptions, PipelineOptions, RuntimeOptions

COMMANDS = (["runtime", "predict"], ["runtime", "video"], ["evaluate"], ["serve"])


def _flags(cls) -> list[str]:
    return [f.metadata["cli"]["decls"].split("/")[0] for f in fields(cls)]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_a_flag_of_every_pipeline_command(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich would shorten long flag names to the terminal's width
    assert run([*command, "--help"]) == 0
    text = capsys.readouterr().out
    for flag in [*_flags(DetectorOptions), *_flags(PipelineOptions), "--preset"]:
        assert flag in text, f"{' '.join(command)}: {flag} missing"


def test_presets_and_explicit_flags():
    assert PipelineOptions.preset("fast").refine == 0
    accurate = PipelineOptions.preset("accurate")
    assert (accurate.refine, accurate.tta) == (PRESETS["accurate"]["refine"], "flip")
    # a flag given explicitly wins over the preset
    assert PipelineOptions(refine=2).with_preset("accurate", keep={"refine"}) == PipelineOptions(refine=2, tta="flip")
    with pytest.raises(ValueError, match="preset"):
        PipelineOptions.preset("slow")
    with pytest.raises(ValueError, match="refine"):
        PipelineOptions(refine=-1)


def test_haar_knobs_reach_haar_and_a_cnn_detector_gets_only_its_threshold():
    haar = DetectorOptions(scale_factor=1.3, min_face_windows=0.0).detector_kwargs()
    assert haar["scale_factor"] == 1.3 and haar["min_face_windows"] is None and "cascade" not in haar
    assert DetectorOptions(detector="faceboxes", min_detector_score=0.5).detector_kwargs() == {"min_score": 0.5}
    assert DetectorOptions(detector="centerface", detector_input_side=480).detector_kwargs() == {"input_side": 480}
    with pytest.raises(ValueError, match="not of haar"):
        DetectorOptions(detector_input_side=480)


def test_landmarker_options_object_equals_its_keywords():
    from facemark.runtime.landmarker import FaceLandmarker

    image = read_image(SAMPLES / "2008_002470.jpg")
    options = RuntimeOptions(DetectorOptions(scale_factor=1.2), PipelineOptions(refine=0, tta="flip"))
    by_options = FaceLandmarker(device="cpu", options=options)
    by_keywords = FaceLandmarker(device="cpu", refine=0, tta="flip", scale_factor=1.2)
    assert by_options.detector.config() == by_keywords.detector.config()
    a, b = by_options.detect(image), by_keywords.detect(image)
    assert len(a) == len(b) > 0
    assert all(np.allclose(x.landmarks, y.landmarks) for x, y in zip(a, b, strict=True))


def test_preset_on_the_command_line_is_recorded(tmp_path):
    lines = tmp_path / "out.jsonl"
    assert run(["runtime", "predict", str(SAMPLES / "2008_002470.jpg"), "--jsonl", str(lines), "--preset",
                "accurate", "--refine", "2"]) == 0
    pipeline = json.loads(lines.read_text().splitlines()[0])["pipeline"]
    assert (pipeline["refine"], pipeline["tta"]) == (2, "flip")
    assert run(["runtime", "predict", str(SAMPLES / "2008_002470.jpg"), "--detector", "centerface",
                "--scale-factor", "1.2"]) == 2  # a Haar knob with a CNN detector: one line, refused
