"""Landmark users' helpers: aligned face chips, head pose, CSV, the JSON Schema of every output, typed choices."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
from conftest import SAMPLES
from test_runtime import export_tiny_onnx
from test_runtime_video import still_face_frames, write_clip

from facemark.cli import run
from facemark.data import load_records
from facemark.geometry import (
    FACE_3D,
    POSE_POINTS,
    aligned_chip,
    alignment_matrix,
    camera_matrix,
    head_pose,
    rotation_matrix,
    template_points,
)
from facemark.imageio import read_image
from facemark.runtime.landmarker import Face
from facemark.runtime.schema import SCHEMA_NAMES, schema
from facemark.scheme import GROUPS, five_points

SAMPLE_XML = SAMPLES / "landmarks.xml"


@pytest.fixture(scope="module")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_tiny_onnx(tiny_checkpoint, tmp_path_factory.getbasetemp() / "runtime-models" / "tiny.onnx")


def sample_face() -> tuple[np.ndarray, np.ndarray]:
    record = load_records([SAMPLE_XML], pytest.fail)[0]
    return read_image(record.image_path), record.landmarks.astype(np.float64)


# --- head pose --------------------------------------------------------------------------------------------------
def rendered_landmarks(yaw: float, pitch: float, roll: float, size: tuple[int, int], noise: float,
                       seed: int = 0) -> np.ndarray:
    """68 points whose pose points are the 3D template projected under a known rotation (plus pixel noise)."""
    rvec = cv2.Rodrigues(rotation_matrix(yaw, pitch, roll))[0]
    tvec = np.array([[30.0], [-20.0], [2200.0]])
    projected = cv2.projectPoints(FACE_3D, rvec, tvec, camera_matrix(*size), None)[0].reshape(-1, 2)
    points = np.zeros((68, 2))
    points[list(POSE_POINTS)] = projected + np.random.default_rng(seed).normal(0, noise, projected.shape)
    return points


@pytest.mark.parametrize("angles", [(0, 0, 0), (30, 0, 0), (-35, 10, 0), (0, -20, 0), (0, 0, 25),
                                    (20, 15, -10), (-25, -15, 20)])
def test_head_pose_recovers_known_rotations_within_3_degrees(angles):
    size = (1280, 720)
    points = rendered_landmarks(*angles, size, noise=0.5)
    pose = head_pose(points, size)
    np.testing.assert_allclose(pose, angles, atol=3.0)
    face = Face(box=(0, 0, 1, 1), landmarks=points.astype(np.float32), image_size=size)
    np.testing.assert_allclose(face.pose, angles, atol=3.0)


def test_head_pose_signs_follow_the_documented_convention():
    size = (1280, 720)
    turned_left = rendered_landmarks(30, 0, 0, size, 0)
    nose, eyes = turned_left[30], turned_left[[36, 45]].mean(0)
    assert nose[0] < eyes[0], "positive yaw: the face turns towards the image's left edge"
    tilted = rendered_landmarks(0, 0, 20, size, 0)
    right_eye_corner, left_eye_corner = tilted[36], tilted[45]
    assert left_eye_corner[1] > right_eye_corner[1], "positive roll: clockwise in the image"


def test_pose_of_a_real_frontal_face_is_small_and_needs_the_image_size():
    image, points = sample_face()
    pose = head_pose(points, (image.shape[1], image.shape[0]))
    assert all(abs(v) < 35 for v in pose), pose
    with pytest.raises(ValueError, match="image size"):
        _ = Face(box=(0, 0, 1, 1), landmarks=points.astype(np.float32)).pose


# --- aligned chips ----------------------------------------------------------------------------------------------
def marked_image(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A black image with a bright dot at each eye centre of `points`."""
    canvas = np.zeros(shape, np.uint8)
    for centre in five_points(points)[:2]:
        cv2.circle(canvas, (int(round(centre[0])), int(round(centre[1]))), 3, 255, -1, lineType=cv2.LINE_AA)
    return canvas


