"""Training stage: augmentation geometry (landmarks follow pixels), losses, checkpoints, a tiny real run."""

from __future__ import annotations

import json
import math
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import SAMPLES  # noqa: E402

from facemark.cli import run  # noqa: E402
from facemark.contract import CropContract, apply_affine  # noqa: E402
from facemark.data import FaceRecord  # noqa: E402
from facemark.scheme import FLIP_PERMUTATION  # noqa: E402
from facemark.train.checkpoint import load_checkpoint, load_model  # noqa: E402
from facemark.train.codecs import point_loss  # noqa: E402
from facemark.train.dataset import AugmentConfig, AugmentedFaces, FaceCache, augment_matrix  # noqa: E402
from facemark.train.loop import RUN_CLAIM, Callbacks, TrainConfig, train  # noqa: E402

SAMPLES_XML = str(SAMPLES / "landmarks.xml")


def spot_record(tmp_path, spot_index: int = 36) -> FaceRecord:
    """A synthetic face: landmarks on a ring, one bright spot painted exactly at landmark `spot_index`."""
    angles = np.linspace(0, 2 * math.pi, 68, endpoint=False)
    points = np.stack([200 + 60 * np.cos(angles), 180 + 80 * np.sin(angles)], axis=1).astype(np.float32)
    points[36], points[45] = (150, 150), (250, 150)  # outer eye corners: image-left and image-right
    image = np.zeros((400, 400), np.uint8)
    cv2.circle(image, (int(points[spot_index][0]), int(points[spot_index][1])), 5, 255, -1)
    path = tmp_path / "spot.png"
    cv2.imwrite(str(path), image)
    return FaceRecord(path, points, key="spot.png#0")


def bright_centroid(crop: np.ndarray) -> np.ndarray:
    m = cv2.moments((crop > 0.5).astype(np.float32))
    return np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]])


@pytest.mark.parametrize("augment", [
    AugmentConfig(rotate_deg=25, zoom=0, shift=0, flip=False, brightness=0, contrast=0, gamma=0, blur_p=0,
                  noise_p=0, occlude_p=0),
    AugmentConfig(rotate_deg=0, zoom=0.15, shift=0.1, flip=True, brightness=0, contrast=0, gamma=0, blur_p=0,
                  noise_p=0, occlude_p=0),
])
def test_landmarks_follow_the_pixels_under_augmentation(tmp_path, augment):
    record = spot_record(tmp_path, spot_index=36)
    contract = CropContract(size=96)
    dataset = AugmentedFaces(FaceCache([record], contract), contract, augment)
    torch.manual_seed(0)
    flips = 0
    for _ in range(12):
        image, target, is_face = dataset[0]
        assert is_face.item() == 1.0
        crop = image[0].numpy()
        points = (target.numpy() + 0.5) * contract.size
        # The spot was painted at point 36. Unflipped it stays there; flipped, the mirror moves it to the image's
        # right and the permutation relabels that position 45 (FLIP_PERMUTATION[45] == 36).
        spot = bright_centroid(crop)
        d36, d45 = (np.abs(spot - points[i]).max() for i in (36, FLIP_PERMUTATION[36]))
        assert min(d36, d45) < 1.0
        flips += d45 < d36
        assert points[36, 0] < points[45, 0]  # the subject's right eye stays on the image's left
    if augment.flip:
        assert 0 < flips < 12


def test_rotation_sign_matches_the_matrix():
    rng = np.random.default_rng(0)
    aug = AugmentConfig(rotate_deg=30, zoom=0, shift=0, flip=False)
    m, _ = augment_matrix(rng, 100, 64, aug)
    right, down = apply_affine(m, np.array([[60.0, 49.5], [49.5, 60.0]])) - (64 - 1) / 2
    # image y points down: a positive angle turns +x towards +y; either way x and y turn the same way
    assert np.sign(right[1]) == np.sign(-down[0]) != 0


def test_losses_are_zero_at_the_target_and_positive_elsewhere():
    target = torch.zeros(2, 68, 2)
    for name in ("l1", "mse", "wing"):
        assert point_loss(name, target, target, 224).mean().item() == 0
        assert point_loss(name, target + 0.01, target, 224).mean().item() > 0
    with pytest.raises(ValueError):
        point_loss("nope", target, target, 224)


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    base = dict(data=[SAMPLES_XML], val_data=[SAMPLES_XML], out=str(tmp_path / "run"), epochs=2, batch_size=8,
                image_size=64, lr=2e-3, schedule="constant", max_images=8, workers=0,
                augment=AugmentConfig.none().__dict__)
    base.update(overrides)
    return TrainConfig(**base)


