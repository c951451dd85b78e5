"""The pip head and the presence head end to end: codec round trip, export parity, runtime outputs, refinement.

The model is a randomly initialised ResNet18 pip + presence network at 64 px (a 4 x 4 grid at stride 16),
exported by the real exporter; the refinement test uses a stub predictor so the geometry is exact.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SAMPLES, TINY_SIZE

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from facemark import metadata as md  # noqa: E402
from facemark.contract import CropContract, box_from_landmarks  # noqa: E402
from facemark.imageio import read_gray, read_image  # noqa: E402
from facemark.inference import predict_faces  # noqa: E402
from facemark.train.codecs import nearest_neighbors  # noqa: E402
from facemark.train.head_pip import PipCodec  # noqa: E402
from facemark.train.model import LandmarkNet  # noqa: E402

SAMPLE_XML = SAMPLES / "landmarks.xml"


def mean_shape() -> np.ndarray:
    from facemark.data import load_records

    contract = CropContract(size=TINY_SIZE)
    records = load_records([SAMPLE_XML], warn=pytest.fail)
    return np.mean([contract.encode_points(r.landmarks, contract.crop_matrix(box_from_landmarks(r.landmarks)))
                    for r in records], axis=0)


def perfect_raw(codec: PipCodec, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Head outputs that say exactly what encode() wants: one hot cell, the true offsets there."""
    enc = codec.encode(target)
    n, p, g = target.shape[0], target.shape[1], codec.grid
    scores = torch.full((n, p, g * g), -20.0).scatter(2, enc["index"][..., None], 20.0)

    def at_cell(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n, values.shape[1], g * g)
        return out.scatter(2, index[..., None], values[..., None]).view(n, -1, g, g)

    nb_index = enc["index"][:, :, None].expand(n, p, codec.k).reshape(n, -1)
    return {"scores": scores.view(n, p, g, g),
            "offsets": torch.cat([at_cell(enc["offset"][..., 0], enc["index"]),
                                  at_cell(enc["offset"][..., 1], enc["index"])], dim=1),
            "neighbors": torch.cat([at_cell(enc["neighbors"][..., 0].reshape(n, -1), nb_index),
                                    at_cell(enc["neighbors"][..., 1].reshape(n, -1), nb_index)], dim=1)}


@pytest.mark.parametrize("grid", [4, 8, 10])
def test_pip_encode_then_decode_returns_the_points_within_half_a_pixel(grid):
    size = grid * 16
    codec = PipCodec(grid, nearest_neighbors(mean_shape(), 10))
    rng = np.random.default_rng(grid)
    # Points all over the crop, including its border cells and a little outside (clamped cells).
    target = torch.tensor(rng.uniform(-0.52, 0.52, (3, 68, 2)), dtype=torch.float32)
    decoded = codec.decode(perfect_raw(codec, target))
    error_px = ((decoded["landmarks"] - target).abs() * size).max().item()
    assert error_px < 0.5
    assert decoded["landmark_scores"].shape == (3, 68)
    assert bool(((decoded["landmark_scores"] > 0.99) & (decoded["landmark_scores"] <= 1)).all())
    assert codec.loss(perfect_raw(codec, target), target, "l1", size).item() < 1e-3


def test_neighbour_votes_pull_a_point_whose_own_offset_is_wrong():
    codec = PipCodec(8, nearest_neighbors(mean_shape(), 10))
    target = torch.tensor(mean_shape()[None], dtype=torch.float32)
    raw = perfect_raw(codec, target)
    raw["offsets"][:, :68] += 1.0  # every own x offset one cell off
    decoded = codec.decode(raw)["landmarks"]
    # Own estimates are off by 1/8 of the crop; the average with the (correct) votes is off by less.
    assert ((decoded - target)[..., 0].abs() < 1 / 8 - 1e-3).all()