def blob_centres(chip: np.ndarray) -> np.ndarray:
    count, _, _, centroids = cv2.connectedComponentsWithStats((chip > 40).astype(np.uint8))
    return centroids[1:][np.argsort(centroids[1:, 0])]


@pytest.mark.parametrize(("template", "size", "tolerance"), [("eyes", 128, 1.5), ("arcface", 112, 4.0)])
def test_aligned_chip_puts_the_eye_centres_where_the_template_says(template, size, tolerance):
    image, points = sample_face()
    angle = 25.0  # rotate the photo so the alignment has a roll to undo
    centre = (image.shape[1] / 2, image.shape[0] / 2)
    rotate = cv2.getRotationMatrix2D(centre, angle, 1.0)
    rotated_points = points @ rotate[:, :2].T + rotate[:, 2]
    marks = marked_image(rotated_points, image.shape[:2])
    chip = aligned_chip(marks, rotated_points, size, template)
    assert chip.shape == (size, size)
    eyes = blob_centres(chip)
    assert len(eyes) == 2, "both eye marks inside the chip"
    expected = template_points(template, size)[:2]
    np.testing.assert_allclose(eyes, expected, atol=tolerance)
    colour = aligned_chip(image, rotated_points, size, template)
    assert colour.shape == (size, size, 3) and colour.std() > 10, "a real picture, not an empty warp"


def test_face_aligned_matches_the_geometry_function_and_checks_its_arguments():
    image, points = sample_face()
    face = Face(box=(0, 0, 1, 1), landmarks=points.astype(np.float32), image_size=image.shape[1::-1])
    np.testing.assert_array_equal(face.aligned(image, 96, "eyes"), aligned_chip(image, points, 96, "eyes"))
    eye_gap = np.linalg.norm(five_points(points)[0] - five_points(points)[1])
    scale = np.linalg.norm(alignment_matrix(points, 112, "eyes")[:, 0])
    assert scale * eye_gap == pytest.approx(0.3 * 112, rel=1e-6)
    with pytest.raises(ValueError, match="template"):
        face.aligned(image, 112, "nose")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        face.aligned(image, 4)
    assert len(GROUPS["right_eye"]) == 6


# --- predict outputs: --aligned, --pose, --csv, schema ---------------------------------------------------------
def validate(instance: dict, name: str) -> None:
    jsonschema.Draft202012Validator(schema(name)).validate(instance)


def test_schema_command_prints_valid_json_schemas(capsys):
    for name in SCHEMA_NAMES:
        assert run(["schema", name]) == 0
        printed = json.loads(capsys.readouterr().out)
        jsonschema.Draft202012Validator.check_schema(printed)
        assert printed == schema(name)
    assert run(["schema", "nonsense"]) == 2


def test_schema_rejects_what_it_should():
    with pytest.raises(jsonschema.ValidationError):
        validate({"path": "a.jpg", "width": 1, "height": 1, "faces": [{"box": [1, 2, 3]}], "error": None}, "image")
    with pytest.raises(jsonschema.ValidationError):
        validate({"frame": 0, "time": 0.0, "detected": True, "faces": [], "extra": 1}, "video")