def few_faces_xml(tmp_path, faces: int = 8) -> str:
    """A dlib XML of the first sample photos holding at least `faces` faces (absolute image paths)."""
    import xml.etree.ElementTree as ET

    tree = ET.parse(SAMPLES_XML)
    images = tree.getroot().find("images")
    kept = 0
    for image in list(images):
        if kept >= faces:
            images.remove(image)
            continue
        image.set("file", str(Path(SAMPLES_XML).parent / image.get("file")))
        kept += len(image.findall("box"))
    path = tmp_path / "few.xml"
    tree.write(path)
    return str(path)


def test_tiny_run_overfits_a_few_faces(tmp_path):
    """About 8 real faces, no augmentation, validated on themselves: the error must fall far below the start."""
    torch.manual_seed(0)
    few = few_faces_xml(tmp_path)
    result = train(tiny_config(tmp_path, epochs=30, data=[few], val_data=[few], max_images=None))
    first, best = result.history[0].val_nme, result.best_val_nme
    assert best < 0.5 * first, (first, best)
    assert result.history[-1].train_loss < 0.3 * result.history[0].train_loss
    doc = torch.load(result.best_path, weights_only=True)  # plain types only
    assert doc["format"] == "facemark-checkpoint/1"
    assert doc["model"] == {"arch": "resnet18", "in_channels": 1, "num_points": 68, "image_size": 64,
                            "head": "regression", "presence": False}
    assert doc["contract"]["size"] == 64 and doc["metrics"]["val_nme"] == pytest.approx(best)
    assert doc["train"]["data"] == [few] and doc["train"]["seed"] == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30 and {"val_nme", "data_wait_share", "images_per_s"} <= json.loads(lines[0]).keys()
    leftovers = [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".") and p.name != RUN_CLAIM]
    assert not leftovers  # no temp files left


def test_interrupt_saves_last_and_resume_continues(tmp_path):
    calls = {"n": 0}

    def stop_after_one_step() -> bool:
        calls["n"] += 1
        return calls["n"] > 1 and calls["n"] % 2 == 0  # let epoch 1 finish (1 step), stop in epoch 2

    cfg = tiny_config(tmp_path, epochs=3)
    first = train(cfg, stop_requested=stop_after_one_step)
    assert first.interrupted and len(first.history) == 1
    state = load_checkpoint(first.last_path)["state"]
    assert state["next_epoch"] == 1 and "optimizer" in state and "scheduler" in state
    resumed = train(cfg, resume=first.last_path)
    assert [h.epoch for h in resumed.history] == [1, 2, 3]
    model, contract, _ = load_model(resumed.best_path)
    assert contract.size == 64 and not model.training


class Recorder(Callbacks):
    def __init__(self):
        self.epochs, self.messages = [], []

    def on_message(self, text):
        self.messages.append(text)

    def on_epoch_end(self, stats):
        self.epochs.append(stats)


def test_pip_head_with_presence_overfits_a_few_faces_and_scores_faces_above_background(tmp_path):
    """The pip codec's loss trains the network (landmarks decoded in the model) and the presence head learns
    to tell the faces from face-free crops of the same photos."""
    torch.manual_seed(0)
    result = train(tiny_config(tmp_path, epochs=30, head="pip", presence=True, negatives_per_face=0.5))
    first, best = result.history[0].val_nme, result.best_val_nme
    assert best < 0.5 * first, (first, best)
    assert result.history[-1].val_presence_auc is not None and result.history[-1].val_presence_auc > 0.8
    doc = torch.load(result.best_path, weights_only=True)
    assert doc["model"]["head"] == "pip" and doc["model"]["presence"] is True
    assert len(doc["model"]["neighbors"]) == 68 and all(len(n) == 10 for n in doc["model"]["neighbors"])


def test_split_is_reported_and_callbacks_fire(tmp_path):
    rec = Recorder()
    train(tiny_config(tmp_path, val_data=[], max_images=None, epochs=1, batch_size=16), rec)
    assert any("validation" in m and "seeded split" in m for m in rec.messages)
    assert len(rec.epochs) == 1 and 0 <= rec.epochs[0].data_wait_share <= 1