@pytest.fixture(scope="module")
def pip_checkpoint(tmp_path_factory):
    from facemark.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = LandmarkNet(image_size=TINY_SIZE, head="pip", neighbors=nearest_neighbors(mean_shape(), 10),
                        presence=True).eval()
    # A fresh head's score maps are flat (weights 1e-3): its argmax would be decided by rounding noise. Give them
    # the contrast a trained head has, so parity measures the graph, not ties.
    torch.nn.init.normal_(model.score_head.weight, std=0.05)
    path = tmp_path_factory.mktemp("pip") / "pip.pt"
    save_checkpoint(path, model, CropContract(size=TINY_SIZE), {"data": ["synthetic"], "seed": 0},
                    {"epoch": 0, "val_nme": None})
    return path


@pytest.fixture(scope="module")
def pip_onnx(pip_checkpoint, tmp_path_factory):
    from facemark.export.exporter import export_model

    out = tmp_path_factory.mktemp("pip-onnx") / "pip.onnx"
    return export_model(pip_checkpoint, out, precision="fp32")


def test_exported_pip_model_matches_eager_on_every_output(pip_onnx):
    report = pip_onnx.report
    assert report["passed"], report["summary"]
    for s in report["sets"]:
        assert set(s["scores"]) == {md.LANDMARK_SCORES, md.FACE_SCORE}
        assert s["landmarks"]["max_abs"] <= 1e-4
        assert all(st["max_abs"] <= 1e-4 for st in s["scores"].values())
    import onnx

    proto = onnx.load(str(pip_onnx.path))
    assert [o.name for o in proto.graph.output] == [md.OUTPUT_NAME, md.LANDMARK_SCORES, md.FACE_SCORE]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[md.HEAD] == "pip"


def test_runtime_returns_landmark_and_face_scores_in_unit_range(pip_onnx):
    from facemark.runtime.landmarker import FaceLandmarker

    landmarker = FaceLandmarker(pip_onnx.path, provider="cpu", threads=1, min_score=None)
    batch = np.zeros((3, 1, TINY_SIZE, TINY_SIZE), np.float32)
    outputs = landmarker.model.predict_outputs(batch)
    assert outputs[md.LANDMARK_SCORES].shape == (3, 68) and outputs[md.FACE_SCORE].shape == (3,)
    faces = landmarker.detect(read_image(SAMPLES / "2009_004587.jpg"))
    assert faces, "Haar finds faces on this sample"
    for face in faces:
        assert face.landmark_scores.shape == (68,)
        assert 0 <= face.landmark_scores.min() and face.landmark_scores.max() <= 1
        assert 0 <= face.score <= 1 and face.detector_score is not None
        doc = json.loads(json.dumps(face.to_json(), allow_nan=False))
        assert len(doc["landmark_scores"]) == 68 and 0 <= doc["score"] <= 1


def _with_presence_record(model_path, out, **record) -> str:
    """A copy of the model whose metadata records this presence separation (as export writes it)."""
    import onnx

    proto = onnx.load(model_path)
    props = {p.key: p.value for p in proto.metadata_props}
    props[md.PRESENCE] = md.dumps(record)
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, out)
    return str(out)


def test_min_score_drops_faces_below_the_presence_threshold(pip_onnx, tmp_path):
    from facemark.runtime.landmarker import FaceLandmarker

    trusted = _with_presence_record(pip_onnx.path, tmp_path / "trusted.onnx", auc=1.0, faces_kept=1.0)
    image = read_image(SAMPLES / "2009_004587.jpg")
    everything = FaceLandmarker(trusted, provider="cpu", threads=1, min_score=None).detect(image)
    cut = float(np.median([f.score for f in everything]))
    kept = FaceLandmarker(trusted, provider="cpu", threads=1, min_score=cut).detect(image)
    assert len(kept) == sum(f.score >= cut for f in everything) < len(everything) or len(everything) == 1