def test_predict_writes_pose_csv_and_aligned_chips_that_match_the_schema(tmp_path, tiny_onnx):
    out_json, out_csv, jsonl, chips = (tmp_path / "r.json", tmp_path / "faces.csv", tmp_path / "r.jsonl",
                                       tmp_path / "chips")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no png")
    code = run(["runtime", "predict", str(SAMPLES), str(broken), "--model", str(tiny_onnx), "--device", "cpu",
                "--json", str(out_json), "--jsonl", str(jsonl), "--csv", str(out_csv), "--pose",
                "--aligned", str(chips), "--aligned-size", "96"])
    assert code == 1, "the broken file fails the run; the rest is written"
    doc = json.loads(out_json.read_text())
    validate(doc, "predict")
    for line in jsonl.read_text().splitlines():
        validate(json.loads(line), "image")
    faces = [(i["path"], f) for i in doc["images"] for f in i["faces"]]
    assert len(faces) >= 5 and all(set(f["pose"]) == {"yaw", "pitch", "roll"} for _, f in faces)
    with open(out_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(faces)
    assert len(rows[0]) == 7 + 136 + 3 + 1  # path, face, box, score; the points; the pose; path_bytes
    first_path, first = faces[0]
    assert rows[0]["path"] == first_path and float(rows[0]["x0"]) == pytest.approx(first["landmarks"][0][0], abs=0.01)
    assert float(rows[0]["yaw"]) == pytest.approx(first["pose"]["yaw"], abs=0.01)
    written = sorted(chips.glob("*.png"))
    assert len(written) == len(faces)
    assert all(cv2.imread(str(p)).shape == (96, 96, 3) for p in written)


def test_choices_are_checked_before_any_work(tiny_onnx, capsys):
    for args in (["runtime", "predict", str(SAMPLES), "--draw", "dots"], ["runtime", "predict", str(SAMPLES),
                 "--device", "gpu"], ["runtime", "predict", str(SAMPLES), "--tta", "mirror"],
                 ["runtime", "video", "x.mp4", "--draw", "dots"], ["export", "x.pt", "--precision", "int4"],
                 ["evaluate", "--model", "m.onnx", "--data", ".", "--boxes", "dlib"]):
        assert run(args) == 2, args
        err = capsys.readouterr().err
        assert "Invalid value" in err, err


# --- video: JSON lines on stdout, detector options ---------------------------------------------------------------
def test_video_without_outputs_streams_schema_valid_json_lines_to_stdout(tmp_path, tiny_onnx, capsys):
    clip = write_clip(tmp_path / "clip.mp4", still_face_frames(5))
    code = run(["runtime", "video", str(clip), "--model", str(tiny_onnx), "--device", "cpu", "--no-smooth",
                "--scale-factor", "1.2", "--min-neighbors", "2", "--max-side", "320", "--max-faces", "1",
                "--cascade", "haarcascade_frontalface_default.xml"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["frame"] for line in lines] == list(range(5))
    for line in lines:
        validate(line, "video")
        assert len(line["faces"]) <= 1


# --- figures ----------------------------------------------------------------------------------------------------
def test_ced_plot_is_a_matplotlib_figure_with_the_summary_in_its_legend(tmp_path, monkeypatch):
    from PIL import Image

    from facemark import plots

    labels = []
    original = plots._save

    def spy(figure, path):
        labels.extend(t.get_text() for t in figure.axes[0].get_legend().get_texts())
        assert figure.axes[0].get_xlabel() and figure.axes[0].get_ylabel()
        original(figure, path)

    monkeypatch.setattr(plots, "_save", spy)
    errors = np.random.default_rng(0).gamma(4.0, 0.012, 300)
    plots.plot_ced({"model": errors}, tmp_path / "ced.png")
    assert labels and labels[0].startswith("model: NME") and "AUC@0.08" in labels[0] and "FR@0.08" in labels[0]
    with Image.open(tmp_path / "ced.png") as image:
        assert image.format == "PNG" and image.info.get("Software", "").startswith("Matplotlib")


def test_latency_chart_has_labelled_axes_and_one_bar_per_row(tmp_path, monkeypatch):
    from facemark import plots

    seen = {}
    original = plots._save

    def spy(figure, path):
        axes = figure.axes[0]
        seen["bars"], seen["xlabel"] = len(axes.patches), axes.get_xlabel()
        seen["ticks"] = [t.get_text() for t in axes.get_yticklabels()]
        original(figure, path)

    monkeypatch.setattr(plots, "_save", spy)
    bars = [("ort-fp32 cpu b1", 4.0, 4.5, "ort"), ("torch-fp32 cpu b1", 9.0, 10.0, "torch"),
            ("dlib b1", 1.7, None, "dlib")]
    plots.plot_latency(bars, tmp_path / "chart.png")
    assert seen["bars"] == 3 and "ms per face" in seen["xlabel"]
    assert seen["ticks"] == [b[0] for b in bars]
    assert (tmp_path / "chart.png").stat().st_size > 1000
