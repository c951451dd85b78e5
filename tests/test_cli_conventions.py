"""CLI conventions: --version, -h on every command."""

from __future__ import annotations

import pytest

from facemark import __version__
from facemark.cli import run


def test_version_flag_prints_the_package_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"facemark {__version__}"


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["export"], ["runtime"], ["runtime", "predict"],
                                     ["runtime", "video"], ["bench"]])
def test_short_help_works_everywhere(command, capsys):
    assert run([*command, "-h"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_detect_takes_bgr_rgb_gray_pil_and_paths_alike():
    import cv2
    import numpy as np
    from conftest import SAMPLES
    from PIL import Image

    from facemark.errors import ImageError
    from facemark.imageio import image_to_gray, read_image

    path = SAMPLES / "2009_004587.jpg"
    bgr = read_image(path)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    reference = image_to_gray(bgr)
    assert np.array_equal(image_to_gray(rgb, color="rgb"), reference)
    assert np.array_equal(image_to_gray(path), reference) and np.array_equal(image_to_gray(str(path)), reference)
    assert np.abs(image_to_gray(Image.fromarray(rgb)).astype(int) - reference).max() <= 1
    assert np.array_equal(image_to_gray(reference, color="gray"), reference)
    # An RGB array read as BGR is a different picture: the red and blue channels swap weights.
    assert not np.array_equal(image_to_gray(rgb), reference)
    with pytest.raises(ImageError, match="color 'hsv'"):
        image_to_gray(bgr, color="hsv")
    with pytest.raises(ImageError, match="color='gray'"):
        image_to_gray(bgr, color="gray")


# --- quiet, honest console output -------------------------------------------------------------------------------
def folder_with_orphan_pts(tmp_path, orphans: int):
    """A .pts folder: four real faces (image + points) and `orphans` .pts files without an image."""
    import shutil

    from conftest import SAMPLES

    from facemark.data import load_records

    folder = tmp_path / "faces"
    folder.mkdir()
    records = load_records([SAMPLES / "landmarks.xml"], pytest.fail)[:4]
    names = [f"face{i}" for i in range(len(records))] + [f"orphan{i}" for i in range(orphans)]
    for i, name in enumerate(names):
        record = records[i % len(records)]
        if i < len(records):
            shutil.copy(record.image_path, folder / f"{name}.jpg")
        points = (f"{x:.3f} {y:.3f}" for x, y in record.landmarks)
        (folder / f"{name}.pts").write_text("\n".join(["version: 1", "n_points: 68", "{", *points, "}"]) + "\n")
    return folder


def test_repeated_data_warnings_become_one_line_unless_verbose():
    from facemark.reporting import summarize_warnings

    messages = [f"a/{i}.pts: no image beside it; skipped" for i in range(6)] + ["b.xml: image x.jpg not found"]
    lines = summarize_warnings(messages)
    assert lines == ["6 files: no image beside it; skipped (first: a/0.pts; --verbose lists them all)",
                     "b.xml: image x.jpg not found"]
    assert summarize_warnings(messages, verbose=True) == messages


def test_training_split_summarises_warnings_and_max_images_keeps_validation_whole(tmp_path):
    pytest.importorskip("torch")
    from facemark.train.loop import TrainConfig, load_split

    folder = folder_with_orphan_pts(tmp_path, 4)
    said: list[str] = []
    load_split(TrainConfig(data=[str(folder)], val_fraction=0.5), said.append)
    assert len(said) == 1 and said[0].startswith("4 files: no image beside it")
    said.clear()
    load_split(TrainConfig(data=[str(folder)], val_fraction=0.5), said.append, verbose=True)
    assert len(said) == 4
    from conftest import DATA_300W

    if DATA_300W.is_dir():
        full = load_split(TrainConfig(data=[str(DATA_300W)]), lambda _m: None)
        capped = load_split(TrainConfig(data=[str(DATA_300W)], max_images=200), lambda _m: None)
        assert len(capped[0]) == 200 and len(capped[1]) == len(full[1]), "validation stays the whole split"


def test_progress_writes_plain_lines_when_not_a_terminal():
    import io

    from rich.console import Console

    from facemark.reporting import PlainProgress, progress_display

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    progress = progress_display(console)
    assert isinstance(progress, PlainProgress)
    with progress:
        task = progress.add_task("landmarks", total=3)
        for _ in range(3):
            progress.advance(task)
    assert buffer.getvalue().splitlines()[-1].startswith("landmarks: 3/3")
    assert "\r" not in buffer.getvalue() and "\x1b" not in buffer.getvalue()


def test_int8_export_prints_nothing_but_its_own_report_on_stdout(tiny_checkpoint, tmp_path, capfd):
    pytest.importorskip("torch")
    assert run(["export", str(tiny_checkpoint), "--precision", "int8", "--no-verify", "-o",
                str(tmp_path / "m.onnx")]) == 0
    out = capfd.readouterr().out
    assert "Collecting" not in out and "tensor data" not in out
    assert "not reachable" in out, "the unreachable training data is said, with its cost"


def test_export_uses_the_checkpoint_training_data_by_default(tmp_path):
    torch = pytest.importorskip("torch")
    from conftest import SAMPLES, TINY_SIZE

    from facemark.contract import CropContract
    from facemark.export.exporter import export_model
    from facemark.metadata import parse_metadata
    from facemark.train.checkpoint import save_checkpoint
    from facemark.train.model import LandmarkNet

    torch.manual_seed(0)
    checkpoint = tmp_path / "trained-on-samples.pt"
    save_checkpoint(checkpoint, LandmarkNet(image_size=TINY_SIZE).eval(), CropContract(size=TINY_SIZE),
                    {"data": [str(SAMPLES / "landmarks.xml")], "seed": 0, "val_fraction": 0.1},
                    {"epoch": 0, "val_nme": None})
    said: list[str] = []
    result = export_model(checkpoint, tmp_path / "m.onnx", progress=said.append)
    assert any(line.startswith("the checkpoint's training data:") for line in said), said
    import onnx

    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert parse_metadata(props, "m.onnx").calibration is not None, "the Haar box calibration is embedded"
