"""`facemark runtime predict`: inputs, bad files, JSON schema, annotated images, exit codes."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DLIB_EXAMPLES, SAMPLES, requires_dlib_examples
from PIL import Image
from test_runtime import export_tiny_onnx

from facemark.cli import run
from facemark.runtime.defaults import DEFAULT_REFINE  # noqa: E402
from facemark.runtime.predict.inputs import collect_inputs


@pytest.fixture(scope="module")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_tiny_onnx(tiny_checkpoint, tmp_path_factory.getbasetemp() / "runtime-models" / "tiny.onnx")


def predict(tmp_path: Path, model: Path, *args: str) -> tuple[int, dict]:
    out_json = tmp_path / "result" / "landmarks.json"
    code = run(["runtime", "predict", *args, "--model", str(model), "--json", str(out_json), "--device", "cpu",
                "--threads", "1"])
    return code, json.loads(out_json.read_text()) if out_json.is_file() else {}


def check_schema(doc: dict) -> None:
    assert set(doc) == {"model", "detector", "pipeline", "complete", "images"}
    assert doc["pipeline"]["refine"] == DEFAULT_REFINE and doc["pipeline"]["tta"] == "none"  # the defaults, recorded
    assert {"path", "providers", "precision", "points"} <= set(doc["model"])
    assert doc["model"]["providers"][0] == "CPUExecutionProvider"
    for image in doc["images"]:
        assert set(image) == {"path", "width", "height", "faces", "error"}
        if image["error"] is None:
            assert isinstance(image["width"], int) and isinstance(image["height"], int)
        else:
            assert image["faces"] == [] and image["path"] in image["error"]
        for face in image["faces"]:
            assert set(face) == {"box", "landmarks", "score", "detector_score", "detector_box", "landmark_scores"}
            assert len(face["box"]) == 4 and len(face["landmarks"]) == 68
            assert all(len(p) == 2 and all(isinstance(v, float) for v in p) for p in face["landmarks"])


def test_predict_samples_folder_writes_json_and_annotated_images(tmp_path, tiny_onnx):
    out = tmp_path / "demo"
    code, doc = predict(tmp_path, tiny_onnx, str(SAMPLES), "--out-dir", str(out), "--draw", "contours")
    assert code == 0
    check_schema(doc)
    images = {Path(i["path"]).name: i for i in doc["images"]}
    assert set(images) == {p.name for p in SAMPLES.glob("*.jpg")}
    assert images["dogs.jpg"]["faces"] == []
    assert sum(len(i["faces"]) for i in images.values()) >= 5
    sample = images["2009_004587.jpg"]
    original = cv2.imread(str(SAMPLES / "2009_004587.jpg"))
    assert (sample["width"], sample["height"]) == (original.shape[1], original.shape[0])
    annotated = cv2.imread(str(out / "2009_004587.jpg"))
    assert annotated.shape == original.shape
    assert np.abs(annotated.astype(int) - original.astype(int)).max() > 100  # something was drawn
    assert not list(out.glob(".*")), "no temporary files left behind"


def test_bad_inputs_are_one_line_each_and_the_batch_goes_on(tmp_path, tiny_onnx, capsys):
    bad = tmp_path / "inputs"
    bad.mkdir()
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 20)
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.txt").write_text("hello")
    (bad / "huge.png").write_bytes(_png_header_only(20000, 20000))
    good = SAMPLES / "2009_004587.jpg"
    inputs = [str(good), str(bad / "corrupt.jpg"), str(bad / "empty.png"), str(bad / "notes.txt"),
              str(bad / "huge.png"), str(tmp_path / "missing.jpg"), str(tmp_path / "nothing-*.jpg")]
    code, doc = predict(tmp_path, tiny_onnx, *inputs)
    assert code == 1
    check_schema(doc)
    by_name = {Path(i["path"]).name: i for i in doc["images"]}
    assert by_name["2009_004587.jpg"]["error"] is None and by_name["2009_004587.jpg"]["faces"]
    assert "empty file" in by_name["empty.png"]["error"]
    assert "megapixels" in by_name["huge.png"]["error"]
    assert "no such file" in by_name["missing.jpg"]["error"]
    assert "no file matches" in by_name["nothing-*.jpg"]["error"]
    for name in ("corrupt.jpg", "notes.txt"):
        assert by_name[name]["error"]
    err = capsys.readouterr().err
    for name in ("corrupt.jpg", "empty.png", "notes.txt", "huge.png", "missing.jpg"):
        assert sum(name in line for line in err.splitlines() if "error" in line) >= 1, name
    assert "6 failed" in err


def test_gray_16bit_rgba_and_exif_rotated_images(tmp_path, tiny_onnx):
    src = cv2.imread(str(SAMPLES / "2009_004587.jpg"))
    folder = tmp_path / "variants"
    folder.mkdir()
    cv2.imwrite(str(folder / "gray.png"), cv2.cvtColor(src, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "deep.png"), src.astype(np.uint16) * 257)
    cv2.imwrite(str(folder / "rgba.png"), cv2.cvtColor(src, cv2.COLOR_BGR2BGRA))
    # stored rotated 90 degrees; EXIF orientation 6 says "rotate back when displaying"
    rotated = Image.fromarray(cv2.cvtColor(cv2.rotate(src, cv2.ROTATE_90_COUNTERCLOCKWISE), cv2.COLOR_BGR2RGB))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "exif.jpg", exif=exif.tobytes(), quality=95)
    # Full-resolution detection: the point is decoding, not the cascade's stability on a smaller copy.
    code, doc = predict(tmp_path, tiny_onnx, str(folder), "--min-face-windows", "0")
    assert code == 0
    check_schema(doc)
    counts = {Path(i["path"]).name: len(i["faces"]) for i in doc["images"]}
    assert set(counts) == {"gray.png", "deep.png", "rgba.png", "exif.jpg"}
    assert len(set(counts.values())) == 1 and counts["gray.png"] >= 2
    exif_entry = next(i for i in doc["images"] if i["path"].endswith("exif.jpg"))
    assert (exif_entry["width"], exif_entry["height"]) == (src.shape[1], src.shape[0])


def test_inputs_from_folders_globs_and_duplicates(tmp_path):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    for name in ("x.jpg", "y.png"):
        shutil.copy(SAMPLES / "dogs.jpg", nested / name)
    (nested / "readme.txt").write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    files, failures = collect_inputs([tmp_path / "a", str(tmp_path / "**" / "*.jpg"), nested / "x.jpg", empty])
    assert [f.name for f in files] == ["x.jpg", "y.png"]
    assert len(failures) == 1 and "no image files" in failures[0].error


def test_json_goes_to_stdout_without_out_or_json(tiny_onnx, capsys):
    code = run(["runtime", "predict", str(SAMPLES / "dogs.jpg"), "--model", str(tiny_onnx), "--device", "cpu"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["images"][0]["faces"] == [] and doc["images"][0]["error"] is None


def test_model_and_provider_errors_are_one_line_exit_2(tmp_path, tiny_onnx, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"garbage")
    assert run(["runtime", "predict", str(SAMPLES / "dogs.jpg"), "--model", str(broken)]) == 2
    assert "broken.onnx" in capsys.readouterr().err
    from facemark.runtime.session import CUDA, available_providers

    if CUDA not in available_providers():
        assert run(["runtime", "predict", str(SAMPLES / "dogs.jpg"), "--model", str(tiny_onnx),
                    "--device", "cuda"]) == 2
        assert "cannot run here" in capsys.readouterr().err


@requires_dlib_examples
def test_predict_on_dlib_examples(tmp_path, tiny_onnx):
    code, doc = predict(tmp_path, tiny_onnx, str(DLIB_EXAMPLES / "*.jpg"), "--draw", "none")
    assert code == 0
    check_schema(doc)
    faces = {Path(i["path"]).name: len(i["faces"]) for i in doc["images"]}
    assert len(faces) == 12 and faces["dogs.jpg"] == 0
    assert sum(n > 0 for n in faces.values()) >= 9


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares a huge image (a few bytes of pixel data): refused before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_error_lines_print_brackets_in_file_names_verbatim(tmp_path, tiny_onnx, capsys):
    """Rich would read "[1]" or "[serve]" as markup and drop it: the line must name the file as it is."""
    broken = tmp_path / "scan[1].jpg"
    broken.write_bytes(b"not an image")
    code, _ = predict(tmp_path, tiny_onnx, str(broken))
    assert code == 1
    assert any("scan[1].jpg" in line for line in capsys.readouterr().err.splitlines() if "error" in line)
    missing_model = tmp_path / "model[v2].onnx"
    assert run(["runtime", "predict", str(SAMPLES), "--model", str(missing_model)]) == 2
    assert "model[v2].onnx" in capsys.readouterr().err