def test_train_and_evaluate_cli(tmp_path):
    out = tmp_path / "cli"
    code = run(["train", "--data", SAMPLES_XML, "--val-data", SAMPLES_XML, "--out-dir", str(out), "--epochs", "1",
                "--image-size", "64", "--batch-size", "8", "--max-images", "8", "--workers", "0"])
    assert code == 0 and (out / "best.pt").is_file() and (out / "last.pt").is_file()
    report = tmp_path / "eval.json"
    code = run(["evaluate", "--model", str(out / "best.pt"), "--data", SAMPLES_XML, "--split", "all",
                "--json", str(report),
                "--csv", str(tmp_path / "faces.csv"), "--plot", str(tmp_path / "ced.png")])
    assert code == 0
    doc = json.loads(report.read_text())
    assert {"nme", "nme_median", "fr@0.08", "auc@0.08", "faces", "model", "data"} <= doc.keys()
    assert doc["faces"] == 25 and 0 < doc["nme"] < 10
    assert len((tmp_path / "faces.csv").read_text().splitlines()) == 26
    assert cv2.imread(str(tmp_path / "ced.png")) is not None
    assert run(["evaluate", "--model", str(tmp_path / "missing.pt"), "--data", SAMPLES_XML]) == 2


# --- a train that never hangs, resumes exactly, never overwrites (issue 12) -----------------------------------
def test_bad_choice_is_refused_before_any_data_is_read(tmp_path, capsys):
    code = run(["train", "--data", str(tmp_path / "missing"), "--loss", "foo", "--out-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "--loss" in err and "missing" not in err
    with pytest.raises(Exception, match="--optimizer 'sgd'"):
        train(tiny_config(tmp_path, optimizer="sgd", data=[str(tmp_path / "missing")]))


def test_an_exception_in_a_step_ends_the_run_and_its_loader_workers(tmp_path, monkeypatch):
    import multiprocessing
    import time

    import facemark.train.loop as loop

    def boom(*_args, **_kwargs):
        raise RuntimeError("boom in the step")

    monkeypatch.setattr(loop, "compute_loss", boom)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_config(tmp_path, workers=1, epochs=3))
    assert time.perf_counter() - t0 < 120
    deadline = time.time() + 10
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()


def test_interrupted_run_resumes_at_the_exact_scheduler_step_and_ends(tmp_path):
    cfg = tiny_config(tmp_path, epochs=3, batch_size=2, max_images=16, schedule="onecycle", ema=0.9)
    steps = {"n": 0}

    def stop_in_epoch_two() -> bool:
        steps["n"] += 1
        return steps["n"] == 8 + 3  # 8 steps per epoch: stop after the third step of epoch 2

    first = train(cfg, stop_requested=stop_in_epoch_two)
    assert first.interrupted and len(first.history) == 1
    averaged_before = load_checkpoint(first.last_path)["state"]["ema_updates"]
    assert averaged_before == 8 + 3
    resumed = train(TrainConfig(data=[]), resume=first.last_path)
    assert not resumed.interrupted and [h.epoch for h in resumed.history] == [1, 2, 3]
    state = load_checkpoint(resumed.last_path)["state"]
    assert state["scheduler"]["last_epoch"] == 3 * 8 == state["scheduler"]["total_steps"]
    # The weight average goes on where it stopped (epoch 2 runs again from its start): it is not restarted
    assert state["ema_updates"] == averaged_before + 2 * 8


def test_resume_stays_in_its_folder_extends_epochs_and_refuses_contradictions(tmp_path, monkeypatch, capsys):
    from facemark.errors import DataError

    run_dir = tmp_path / "work"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    cfg = tiny_config(tmp_path, epochs=1, out="runs/a", data=[SAMPLES_XML], val_data=[SAMPLES_XML])
    first = train(cfg)
    best = first.best_path.resolve()
    last = (run_dir / "runs" / "a" / "last.pt").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    longer = train(TrainConfig(data=[], epochs=2), resume=last, explicit={"epochs"})
    assert longer.last_path.resolve() == last and [h.epoch for h in longer.history] == [1, 2]
    assert not (elsewhere / "runs").exists()
    with pytest.raises(DataError, match="--image-size"):
        train(TrainConfig(data=[], image_size=96), resume=last, explicit={"image_size"})
    with pytest.raises(DataError, match="no training state"):
        train(TrainConfig(data=[]), resume=best)
    capsys.readouterr()
    assert run(["train", "--resume", str(last), "--batch-size", "4"]) == 2  # given on the command line: checked
    assert "contradicts" in capsys.readouterr().err


def test_a_new_run_never_overwrites_an_existing_run_folder(tmp_path):
    first = train(tiny_config(tmp_path, epochs=1))
    second = train(tiny_config(tmp_path, epochs=1))
    assert first.best_path.parent.name == "run" and second.best_path.parent.name == "run-2"
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    reused = train(tiny_config(tmp_path, epochs=1), exist_ok=True)
    assert reused.best_path.parent.name == "run"
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_failing_train_command_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import facemark.train.loop as loop

    def boom(*_args, **_kwargs):
        raise RuntimeError("boom in the step")

    monkeypatch.setattr(loop, "compute_loss", boom)
    code = run(["train", "--data", SAMPLES_XML, "--val-data", SAMPLES_XML, "--out-dir", str(tmp_path / "r"),
                "--epochs", "1", "--image-size", "64", "--batch-size", "8", "--max-images", "8", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "training failed: RuntimeError: boom in the step" in err and "Traceback" not in err


def test_the_validation_split_has_its_own_seed(tmp_path):
    from facemark.train.loop import load_split

    def validation_keys(**overrides) -> list[str]:
        cfg = tiny_config(tmp_path, val_data=[], max_images=None, **overrides)
        return [r.key for r in load_split(cfg, lambda _line: None)[1]]

    assert validation_keys(seed=7) == validation_keys(seed=0)  # another training seed, the same held-out faces
    assert validation_keys(split_seed=1) != validation_keys()
    # Runs saved before split_seed existed split by their training seed.
    assert TrainConfig.from_dict({"data": [], "seed": 3}).split_seed == 3
    assert TrainConfig.from_dict({"data": [], "seed": 3, "split_seed": 0}).split_seed == 0


def test_init_and_evaluate_keep_the_checkpoints_validation_split(tmp_path):
    from facemark.errors import DataError
    from facemark.train.loop import load_split, resolve_init

    source = train(tiny_config(tmp_path, epochs=1, val_data=[], split_seed=1, out=str(tmp_path / "src")))
    tuned = tiny_config(tmp_path, val_data=[], init=str(source.best_path))
    resolve_init(source.best_path, tuned, explicit=set())
    assert tuned.split_seed == 1  # not the default 0: its validation faces stay out of training
    with pytest.raises(DataError, match="--split-seed 2 would train on the checkpoint's validation faces"):
        resolve_init(source.best_path, tiny_config(tmp_path, val_data=[], split_seed=2), explicit={"split_seed"})
    # evaluate scores a checkpoint on its own validation faces unless told otherwise
    _, own = load_split(tiny_config(tmp_path, val_data=[], max_images=None, split_seed=1), lambda _line: None)
    _, other = load_split(tiny_config(tmp_path, val_data=[], max_images=None), lambda _line: None)
    assert len(own) != len(other)
    for extra, faces in (([], len(own)), (["--split-seed", "0"], len(other))):
        report = tmp_path / f"eval{len(extra)}.json"
        assert run(["evaluate", "--model", str(source.best_path), "--data", SAMPLES_XML, "--json", str(report),
                    *extra]) == 0
        assert json.loads(report.read_text())["faces"] == faces


def test_init_starts_a_new_run_from_a_checkpoints_weights_and_network(tmp_path):
    from facemark.errors import DataError

    source = train(tiny_config(tmp_path, epochs=1, out=str(tmp_path / "src"), head="pip", pip_stride=16))
    start = torch.load(source.best_path, weights_only=True)["state_dict"]
    # lr 0: the weights stay those of --init (BatchNorm's running statistics still move in train mode)
    tuned = train(tiny_config(tmp_path, epochs=1, out=str(tmp_path / "tuned"), lr=0.0, image_size=128,
                              pip_stride=32, init=str(source.best_path)), explicit={"lr"})
    doc = torch.load(tuned.last_path, weights_only=True)
    assert doc["model"] == torch.load(source.best_path, weights_only=True)["model"]  # the checkpoint's network
    assert doc["train"]["image_size"] == 64 and doc["train"]["pip_stride"] == 16
    assert doc["train"]["init"] == str(source.best_path.resolve())
    # epoch 0 validates the initial weights, then the run's own schedule from epoch 1
    assert doc["train"]["lr"] == 0.0 and [h.epoch for h in tuned.history] == [0, 1]
    for name, value in start.items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(doc["state_dict"][name], value), name
    with pytest.raises(DataError, match="--pip-stride 32 contradicts"):
        train(tiny_config(tmp_path, epochs=1, pip_stride=32, init=str(source.best_path)),
              explicit={"pip_stride"})


def test_init_at_another_image_size_fine_tunes_the_same_weights_on_a_larger_grid(tmp_path):
    """The pip network is fully convolutional: --init with an explicit --image-size keeps every weight and
    decodes on the grid of the new crop side (a 64 px checkpoint at 96 px: a 6 x 6 grid instead of 4 x 4)."""
    source = train(tiny_config(tmp_path, epochs=1, out=str(tmp_path / "src"), head="pip", pip_stride=16))
    start = torch.load(source.best_path, weights_only=True)
    tuned = train(tiny_config(tmp_path, epochs=1, out=str(tmp_path / "big"), lr=0.0, image_size=96,
                              init=str(source.best_path)), explicit={"lr", "image_size"})
    doc = torch.load(tuned.last_path, weights_only=True)
    assert doc["model"] == {**start["model"], "image_size": 96} and doc["contract"]["size"] == 96
    assert {k for k in doc["state_dict"]} == set(start["state_dict"])
    assert torch.equal(doc["state_dict"]["score_head.weight"], start["state_dict"]["score_head.weight"])
    from facemark.train.checkpoint import load_model

    model = load_model(tuned.last_path)[0]
    assert model.codec.grid == 6 and model(torch.zeros(1, 1, 96, 96)).shape == (1, 68, 2)


def test_a_fine_tune_keeps_its_initial_weights_until_an_epoch_beats_them(tmp_path, capsys):
    """Epoch 0 validates the --init weights and keeps them as best.pt; a run whose epochs only get worse (a peak
    LR far too high) ends with best.pt = the initial weights, and the fine-tune recipe is printed."""
    few = few_faces_xml(tmp_path)
    source = train(tiny_config(tmp_path, epochs=30, data=[few], val_data=[few], max_images=None, head="pip",
                               out=str(tmp_path / "src")))
    messages = []
    from facemark.train.loop import Callbacks

    class Record(Callbacks):
        def on_message(self, text: str) -> None:
            messages.append(text)

    ruined = train(tiny_config(tmp_path, epochs=2, data=[few], val_data=[few], max_images=None, lr=0.05,
                               out=str(tmp_path / "ruined"), init=str(source.best_path)), Record(),
                   explicit={"lr"})
    initial = ruined.history[0]
    assert initial.epoch == 0 and initial.train_loss is None
    assert initial.val_nme == pytest.approx(source.best_val_nme, rel=1e-3)  # the same weights, the same faces
    assert not any(h.val_nme <= initial.val_nme for h in ruined.history[1:])  # worse (or NaN) every epoch
    assert ruined.best_val_nme == initial.val_nme
    best = torch.load(ruined.best_path, weights_only=True)
    assert best["metrics"]["epoch"] == 0
    assert any(m.startswith("fine-tune recipe: peak LR 0.05,") for m in messages)


def _pip_model(size: int = 64):
    from facemark.train.codecs import nearest_neighbors
    from facemark.train.model import LandmarkNet

    torch.manual_seed(0)
    model = LandmarkNet(image_size=size, head="pip", presence=True,
                        neighbors=nearest_neighbors(np.random.default_rng(0).uniform(size=(68, 2)), 10)).eval()
    torch.nn.init.normal_(model.score_head.weight, std=0.05)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # non-trivial statistics
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return model


def test_an_exported_model_is_read_back_as_the_same_network(tmp_path):
    """`train --init model.onnx`'s reader: folded BatchNorms become identity BatchNorms; the network computes what
    the export computes, and re-estimating the BatchNorm statistics leaves the eval-mode outputs unchanged."""
    import onnx

    from facemark.export.onnx_export import export_fp32, set_metadata
    from facemark.metadata import CONTRACT, HEAD, TRAIN_DATA
    from facemark.train.model import build_model
    from facemark.train.onnx_init import FOLDED_BATCHNORM, calibrate_folded_batchnorm, checkpoint_from_onnx

    original = _pip_model()
    proto = export_fp32(original, 64)
    set_metadata(proto, {CONTRACT: CropContract(size=64).to_json(), HEAD: "pip", TRAIN_DATA: json.dumps([SAMPLES_XML])})
    path = tmp_path / "pip.onnx"
    onnx.save(proto, str(path))
    doc = checkpoint_from_onnx(path)
    assert doc[FOLDED_BATCHNORM] and doc["model"]["neighbors"] == original.config["neighbors"]
    rebuilt = build_model(doc["model"])
    rebuilt.load_state_dict(doc["state_dict"])
    rebuilt.eval()
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (4, 1, 64, 64)).astype(np.float32))
    with torch.no_grad():
        want, got = original.outputs(x), rebuilt.outputs(x)
        for name in ("landmarks", "landmark_scores", "face_score"):
            assert torch.allclose(want[name], got[name], atol=1e-4), name
        calibrate_folded_batchnorm(rebuilt, x)
        after = rebuilt.eval().outputs(x)
    assert torch.allclose(after["landmarks"], got["landmarks"], atol=1e-4)
    bn = rebuilt.backbone.bn1
    assert not torch.allclose(bn.running_var, torch.full_like(bn.running_var, 1 - bn.eps))  # statistics were set


def test_init_from_onnx_with_detector_boxes_and_ema_logs_both_validation_nmes(tmp_path):
    import onnx

    from facemark.export.onnx_export import export_fp32, set_metadata
    from facemark.metadata import CONTRACT, HEAD, TRAIN_DATA

    proto = export_fp32(_pip_model(), 64)
    set_metadata(proto, {CONTRACT: CropContract(size=64).to_json(), HEAD: "pip", TRAIN_DATA: json.dumps([SAMPLES_XML])})
    onnx.save(proto, str(tmp_path / "start.onnx"))
    cfg = tiny_config(tmp_path, epochs=2, head="pip", presence=True, init=str(tmp_path / "start.onnx"),
                      val_boxes="detector", ema=0.9)
    result = train(cfg)
    for stats in result.history:
        assert stats.val_nme == stats.val_nme_detector_boxes != stats.val_nme_landmark_boxes
    assert result.best_path.is_file()
    with pytest.raises(Exception, match="val-boxes"):
        train(tiny_config(tmp_path, val_boxes="nope"))


def _moved_box(box, dx: float, dy: float, k: float):
    x, y, w, h = box
    side = max(w, h)
    cx, cy = x + w / 2 + dx * side, y + h / 2 + dy * side
    return (cx - w * k / 2, cy - h * k / 2, w * k, h * k)


def test_a_real_first_pass_box_gives_the_crop_the_runtime_cuts_on_it(tmp_path):
    from facemark.contract import box_from_landmarks
    from facemark.imageio import read_gray

    record = spot_record(tmp_path, spot_index=36)
    contract = CropContract(size=96)
    first_pass = _moved_box(box_from_landmarks(record.landmarks), 0.12, -0.06, 0.8)
    exact = dataclasses_replace(AugmentConfig.none(), det_p=1.0)
    dataset = AugmentedFaces(FaceCache([record], contract, first_pass_boxes={record.key: first_pass}), contract,
                             exact)
    crop = dataset[0][0][0].numpy()
    runtime_crop, _ = contract.prepare(read_gray(record.image_path), [first_pass])
    assert np.abs(bright_centroid(crop) - bright_centroid(runtime_crop[0, 0])).max() < 0.5
    # Without the box the same settings crop on the landmark box: the spot lands elsewhere.
    plain = AugmentedFaces(FaceCache([record], contract), contract, AugmentConfig.none())
    assert np.abs(bright_centroid(plain[0][0][0].numpy()) - bright_centroid(runtime_crop[0, 0])).max() > 3
    # Flipped, the crop is the runtime's crop of the mirrored photo on the mirrored box (the detector's box of the
    # mirrored photo), not the mirror of this crop.
    gray = read_gray(record.image_path)
    width = gray.shape[1]
    x, y, w, h = first_pass
    mirrored, _ = contract.prepare(np.ascontiguousarray(gray[:, ::-1]), [(width - 1 - (x + w), y, w, h)])
    cache = FaceCache([record], contract, first_pass_boxes={record.key: first_pass})
    rng = np.random.default_rng(0)
    flipping = dataclasses_replace(exact, flip=True)
    for _ in range(20):
        m, flipped = augment_matrix(rng, cache.side, contract.size, flipping, contract.scale,
                                    cache.first_pass_offset[0], cache.margin)
        if flipped:
            break
    assert flipped
    crop = cv2.warpAffine(cache.crops[0], m, (contract.size, contract.size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=contract.border_value)
    assert np.abs(bright_centroid(crop / 255.0) - bright_centroid(mirrored[0, 0])).max() < 0.5


def test_crops_on_far_real_first_pass_boxes_stay_inside_the_face_cache(tmp_path):
    from facemark.contract import box_from_landmarks

    angles = np.linspace(0, 2 * math.pi, 68, endpoint=False)
    points = np.stack([500 + 60 * np.cos(angles), 500 + 80 * np.sin(angles)], axis=1).astype(np.float32)
    path = tmp_path / "flat.png"
    cv2.imwrite(str(path), np.full((1000, 1000), 200, np.uint8))  # the photo reaches far beyond any crop
    record = FaceRecord(path, points, key="flat.png#0")
    contract = CropContract(size=64)
    far = _moved_box(box_from_landmarks(points), 0.3, -0.2, 1.3)  # as far off as real Haar boxes go
    aug = dataclasses_replace(AugmentConfig.none(), rotate_deg=30, zoom=0.1, shift=0.08, flip=True, det_p=1.0)

    def border_pixels(cache: FaceCache, offset: np.ndarray) -> int:
        rng, worst = np.random.default_rng(0), 0
        for _ in range(40):
            m, _ = augment_matrix(rng, cache.side, contract.size, aug, contract.scale, offset, cache.margin)
            crop = cv2.warpAffine(cache.crops[0], m, (contract.size, contract.size), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            worst = max(worst, int((crop != 200).sum()))
        return worst

    cache = FaceCache([record], contract, first_pass_boxes={record.key: far})
    assert border_pixels(cache, cache.first_pass_offset[0]) == 0
    narrow = FaceCache([record], contract)  # the modelled-error cache would show its border on such boxes
    assert border_pixels(narrow, cache.first_pass_offset[0]) > 0


def test_validation_detector_boxes_are_the_real_first_pass_boxes_where_given(tmp_path):
    from facemark.contract import box_from_landmarks
    from facemark.imageio import read_gray
    from facemark.train.dataset import validation_tensors

    record = spot_record(tmp_path)
    other = FaceRecord(record.image_path, record.landmarks + 5, key="spot.png#1")
    contract = CropContract(size=64)
    real = _moved_box(box_from_landmarks(record.landmarks), -0.1, 0.05, 1.1)
    with_real = validation_tensors([record, other], contract, first_pass_boxes={record.key: real})
    modelled = validation_tensors([record, other], contract)
    expected, _ = contract.prepare(read_gray(record.image_path), [real])
    np.testing.assert_array_equal(with_real["detector"][0][0], expected[0])
    assert not np.array_equal(modelled["detector"][0][0], expected[0])
    # The face without a real box keeps the seeded draw it has without any file: the stream stays aligned.
    np.testing.assert_array_equal(with_real["detector"][0][1], modelled["detector"][0][1])
    np.testing.assert_array_equal(with_real["landmarks"][0], modelled["landmarks"][0])


def test_first_pass_boxes_file_is_checked_in_one_line(tmp_path, capsys):
    bad = tmp_path / "boxes.json"
    bad.write_text("{\"faces\": [1, 2]}")
    code = run(["train", "--data", SAMPLES_XML, "--val-data", SAMPLES_XML, "--out-dir", str(tmp_path / "r"),
                "--epochs", "1", "--first-pass-boxes", str(bad)])
    assert code == 2
    err = capsys.readouterr().err
    assert "boxes.json: not a first-pass boxes file" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before a run folder was claimed
    for box, problem in [([1, 2, 0, 4], "[1.0, 2.0, 0.0, 4.0] is not four finite numbers with positive size"),
                         ("1234", "'1234' is not a list of four numbers"),
                         ([1, 2, 3, 4, 5], "[1, 2, 3, 4, 5] is not a list of four numbers"),
                         ([True, True, True, True], "[True, True, True, True] is not a list of four numbers")]:
        bad.write_text(json.dumps({"faces": {"spot.png#0": box}, "landmark_boxes": {"spot.png#0": [1, 2, 3, 4]}}))
        assert run(["train", "--data", SAMPLES_XML, "--val-data", SAMPLES_XML, "--out-dir", str(tmp_path / "r"),
                    "--epochs", "1", "--first-pass-boxes", str(bad)]) == 2
        assert f"face spot.png#0: {problem}" in capsys.readouterr().err
    bad.write_text(json.dumps({"faces": {"spot.png#0": [1, 2, 3, 4]}}))  # an older file: no landmark boxes
    assert run(["train", "--data", SAMPLES_XML, "--out-dir", str(tmp_path / "r"), "--epochs", "1",
                "--first-pass-boxes", str(bad)]) == 2
    assert "not a first-pass boxes file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def _boxes_file(path: Path, records, shift: float = 0.0) -> Path:
    """A first-pass boxes file for `records`: each face's landmark box moved by `shift` px as its box."""
    from facemark.contract import box_from_landmarks

    boxes = {r.key: [v + shift for v in box_from_landmarks(r.landmarks)] for r in records}
    landmark_boxes = {r.key: list(box_from_landmarks(r.landmarks)) for r in records}
    path.write_text(json.dumps({"faces": boxes, "landmark_boxes": landmark_boxes}))
    return path


def test_first_pass_boxes_must_be_the_datas_own_faces(tmp_path):
    from facemark.data import load_records
    from facemark.errors import DataError
    from facemark.train.loop import first_pass_boxes_for

    records = load_records([SAMPLES_XML], lambda _m: None)
    boxes = first_pass_boxes_for(str(_boxes_file(tmp_path / "own.json", records, 3.0)), records)
    from facemark.contract import box_from_landmarks

    assert set(boxes) == {r.key for r in records}
    assert boxes[records[0].key][0] == pytest.approx(box_from_landmarks(records[0].landmarks)[0] + 3)
    # Another photo with the same file name (another folder): its landmark box gives it away.
    moved = [FaceRecord(r.image_path, r.landmarks + 40, key=r.key) for r in records]
    with pytest.raises(DataError, match=f"face {records[0].key} was another face when the file was made"):
        first_pass_boxes_for(str(_boxes_file(tmp_path / "other.json", moved)), records)
    # A key seen twice (--val-data = --data) is fine while it is the same face; another face under it is not.
    assert first_pass_boxes_for(str(tmp_path / "own.json"), [*records, records[0]]) == boxes
    with pytest.raises(DataError, match="was another face"):
        first_pass_boxes_for(str(tmp_path / "own.json"), [*records, moved[0]])
    elsewhere = [FaceRecord(r.image_path, r.landmarks, key="x" + r.key) for r in records]
    with pytest.raises(DataError, match="holds none of these"):
        first_pass_boxes_for(str(tmp_path / "own.json"), elsewhere)


def test_resume_refuses_a_first_pass_boxes_file_that_changed(tmp_path):
    from facemark.data import load_records
    from facemark.errors import DataError

    records = load_records([SAMPLES_XML], lambda _m: None)
    boxes = _boxes_file(tmp_path / "boxes.json", records, 2.0)
    cfg = tiny_config(tmp_path, epochs=1, data=[SAMPLES_XML], val_data=[SAMPLES_XML], first_pass_boxes=str(boxes))
    first = train(cfg)
    last = first.best_path.parent / "last.pt"
    assert load_checkpoint(last)["train"]["first_pass_boxes_sha256"]
    _boxes_file(boxes, records, 5.0)  # made again, other boxes
    with pytest.raises(DataError, match="changed since the run began"):
        train(TrainConfig(data=[], epochs=2), resume=last, explicit={"epochs"})
    _boxes_file(boxes, records, 2.0)  # the same file again: the run goes on
    assert [h.epoch for h in train(TrainConfig(data=[], epochs=2), resume=last, explicit={"epochs"}).history] == [1, 2]


def test_motion_blur_spreads_a_point_along_one_line_and_occlusion_paints_a_rectangle():
    """--blur 1 --motion-blur 1: every crop is blurred along a line (a dot becomes a segment, no wider than a
    pixel or two across it); --occlusion 1: every crop holds one constant rectangle of 15-40 % of the side."""
    from facemark.train.dataset import photometric

    dot = np.zeros((128, 128), np.uint8)
    dot[64, 64] = 255
    plain = dict(AugmentConfig.none().__dict__)
    moved = photometric(dot, np.random.default_rng(1), AugmentConfig(**{**plain, "blur_p": 1.0, "motion_blur": 1.0}))
    ys, xs = np.nonzero(moved > 0.1 * moved.max())
    assert len(xs) >= 3  # spread ...
    points = np.stack([xs, ys], 1).astype(np.float64)
    spread = np.linalg.svd(points - points.mean(0), compute_uv=False)
    assert spread[1] < 0.5 * spread[0]  # ... along one direction (a Gaussian blur: about equal)
    flat = np.full((128, 128), 100, np.uint8)
    occluded = photometric(flat, np.random.default_rng(2), AugmentConfig(**{**plain, "occlude_p": 1.0}))
    painted = occluded != 100
    rows, cols = np.nonzero(painted.any(1))[0], np.nonzero(painted.any(0))[0]
    assert painted.sum() == len(rows) * len(cols)  # one filled rectangle
    assert 0.15 * 128 - 1 <= len(rows) <= 0.4 * 128 and 0.15 * 128 - 1 <= len(cols) <= 0.4 * 128


def test_distillation_targets_are_the_teachers_accurate_points_blended_into_the_annotation(tmp_path):
    """--teacher: the shipped model's two-pass + flip landmarks on each cached face lie close to the annotation
    (a trained teacher), and the targets are the weighted blend of the two, in the cache's pixels."""
    from facemark.contract import CropContract
    from facemark.data import load_records
    from facemark.train.dataset import FaceCache
    from facemark.train.distill import distill_targets, teacher_points

    shipped = str(Path(__file__).resolve().parents[1] / "facemark" / "assets" / "facemark-68.onnx")
    records = load_records([few_faces_xml(tmp_path, faces=4)], lambda _: None)
    cache = FaceCache(records, CropContract(size=64))
    taught = teacher_points(cache, shipped)
    side = np.ptp(cache.points, axis=1).max(axis=1)  # face size in cache pixels
    error = np.linalg.norm(taught - cache.points, axis=2).mean(axis=1) / side
    assert (error < 0.08).all(), error  # the teacher agrees with dlib's points on these photos
    assert np.allclose(distill_targets(cache, shipped, 0.0), cache.points)
    assert np.allclose(distill_targets(cache, shipped, 0.25), 0.75 * cache.points + 0.25 * taught, atol=1e-4)
