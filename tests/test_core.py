"""Core, torch-free: scheme, crop contract geometry, readers, split, metrics, image IO, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DATA_300W, DLIB_EXAMPLES, SAMPLES, requires_300w, requires_dlib_examples
from PIL import Image

from facemark.contract import (
    BoxCalibration,
    CropContract,
    apply_affine,
    box_from_landmarks,
    box_iou,
    non_max_suppression,
)
from facemark.data import FaceRecord, load_records, read_dlib_xml, read_pts, split_records
from facemark.errors import DataError, ImageError
from facemark.evaluation import evaluate
from facemark.imageio import read_gray, read_image
from facemark.metrics import nme_per_face, summarize
from facemark.scheme import FLIP_PERMUTATION, GROUPS, NUM_POINTS, OUTER_EYE_CORNERS


def sample_records() -> list[FaceRecord]:
    return load_records([SAMPLES / "landmarks.xml"], lambda _: None)


# --- scheme ---------------------------------------------------------------------------------------------------
def test_groups_cover_all_points_once():
    indices = sorted(i for g in GROUPS.values() for i in g)
    assert indices == list(range(NUM_POINTS))


def test_flip_permutation_is_an_involution_that_swaps_sides():
    perm = np.asarray(FLIP_PERMUTATION)
    assert sorted(perm) == list(range(NUM_POINTS))
    assert (perm[perm] == np.arange(NUM_POINTS)).all()
    assert perm[OUTER_EYE_CORNERS[0]] == OUTER_EYE_CORNERS[1]
    assert perm[8] == 8 and perm[30] == 30 and perm[0] == 16  # chin and nose tip stay, jaw ends swap


def test_flip_permutation_matches_mirrored_real_faces():
    """Mirror real annotations and permute: each point lands on the mirrored point of the same name."""
    for record in sample_records()[:5]:
        pts = record.landmarks
        mirrored = pts.copy()
        mirrored[:, 0] = -mirrored[:, 0]
        relabelled = mirrored[list(FLIP_PERMUTATION)]
        # after relabelling, the subject's right eye (36-41) is again on the image's left of its left eye
        assert relabelled[36:42, 0].mean() < relabelled[42:48, 0].mean()
        assert relabelled[0, 0] < relabelled[16, 0]


# --- contract --------------------------------------------------------------------------------------------------
def test_crop_round_trip_within_half_pixel():
    contract = CropContract(size=224, scale=1.25)
    rng = np.random.default_rng(0)
    for _ in range(20):
        box = tuple(rng.uniform(10, 400, 2)) + tuple(rng.uniform(30, 300, 2))
        m = contract.crop_matrix(box)
        pts = rng.uniform(0, 500, (68, 2))
        back = contract.decode_points(contract.encode_points(pts, m), m)
        assert np.abs(back - pts).max() < 0.5


def test_crop_is_centred_square_of_scaled_side():
    contract = CropContract(size=100, scale=2.0)
    m = contract.crop_matrix((50, 60, 40, 20))  # centre (70, 70), side 2 * 40 = 80
    corners = apply_affine(m, np.array([[30.0, 30.0], [110.0, 110.0], [70.0, 70.0]]))
    np.testing.assert_allclose(corners, [[-0.5, -0.5], [99.5, 99.5], [49.5, 49.5]], atol=1e-9)


@pytest.mark.parametrize("side", [80, 1500])  # 1500 px face -> the anti-aliased pre-shrink path
def test_warp_puts_pixels_where_the_points_go(side):
    contract = CropContract(size=112)
    image = np.zeros((side * 2, side * 2), np.uint8)
    spot = np.array([side * 0.8, side * 1.1])
    cv2.circle(image, tuple(int(v) for v in spot), max(2, side // 40), 255, -1)
    m = contract.crop_matrix((side / 2, side / 2, side, side))
    crop = contract.warp(image, m)
    moments = cv2.moments(crop.astype(np.float32))
    found = np.array([moments["m10"] / moments["m00"], moments["m01"] / moments["m00"]])
    expected = apply_affine(m, spot)
    assert np.abs(found - expected).max() < 0.5


def test_normalize_range_and_shape():
    contract = CropContract(size=8)
    x = contract.normalize(np.array([[0, 255] * 4] * 8, np.uint8))
    assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0


def test_contract_json_round_trip():
    contract = CropContract(size=160, scale=1.3)
    assert CropContract.from_json(contract.to_json()) == contract


def test_box_calibration_fit_recovers_a_known_mapping():
    truth = BoxCalibration(dx=0.02, dy=0.12, sw=0.9, sh=1.1)
    rng = np.random.default_rng(1)
    detected = [tuple(rng.uniform(0, 300, 2)) + (s, s) for s in rng.uniform(40, 200, 50)]
    target = [truth.apply(b) for b in detected]
    fitted = BoxCalibration.fit(detected, target, detector="test")
    for name in ("dx", "dy", "sw", "sh"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), abs=1e-9)
    assert BoxCalibration.from_json(fitted.to_json()) == fitted
    assert box_iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(1 / 3)


# --- readers ---------------------------------------------------------------------------------------------------
def write_pts(path: Path, points: np.ndarray, header: bool = True, declared: int | None = None) -> None:
    lines = [f"{x:.3f} {y:.3f}" for x, y in points]
    if header:
        lines = ["version: 1", f"n_points:  {declared or len(points)}", "{", *lines, "}"]
    path.write_text("\n".join(lines))


def test_read_pts_is_zero_based(tmp_path):
    pts = np.arange(136, dtype=np.float64).reshape(68, 2) + 1
    write_pts(tmp_path / "a.pts", pts)
    write_pts(tmp_path / "b.pts", pts, header=False)
    np.testing.assert_allclose(read_pts(tmp_path / "a.pts"), pts - 1)
    np.testing.assert_allclose(read_pts(tmp_path / "b.pts"), pts - 1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("version: 1\nn_points: 5\n{\n1 2\n}", "header says n_points 5 but 1 points follow"),
        ("\n".join(["1 2"] * 67), "67 points, expected 68"),
        ("version: 1\nn_points: 68\n{\n" + "\n".join(["1 x"] * 68) + "\n}", "non-numeric"),
        ("version: 1\nn_points: 68\n" + "\n".join(["1 2"] * 68), "malformed .pts header"),
    ],
)
def test_read_pts_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.pts"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_pts(path)
    assert str(path) in str(info.value)


def test_pts_folder_reports_missing_images_and_converts_modes(tmp_path):
    pts = np.random.default_rng(0).uniform(10, 50, (68, 2))
    (tmp_path / "sub").mkdir()
    write_pts(tmp_path / "sub" / "gray16.pts", pts)
    cv2.imwrite(str(tmp_path / "sub" / "gray16.png"), (np.ones((60, 60)) * 40000).astype(np.uint16))
    write_pts(tmp_path / "rgba.pts", pts)
    Image.new("RGBA", (60, 60), (200, 10, 10, 128)).save(tmp_path / "rgba.png")
    write_pts(tmp_path / "orphan.pts", pts)
    warnings: list[str] = []
    records = load_records([tmp_path], warnings.append)
    assert sorted(r.image_path.name for r in records) == ["gray16.png", "rgba.png"]
    assert len(warnings) == 1 and "orphan.pts" in warnings[0]
    for record in records:
        gray = read_gray(record.image_path)
        assert gray.dtype == np.uint8 and gray.shape == (60, 60)
    assert read_gray(tmp_path / "sub" / "gray16.png").max() > 100  # 16-bit scaled to 8-bit, not clipped to 0


def test_dlib_xml_skips_ignored_boxes_and_resolves_relative_paths(tmp_path):
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "face.jpg"), np.zeros((150, 150, 3), np.uint8))
    parts = "".join(f"<part name='{i:02d}' x='{i}' y='{2 * i}'/>" for i in range(68))
    xml = (f"<dataset><images><image file='img/face.jpg'>"
           f"<box top='1' left='2' width='30' height='30'>{parts}</box>"
           f"<box top='1' left='2' width='30' height='30' ignore='1'/>"
           f"<box top='5' left='6' width='20' height='20'>{parts}</box>"
           f"</image><image file='img/missing.jpg'><box top='1' left='1' width='3' height='3'/></image>"
           f"</images></dataset>")
    (tmp_path / "faces.xml").write_text(xml)
    warnings: list[str] = []
    records = read_dlib_xml(tmp_path / "faces.xml", warnings.append)
    assert len(records) == 2 and records[0].image_path == (tmp_path / "img" / "face.jpg").resolve()
    assert records[0].landmarks[10].tolist() == [10, 20] and records[0].source_box == (2, 1, 30, 30)
    assert records[0].key != records[1].key
    assert len(warnings) == 1 and "missing.jpg" in warnings[0]


def test_dlib_xml_of_boxes_without_parts_is_an_error(tmp_path):
    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((10, 10, 3), np.uint8))
    (tmp_path / "boxes.xml").write_text("<dataset><images><image file='a.jpg'>"
                                        "<box top='1' left='1' width='5' height='5'/></image></images></dataset>")
    warnings: list[str] = []
    with pytest.raises(DataError, match="none of its 1 boxes has 68 landmark parts"):
        read_dlib_xml(tmp_path / "boxes.xml", warnings.append)
    assert len(warnings) == 1 and "0 landmark parts, expected 68" in warnings[0]


def test_split_is_deterministic_and_stable_when_files_are_added():
    records = [FaceRecord(Path(f"img_{i}.jpg"), np.zeros((68, 2)), key=f"img_{i}.jpg#0") for i in range(2000)]
    train, val = split_records(records, 0.1, seed=0)
    assert 150 < len(val) < 250 and len(train) + len(val) == 2000
    more = records + [FaceRecord(Path("new.jpg"), np.zeros((68, 2)), key=f"new_{i}.jpg#0") for i in range(100)]
    _, val_more = split_records(more, 0.1, seed=0)
    assert {r.key for r in val} <= {r.key for r in val_more}
    _, val_other_seed = split_records(records, 0.1, seed=1)
    assert {r.key for r in val} != {r.key for r in val_other_seed}


@requires_300w
def test_real_300w_pack_reads_every_face_and_reports_six_missing_images():
    warnings: list[str] = []
    records = load_records([DATA_300W], warnings.append)
    assert len(records) == 2012
    assert len(warnings) == 6 and all("lfpw/trainset/image_0" in w for w in warnings)
    assert any("image_0046.pts" in w for w in warnings)
    # 0-based points lie inside (or within a pixel of) their images
    for record in records[::200]:
        h, w = read_gray(record.image_path).shape
        assert record.landmarks.min() > -1.5 and record.landmarks[:, 0].max() < w + 1
    train, val = split_records(records)
    assert len(val) == 205 and len(train) == 1807  # the validation split every report quotes


@requires_dlib_examples
def test_real_dlib_xml_files():
    train = load_records([DLIB_EXAMPLES / "training_with_face_landmarks.xml"], lambda _: None)
    test = load_records([DLIB_EXAMPLES / "testing_with_face_landmarks.xml"], lambda _: None)
    assert len(train) == 18 and len(test) == 25
    assert all(r.landmarks.shape == (68, 2) for r in train + test)
    box = box_from_landmarks(train[0].landmarks)
    assert box_iou(box, train[0].source_box) > 0.4  # dlib's detector box overlaps the landmark box
    with pytest.raises(DataError, match="landmark parts"):
        load_records([DLIB_EXAMPLES / "training.xml"], lambda _: None)


# --- image IO --------------------------------------------------------------------------------------------------
def test_read_image_errors_are_one_clear_line(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    cv2.imwrite(str(tmp_path / "ok.jpg"), np.zeros((40, 30, 3), np.uint8))
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes()[:200])
    for name, message in [("empty.jpg", "empty file"), ("text.jpg", "not a readable image"),
                          ("missing.jpg", "no such file")]:
        with pytest.raises(ImageError, match=message) as info:
            read_image(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(ImageError, match="larger than the limit"):
        read_image(tmp_path / "ok.jpg", max_pixels=100)


def test_exif_orientation_is_applied(tmp_path):
    Image.new("RGB", (40, 20), "white").save(tmp_path / "rot.jpg", exif=_exif_rotate_90())
    assert read_image(tmp_path / "rot.jpg").shape[:2] == (40, 20)  # height x width after rotation


def _exif_rotate_90() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return exif


# --- metrics and evaluation ------------------------------------------------------------------------------------
def test_nme_by_outer_eye_corners():
    gt = np.random.default_rng(0).uniform(0, 100, (68, 2))
    gt[36], gt[45] = (20, 50), (80, 50)  # inter-ocular 60 px
    assert nme_per_face(gt, gt)[0] == 0
    assert nme_per_face(gt + [3, 4], gt)[0] == pytest.approx(5 / 60)


def test_summary_failure_rate_and_auc():
    s = summarize(np.array([0.0, 0.0, 0.04, 0.2]))
    assert s["faces"] == 4 and s["fr@0.08"] == 0.25
    assert s["nme"] == pytest.approx(0.06) and s["nme_median"] == pytest.approx(0.02)
    # CED: 0.5 from 0, 0.75 from 0.04 -> area (0.5 * 0.5 + 0.75 * 0.5)
    assert s["auc@0.08"] == pytest.approx(0.625, abs=2e-3)


def test_evaluation_of_a_perfect_predictor_is_zero():
    records = sample_records()[:6]
    contract = CropContract(size=96)

    class Perfect:
        def __init__(self):
            self.contract = contract
            self.targets = [contract.encode_points(r.landmarks, contract.crop_matrix(box_from_landmarks(r.landmarks)))
                            for r in records]

        def predict(self, batch):
            out, self.targets = self.targets[: len(batch)], self.targets[len(batch):]
            return np.stack(out)

    result = evaluate(Perfect(), records, batch_size=4)
    summary = result.summary()
    assert summary["faces"] == 6 and summary["nme"] < 1e-6 and summary["detection_rate"] == 1.0
    assert json.loads(json.dumps(summary))  # JSON-able


def test_evaluation_skips_unreadable_images_with_one_line_each(tmp_path):
    records = sample_records()[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    records.append(FaceRecord(broken, records[0].landmarks, key="broken.jpg#0"))
    contract = CropContract(size=32)

    class Centre:
        def __init__(self):
            self.contract = contract

        def predict(self, batch):
            return np.zeros((len(batch), 68, 2), np.float32)

    result = evaluate(Centre(), records)
    summary = result.summary()
    assert summary["faces"] == 3 and summary["unreadable"] == 1 and summary["detection_rate"] == 1.0
    assert len(result.unreadable) == 1 and "broken.jpg" in result.unreadable[0]


def test_non_max_suppression_keeps_the_best_of_each_overlapping_set_best_first():
    boxes = [(0, 0, 10, 10), (1, 1, 10, 10), (50, 50, 10, 10), (0, 0, 10, 20)]
    scores = [0.5, 0.9, 0.1, 0.9]
    # box 1 (0.9) beats box 0; box 3 ties box 1, comes later, overlaps it by IoU 90/210 < 0.5: kept
    assert non_max_suppression(boxes, scores) == [1, 3, 2]
    assert non_max_suppression(boxes, scores, max_iou=0.3) == [1, 2]
    assert non_max_suppression([], []) == []