def test_an_untrusted_presence_score_is_not_applied_and_says_so(pip_onnx, tmp_path):
    """The random test model's presence score separates nothing: export records that, and the runtime keeps the
    detector's faces (with one warning) instead of dropping every face at the threshold."""
    from facemark.errors import ModelWarning
    from facemark.runtime.landmarker import FaceLandmarker

    record = pip_onnx.report["presence"]
    assert record["trusted"] is False and record["faces"] > 0 and record["non_faces"] > 0
    image = read_image(SAMPLES / "2009_004587.jpg")
    with pytest.warns(ModelWarning, match="presence score is not trustworthy"):
        untrusted = FaceLandmarker(pip_onnx.path, provider="cpu", threads=1, min_score=0.999999)
    assert untrusted.min_score is None and untrusted.describe()["model"]["presence"] == "not trusted"
    everything = FaceLandmarker(pip_onnx.path, provider="cpu", threads=1, min_score=None).detect(image)
    assert len(untrusted.detect(image)) == len(everything) > 0
    trusted = _with_presence_record(pip_onnx.path, tmp_path / "t.onnx", auc=1.0, faces_kept=1.0)
    applied = FaceLandmarker(trusted, provider="cpu", threads=1, min_score=0.999999)
    assert applied.min_score == 0.999999 and applied.describe()["model"]["presence"] == "applied"
    found = applied.detect_full(image)
    assert found.presence_dropped == len(everything) - len(found.faces)


class ShiftingPredictor:
    """A predictor whose answer is a fixed face shape in crop units, so every pass moves the box predictably."""

    def __init__(self, size: int = 64) -> None:
        self.contract = CropContract(size=size)
        shape = mean_shape()
        self.shape = (shape * 0.6 + np.array([0.1, 0.05])).astype(np.float32)  # small, off-centre
        self.crops: list[np.ndarray] = []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.crops.append(batch.copy())
        return np.repeat(self.shape[None], len(batch), axis=0)


def test_refine_recrops_on_the_landmark_box_of_the_previous_pass():
    gray = read_gray(SAMPLES / "2009_004587.jpg")
    predictor = ShiftingPredictor()
    box = (100.0, 80.0, 90.0, 90.0)
    first = predict_faces(predictor, [(gray, box)], refine=0)[0]
    assert first.box == box
    refined = predict_faces(ShiftingPredictor(), [(gray, box)], refine=1)[0]
    assert refined.box == pytest.approx(box_from_landmarks(first.landmarks))
    contract = predictor.contract
    np.testing.assert_allclose(refined.landmarks,
                               contract.decode_points(predictor.shape, contract.crop_matrix(refined.box)))
    twice = ShiftingPredictor()
    predict_faces(twice, [(gray, box)], refine=2)
    assert len(twice.crops) == 3  # one model call per pass


def test_flip_tta_of_a_mirror_symmetric_predictor_is_its_plain_answer():
    class Symmetric(ShiftingPredictor):
        def predict(self, batch):
            from facemark.scheme import FLIP_PERMUTATION

            shape = mean_shape()
            mirrored = shape[list(FLIP_PERMUTATION)].copy()
            mirrored[:, 0] = -mirrored[:, 0] - 1 / self.contract.size
            symmetric = ((shape + mirrored) / 2).astype(np.float32)
            self.symmetric = symmetric
            return np.repeat(symmetric[None], len(batch), axis=0)

    gray = read_gray(SAMPLES / "2009_004587.jpg")
    predictor = Symmetric()
    box = (100.0, 80.0, 90.0, 90.0)
    plain = predict_faces(predictor, [(gray, box)])[0].landmarks
    flipped = predict_faces(predictor, [(gray, box)], flip=True)[0].landmarks
    np.testing.assert_allclose(flipped, plain, atol=1e-4)


