"""The shipped default model (facemark/assets): present, self-describing, accurate on the shipped samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_300W, DLIB_EXAMPLES, SAMPLES, requires_300w, requires_dlib_examples

from facemark.cli import run
from facemark.contract import box_from_landmarks, box_iou
from facemark.data import load_records
from facemark.evaluation import evaluate
from facemark.imageio import read_image
from facemark.metadata import PARITY, VAL_NME
from facemark.metrics import nme_per_face
from facemark.runtime.defaults import DEFAULT_REFINE
from facemark.runtime.landmarker import DEFAULT_MODEL_PATH, FaceLandmarker
from facemark.runtime.session import LandmarkModel

# A random or broken network scores 30-70 % here; the shipped one about 5 % (docs/MODEL.md).
NME_BOUND_GT_BOXES = 0.09
NME_BOUND_HAAR = 0.12


@pytest.fixture(scope="module")
def records():
    return load_records([SAMPLES / "landmarks.xml"], lambda _: None)


@pytest.fixture(scope="module")
def landmarker():
    return FaceLandmarker(provider="cpu")


def test_shipped_model_is_small_and_self_describing():
    assert DEFAULT_MODEL_PATH.is_file(), "the default model must ship in facemark/assets"
    assert DEFAULT_MODEL_PATH.stat().st_size <= 25 * 2**20
    model = LandmarkModel(DEFAULT_MODEL_PATH, provider="cpu")
    info = model.info
    assert info.points == "ibug68" and info.precision in ("fp32", "fp16", "int8")
    assert info.calibration is not None and info.calibration.samples > 100  # fitted Haar calibration
    assert 0 < float(info.raw[VAL_NME]) < 0.08
    parity = json.loads(info.raw[PARITY])
    assert parity["verified"] and parity["passed"]
    assert model.contract.size in (128, 160, 224)


def test_accuracy_on_the_shipped_samples_with_landmark_boxes(records):
    model = LandmarkModel(DEFAULT_MODEL_PATH, provider="cpu")
    summary = evaluate(model, records).summary()
    assert summary["faces"] == len(records) == 25
    assert summary["nme"] < NME_BOUND_GT_BOXES, summary


def test_default_landmarker_finds_and_landmarks_the_sample_faces(records, landmarker):
    errors, found = [], 0
    for path in sorted({r.image_path for r in records}):
        faces = landmarker.detect(read_image(path))
        for record in (r for r in records if r.image_path == path):
            truth = box_from_landmarks(record.landmarks)
            best = max(faces, key=lambda f: box_iou(f.box, truth), default=None)
            if best is not None and box_iou(best.box, truth) > 0.3:
                found += 1
                errors.append(nme_per_face(best.landmarks, record.landmarks)[0])
    assert found >= 0.7 * len(records)
    assert np.mean(errors) < NME_BOUND_HAAR


def test_predict_cli_works_without_a_model_argument(tmp_path):
    out = tmp_path / "landmarks.json"
    assert run(["runtime", "predict", str(SAMPLES / "2009_004587.jpg"), str(SAMPLES / "dogs.jpg"),
                "--json", str(out), "--out-dir", str(tmp_path / "img")]) == 0
    doc = json.loads(out.read_text())
    faces = {img["path"].rsplit("/", 1)[-1]: img["faces"] for img in doc["images"]}
    assert len(faces["2009_004587.jpg"]) >= 1 and faces["dogs.jpg"] == []
    assert len(faces["2009_004587.jpg"][0]["landmarks"]) == 68
    assert (tmp_path / "img" / "2009_004587.jpg").is_file()


# --- presence score (issue 11) --------------------------------------------------------------------------------
def test_shipped_model_carries_landmark_and_face_scores():
    model = LandmarkModel(DEFAULT_MODEL_PATH, provider="cpu")
    assert model.output_names == ["landmarks", "landmark_scores", "face_score"]
    assert model.info.raw.get("facemark.head") == "pip"


@requires_dlib_examples
def test_predict_on_dlib_dogs_reports_no_face_and_every_score_is_a_probability(tmp_path):
    out = tmp_path / "landmarks.json"
    photos = sorted(DLIB_EXAMPLES.glob("*.jpg"))
    assert run(["runtime", "predict", *map(str, photos), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    by_name = {Path(img["path"]).name: img["faces"] for img in doc["images"]}
    assert by_name["dogs.jpg"] == []
    scores = [face["score"] for faces in by_name.values() for face in faces]
    assert len(scores) >= 10 and all(0.0 <= s <= 1.0 for s in scores)


def scene_cut_clip(path: Path, cut: int, frames: int) -> Path:
    """A face photo (with sensor noise) for `cut` frames, then a face-free picture until `frames`."""
    import cv2

    size = (480, 360)
    face = cv2.resize(read_image(SAMPLES / "2008_002470.jpg"), size)
    free = cv2.resize(read_image(SAMPLES / "dogs.jpg"), size)
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, size)
    for i in range(frames):
        base = face if i < cut else free
        writer.write(np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8))
    writer.release()
    return path


def test_video_drops_the_track_at_a_cut_to_a_face_free_scene(tmp_path, landmarker):
    from facemark.runtime.video import run_video

    cut = 25  # between two scheduled detections (every 10 frames): the presence score must end the track
    clip = scene_cut_clip(tmp_path / "cut.mp4", cut, 45)
    jsonl = tmp_path / "frames.jsonl"
    summary = run_video(str(clip), landmarker, jsonl=jsonl, detect_every=10)
    frames = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert all(frame["faces"] for frame in frames[:cut]), "the face is tracked before the cut"
    late = [frame["frame"] for frame in frames[cut + 2:] if frame["faces"]]
    assert late == [], f"faces reported after the cut at frames {late}"
    assert summary.losses >= 1
    assert all(0 <= face["score"] <= 1 for frame in frames for face in frame["faces"])


def test_two_detector_boxes_on_one_face_give_one_face(landmarker):
    """A single-hit box around a well-hit face survives grouping; refinement brings both onto the same face,
    which must be reported once. Two different faces stay two."""
    from facemark.runtime.detector import Detection
    from facemark.runtime.landmarker import Found

    image = read_image(SAMPLES / "2008_002470.jpg")
    found = landmarker.find(image)
    faces = landmarker.landmarks_for_found([found])[0].faces
    assert len(faces) >= 2
    x, y, w, h = found.detections[0].box
    wider = Detection((x - 0.15 * w, y - 0.2 * h, 1.35 * w, 1.35 * h), found.detections[0].score - 1)
    doubled = Found(found.gray, [*found.detections, wider], found.detect_ms)
    again = landmarker.landmarks_for_found([doubled])[0].faces
    assert len(again) == len(faces)
    for a, b in zip(faces, again, strict=True):
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=0.5)


def _pts_folder(records, folder: Path) -> Path:
    """The sample faces as a folder of image + .pts pairs (1-based points, the 300-W format)."""
    import shutil

    folder.mkdir()
    for i, record in enumerate(records):
        image = folder / f"face_{i}{record.image_path.suffix}"
        shutil.copyfile(record.image_path, image)
        rows = "\n".join(f"{x + 1:.3f} {y + 1:.3f}" for x, y in record.landmarks)
        image.with_suffix(".pts").write_text(f"version: 1\nn_points: 68\n{{\n{rows}\n}}\n")
    return folder


def test_evaluate_scores_every_face_of_data_the_model_was_not_trained_on(records, tmp_path, capsys):
    folder = _pts_folder(records[:6], tmp_path / "faces")
    report, faces_csv, plot = tmp_path / "e.json", tmp_path / "e.csv", tmp_path / "e.png"
    assert run(["evaluate", "--model", str(DEFAULT_MODEL_PATH), "--data", str(folder), "--json", str(report)]) == 0
    doc = json.loads(report.read_text())
    assert doc["faces"] == 6 and doc["split"] == "all" and doc["refine"] == DEFAULT_REFINE  # the runtime default
    assert "faces: 6 of 6 (all split" in capsys.readouterr().out
    # --csv and --plot with the whole pipeline too
    assert run(["evaluate", "--model", str(DEFAULT_MODEL_PATH), "--data", str(folder), "--boxes", "pipeline",
                "--json", str(report), "--csv", str(faces_csv), "--plot", str(plot)]) == 0
    rows = faces_csv.read_text().splitlines()
    doc = json.loads(report.read_text())
    assert rows[0] == "key,image,nme" and len(rows) == 1 + 6 and doc["annotated_faces"] == 6
    scored = [r for r in rows[1:] if not r.endswith(",missed")]
    assert len(scored) == round(doc["detection_rate"] * 6)
    assert read_image(plot).shape[2] == 3


@requires_300w
def test_evaluate_on_part_of_the_training_data_scores_only_its_held_out_faces(capsys):
    afw = DATA_300W / "afw"
    assert run(["evaluate", "--model", str(DEFAULT_MODEL_PATH), "--data", str(afw), "--refine", "0"]) == 0
    out = capsys.readouterr().out
    total = len(load_records([afw], lambda _: None))
    assert f"of {total} (val split; --data is (part of) the model's training data)" in out
    assert run(["evaluate", "--model", str(DEFAULT_MODEL_PATH), "--data", str(afw), "--refine", "0",
                "--split", "all"]) == 0
    assert f"faces: {total} of {total} (all split" in capsys.readouterr().out