def test_point_margins_are_each_points_gap_between_its_two_best_cells():
    from facemark.export.parity import point_margins

    scores = np.zeros((2, 3, 2, 2), np.float32)
    scores[:, :, 0, 0] = 1.0  # every point has a clear winner: gap 1
    scores[1, 2, 1, 1] = 1.0  # except point 2 of crop 1: two cells tie
    assert point_margins(scores).min(axis=1).tolist() == [1.0, 0.0]
    assert point_margins(scores)[1].tolist() == [1.0, 1.0, 0.0]


def test_tied_landmarks_are_the_tied_points_and_the_points_they_vote_for():
    from facemark.export.parity import tied_landmarks

    scores = np.zeros((1, 3, 2, 2), np.float32)
    scores[0, :, 0, 0] = 1.0  # clear winners ...
    scores[0, 1, 1, 1] = 1.0  # ... but point 1 ties
    neighbors = np.array([[1], [2], [1]])  # point 1 votes for point 2; points 0 and 2 vote for 1
    assert tied_landmarks(scores, neighbors).tolist() == [[False, True, True]]


def test_points_decoding_to_a_tie_are_left_out_of_parity_and_counted(pip_checkpoint, tmp_path, monkeypatch):
    """Where a point's two best cells score within rounding of each other the argmax may go either way in fp32
    ONNX and eager alike: those points (and the points they vote for) are counted and left out of the point
    statistics of every input set, real faces included; the rest are compared, so the gate still holds."""
    from facemark.data import load_records
    from facemark.export import parity
    from facemark.export.exporter import export_model, face_crops
    from facemark.train.checkpoint import load_model

    model, contract, _ = load_model(pip_checkpoint)
    model = model.float().eval()
    records = load_records([SAMPLES / "landmarks.xml"], lambda _: None)
    faces = face_crops(records, contract, lambda _: None)[: parity.REAL_FACES]
    sets = {source: x for source, b, x in parity.input_sets(faces, TINY_SIZE, None) if b == 1}
    with torch.no_grad():
        scores = {k: model.raw(torch.from_numpy(x))["scores"].numpy() for k, x in sets.items()}
    margins = np.concatenate([parity.point_margins(v).ravel() for v in scores.values()])
    monkeypatch.setattr(parity, "TIE_MARGIN", float(np.quantile(margins, 0.02)))  # some points of both sets tie
    neighbors = model.codec.neighbors.numpy()
    tied = {k: int(parity.tied_landmarks(v, neighbors).sum()) for k, v in scores.items()}
    assert all(0 < n < len(sets[k]) * 68 for k, n in tied.items()), tied
    report = export_model(pip_checkpoint, tmp_path / "pip.onnx", precision="fp32").report
    assert report["passed"], report["summary"]
    for s in report["sets"]:
        if s["batch"] == 1:
            assert (s["tied_points"], s["points"]) == (tied[s["source"]], len(sets[s["source"]]) * 68)
            assert s["landmarks"]["shape"] == [s["points"] - s["tied_points"], 2]


def test_pip_export_runs_in_every_consumer(pip_onnx):
    """The export's consumer check on a pip model: OpenCV DNN and ORT without optimisations load it and agree
    with ORT, the full checker passes, every op is on TensorRT 10's list, the metadata says so. (Reduced
    precisions of a random pip head flip argmax cells on real faces; the trained weights' fp16 and int8 exports
    are checked in test_consumers.py.)"""
    import onnx

    from facemark.export.consumers import not_on_tensorrt_list

    report = pip_onnx.report["consumers"]
    rows = {r["name"]: r for r in report["consumers"]}
    assert all(r["loads"] for r in rows.values()), [r["error"] for r in rows.values()]
    assert rows["opencv dnn"]["agrees"] and rows["onnxruntime ORT_DISABLE_ALL"]["agrees"], rows
    proto = onnx.load(str(pip_onnx.path))
    assert not_on_tensorrt_list(proto) == []
    stored = json.loads({p.key: p.value for p in proto.metadata_props}[md.CONSUMERS])
    assert stored["consumers"]["opencv dnn"]["agrees"] is True
