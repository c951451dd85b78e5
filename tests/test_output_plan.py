"""Issue 37: nothing facemark is pointed at is ever destroyed.

The output plan (facemark.outputs) is checked by every command that writes, before any work: each output flag
of each command is pointed at an input (the path itself, a symlink to it, a hard link to it), at a folder
holding an input where the command writes there, and at another output. Each case must end in one line naming
both paths, exit 2, the inputs' bytes unchanged and no output written. Then: unreadable inputs, file names that
are not UTF-8, huge files, 16-bit PIL images, videos whose frames change size, and train's run folder."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
from conftest import SAMPLES
from PIL import Image

from facemark.cli import run
from facemark.runtime.schema import schema

MODEL = SAMPLES.parent / "facemark-68.onnx"


@dataclass
class Inputs:
    """Real inputs of every command in one temporary folder."""

    root: Path
    photo: Path  # photos/a.jpg
    photos: Path  # the folder
    clip: Path  # an MJPEG .avi
    checkpoint: Path  # best.pt (a real, tiny checkpoint)
    model: Path  # an exported .onnx (the shipped one)
    xml: Path  # data/landmarks.xml (its photos beside it)

    def files(self) -> list[Path]:
        below = [p for folder in (self.photos, self.xml.parent) for p in folder.rglob("*") if p.is_file()]
        return sorted({*below, self.clip, self.checkpoint, self.model})


@pytest.fixture
def inputs(tmp_path, tiny_checkpoint) -> Inputs:
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = photos / "a.jpg"
    shutil.copy(sorted(SAMPLES.glob("*.jpg"))[0], photo)
    data = tmp_path / "data"
    shutil.copytree(SAMPLES, data)
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for k in range(3):
        writer.write(np.full((48, 64, 3), 40 * k, np.uint8))
    writer.release()
    checkpoint = tmp_path / "best.pt"
    shutil.copy(tiny_checkpoint, checkpoint)
    model = tmp_path / "model.onnx"
    shutil.copy(MODEL, model)
    return Inputs(tmp_path, photo, photos, clip, checkpoint, model, data / "landmarks.xml")


# Each command with its inputs, as argv before the output flag; `flag` and its value are appended.
COMMANDS: dict[str, Callable[[Inputs], list[str]]] = {
    "predict": lambda i: ["runtime", "predict", str(i.photos), "--model", str(i.model)],
    "video": lambda i: ["runtime", "video", str(i.clip), "--model", str(i.model)],
    "export": lambda i: ["export", str(i.checkpoint)],
    "export-onnx": lambda i: ["export", str(i.model)],
    "evaluate": lambda i: ["evaluate", "--model", str(i.model), "--data", str(i.xml)],
    "train": lambda i: ["train", "--data", str(i.xml), "--init", str(i.checkpoint), "--exist-ok"],
    "detectors-boxes": lambda i: ["detectors", "boxes", "--data", str(i.xml), "--model", str(i.model)],
    "bench": lambda i: ["bench", "--model", str(i.model)],
}

# (command, output flag): the input it is pointed at (a file).
FILE_TARGETS: list[tuple[str, str, Callable[[Inputs], Path]]] = [
    ("predict", "--json", lambda i: i.photo),
    ("predict", "--jsonl", lambda i: i.photo),
    ("predict", "--csv", lambda i: i.photo),
    ("predict", "--out-dir", lambda i: i.photo),
    ("predict", "--aligned", lambda i: i.photo),
    ("predict", "--json", lambda i: i.model),
    ("video", "--output", lambda i: i.clip),
    ("video", "--jsonl", lambda i: i.clip),
    ("video", "--jsonl", lambda i: i.model),
    ("export", "-o", lambda i: i.checkpoint),
    ("export", "--triton-repo", lambda i: i.checkpoint),
    ("export-onnx", "--triton-repo", lambda i: i.model),
    ("evaluate", "--json", lambda i: i.model),
    ("evaluate", "--csv", lambda i: i.xml),
    ("evaluate", "--plot", lambda i: i.xml.parent / "2008_002506.jpg"),  # a photo the XML names
    ("train", "--out-dir", lambda i: i.checkpoint),
    ("detectors-boxes", "--output", lambda i: i.xml),
    ("bench", "--out-dir", lambda i: i.model),
]


def _link(kind: str, target: Path, root: Path) -> Path:
    """The path to give: the input itself, a symlink to it, or a hard link to it (beside it, own name)."""
    if kind == "same":
        return target
    link = root / f"{kind}-{target.name}"  # outside any input folder
    if kind == "symlink":
        link.symlink_to(target)
    else:
        os.link(target, link)
    return link


def _refused(argv: list[str], inputs: Inputs, capsys, names: tuple[str, ...], absent: tuple[Path, ...] = ()
             ) -> str:
    """Run argv; assert exit 2, one error line holding every one of `names`, inputs unchanged, nothing written."""
    before = {p: p.read_bytes() for p in inputs.files()}
    listing = sorted(str(p) for p in inputs.root.rglob("*"))
    code = run(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    line = " ".join(lines[0].split())  # rich may wrap a long line
    assert all(name in line for name in names), line
    assert {p: p.read_bytes() for p in inputs.files()} == before, "an input changed"
    assert sorted(str(p) for p in inputs.root.rglob("*")) == listing, "something was written"
    for path in absent:
        assert not path.exists()
    return line


@pytest.mark.parametrize("kind", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize(("command", "flag", "target"), FILE_TARGETS,
                         ids=[f"{c}{f}-{i}" for i, (c, f, _t) in enumerate(FILE_TARGETS)])
def test_an_output_on_an_input_is_refused_in_one_line_and_the_input_keeps_its_bytes(inputs, capsys, command, flag,
                                                                                    target, kind):
    given = _link(kind, target(inputs), inputs.root)
    line = _refused([*COMMANDS[command](inputs), flag, str(given)], inputs, capsys, (str(given), str(target(inputs))))
    assert "would write over" in line


# An input inside a folder the command writes into, where the command would write over it.
FOLDER_CASES: list[tuple[str, Callable[[Inputs], list[str]], str]] = [
    ("predict --out-dir on the photos' folder", lambda i: [*COMMANDS["predict"](i), "--out-dir", str(i.photos)],
     "photos"),
    ("predict --aligned on the photos' folder", lambda i: [*COMMANDS["predict"](i), "--aligned", str(i.photos)],
     "photos"),
    ("predict --jsonl on a photo of an input folder",
     lambda i: ["runtime", "predict", str(i.photos), "--jsonl", str(i.photo)], "a.jpg"),
    ("export -o on the checkpoint's report", lambda i: ["export", str(i.checkpoint), "-o",
                                                        str(i.checkpoint.with_suffix(".onnx"))], "best.pt"),
    ("export --triton-repo holding the model", lambda i: ["export", str(_in_repo(i)), "--triton-repo",
                                                          str(i.root / "repo")], "model.onnx"),
    ("train --out-dir holding --init as best.pt", lambda i: ["--out-dir", str(_as_run(i)), *COMMANDS["train"](i)][2:] +
     ["--out-dir", str(i.root / "run")], "best.pt"),
    ("train --out-dir on the data folder", lambda i: ["train", "--data", str(i.xml.parent), "--out-dir",
                                                     str(i.xml.parent)], "data"),
    ("bench --out-dir holding --model in models/", lambda i: ["bench", "--model", str(_in_bench(i)), "--out-dir",
                                                              str(i.root / "bench")], "model.onnx"),
    ("evaluate --csv on a photo of --data's folder",
     lambda i: ["evaluate", "--model", str(i.model), "--data", str(i.xml.parent), "--csv",
                str(i.xml.parent / "dogs.jpg")], "dogs.jpg"),
]


def _in_repo(i: Inputs) -> Path:
    """The model placed where --triton-repo writes (repo/facemark_crops/1/model.onnx): an input it replaces."""
    place = i.root / "repo" / "facemark_crops" / "1" / "model.onnx"
    place.parent.mkdir(parents=True)
    shutil.move(i.model, place)
    i.model = place
    return place


def _as_run(i: Inputs) -> Path:
    run_folder = i.root / "run"
    run_folder.mkdir()
    shutil.move(i.checkpoint, run_folder / "best.pt")
    i.checkpoint = run_folder / "best.pt"
    return run_folder


def _in_bench(i: Inputs) -> Path:
    place = i.root / "bench" / "models" / "model.onnx"
    place.parent.mkdir(parents=True)
    shutil.move(i.model, place)
    i.model = place
    return place


@pytest.mark.parametrize(("case", "argv", "name"), FOLDER_CASES, ids=[c for c, _a, _n in FOLDER_CASES])
def test_an_input_inside_a_folder_the_command_writes_is_refused(inputs, capsys, case, argv, name):
    if case.startswith("export -o"):  # the report of best.onnx is best.parity.json: make that an input
        report = inputs.checkpoint.with_suffix(".parity.json")
        os.link(inputs.checkpoint, report)
        name = report.name
    line = _refused(argv(inputs), inputs, capsys, (name,))
    assert "would write over" in line


# Two outputs of one command on one path (as given, or one a symlink to the other's file).
TWO_OUTPUTS: list[tuple[str, list[str]]] = [
    ("predict", ["--json", "{o}", "--csv", "{o}"]),
    ("predict", ["--json", "{o}", "--jsonl", "{o}"]),
    ("predict", ["--jsonl", "{o}", "--csv", "{link}"]),
    ("predict", ["--out-dir", "{o}", "--aligned", "{o}"]),
    ("predict", ["--json", "{o}", "--out-dir", "{o}"]),
    ("video", ["--output", "{o}", "--jsonl", "{o}"]),
    ("export", ["-o", "{o}", "--triton-repo", "{o}"]),
    ("export", ["-o", "{repo_model}", "--triton-repo", "{repo}"]),
    ("evaluate", ["--json", "{o}", "--csv", "{o}"]),
    ("evaluate", ["--plot", "{o}", "--json", "{link}"]),
]


@pytest.mark.parametrize(("command", "flags"), TWO_OUTPUTS, ids=[f"{c}{' '.join(f[::2])}" for c, f in TWO_OUTPUTS])
def test_two_outputs_on_one_path_are_refused(inputs, capsys, command, flags):
    o = inputs.root / "o.out"
    if "{link}" in flags:
        o.write_text("an earlier output\n")
        (inputs.root / "link.out").symlink_to(o.name)
    repo = inputs.root / "repo"
    values = {"o": str(o), "link": str(inputs.root / "link.out"), "repo": str(repo),
              "repo_model": str(repo / "facemark_crops" / "x.onnx")}
    argv = [*COMMANDS[command](inputs), *(f.format(**values) for f in flags)]
    line = _refused(argv, inputs, capsys, ())
    assert " and " in line and ("name the same" in line or "would both write it" in line)


def test_streams_stay_allowed_and_a_plain_run_writes_its_outputs(inputs, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert run(["runtime", "predict", str(inputs.photo), "--model", str(inputs.model), "--json", str(out),
                "--jsonl", "/dev/null", "--csv", "-"]) == 0
    assert json.loads(out.read_text())["images"][0]["path"] == str(inputs.photo)
    assert capsys.readouterr().out.startswith("path,face")


# --- reading inputs --------------------------------------------------------------------------------------------

def _predict(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facemark", "runtime", "predict", *args], capture_output=True,
                          cwd=cwd, timeout=300)


def test_an_unreadable_input_is_its_own_error_and_the_batch_goes_on(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted(SAMPLES.glob("*.jpg"))[0]
    shutil.copy(good, folder / "good.jpg")
    (folder / "eio.jpg").symlink_to("/proc/self/mem")  # reading it fails with EIO
    (folder / "einval.jpg").symlink_to("/proc/self/clear_refs")  # EINVAL (write-only)
    (folder / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(folder / "fifo.jpg")
    huge = folder / "huge.jpg"  # a JPEG marker, then 3 GB of zeros (sparse): refused by its size, never read
    huge.write_bytes(b"\xff\xd8\xff\xe0")
    os.truncate(huge, 3 << 30)
    proc = _predict(str(folder), "--json", str(tmp_path / "r.json"), "--workers", "2")
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    images = {Path(i["path"]).name: i for i in json.loads((tmp_path / "r.json").read_text())["images"]}
    assert images["good.jpg"]["error"] is None and images["good.jpg"]["faces"]
    assert "input/output error" in images["eio.jpg"]["error"]
    assert "invalid argument" in images["einval.jpg"]["error"]
    assert "symlink loop" in images["loop.jpg"]["error"]
    assert "not a regular file" in images["fifo.jpg"]["error"]
    assert "larger than the limit" in images["huge.jpg"]["error"] and "--max-file-mb" in images["huge.jpg"]["error"]


def test_max_file_mb_refuses_a_file_by_its_size_and_a_jpeg_of_zeros_is_not_scanned_whole(tmp_path):
    from facemark.errors import ImageError
    from facemark.imageio import read_image, read_image_bytes

    photo = sorted(SAMPLES.glob("*.jpg"))[0]
    with pytest.raises(ImageError, match="larger than the limit"):
        read_image_bytes(photo, max_bytes=1000)
    zeros = tmp_path / "zeros.jpg"
    zeros.write_bytes(b"\xff\xd8\xff\xe0")
    os.truncate(zeros, 150 << 20)  # Pillow scans a JPEG's junk byte by byte: only its head is probed
    with pytest.raises(ImageError, match="not a readable image"):
        read_image(zeros)
    text = tmp_path / "notes.jpg"  # 5 MB of text named .jpg: refused on its first bytes, the rest never read
    text.write_bytes(b"not a photo\n" * 500_000)
    with pytest.raises(ImageError, match="its first bytes name no image format"):
        read_image_bytes(text)
    proc = _predict(str(photo), "--max-file-mb", "0.01", "--json", "-")
    assert proc.returncode == 1 and "larger than the limit of 0.01 MB" in proc.stderr.decode()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file without read permission")
def test_a_file_without_read_permission_is_its_own_error(tmp_path):
    locked = tmp_path / "locked.jpg"
    shutil.copy(sorted(SAMPLES.glob("*.jpg"))[0], locked)
    locked.chmod(0)
    proc = _predict(str(locked), "--json", "-")
    assert proc.returncode == 1 and "permission denied" in json.loads(proc.stdout)["images"][0]["error"]


def test_names_that_are_not_utf8_or_hold_newlines_are_written_in_one_reversible_strict_form(tmp_path):
    folder = tmp_path / "names"
    folder.mkdir()
    source = sorted(SAMPLES.glob("*.jpg"))[0].read_bytes()
    raw = os.fsencode(folder) + b"/caf\xe9\xff.jpg"
    with open(raw, "wb") as f:
        f.write(source)
    (folder / "new\nline\x01.jpg").write_bytes(source)
    out = tmp_path / "r.json"
    proc = _predict(str(folder), "--json", str(out), "--csv", str(tmp_path / "r.csv"), "--jsonl",
                    str(tmp_path / "r.jsonl"))
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr[-2000:]

    def strict(text: str):  # JSON that a strict parser takes: valid UTF-8, no lone surrogate escapes
        text.encode("utf-8")
        assert "\\ud" not in text.lower()
        return json.loads(text)

    document = strict(out.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema("predict")).validate(document)  # path_bytes is in the schema
    images = document["images"]
    by_bytes = {base64.b64decode(i["path_bytes"]) if "path_bytes" in i else os.fsencode(i["path"]): i
                for i in images}
    assert set(by_bytes) == {raw, os.fsencode(folder / "new\nline\x01.jpg")}
    assert by_bytes[raw]["path"].endswith("caf\ufffd\ufffd.jpg") and by_bytes[raw]["faces"]
    lines = [strict(line) for line in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(line.get("path_bytes") or "" for line in lines) == sorted(i.get("path_bytes") or "" for i in images)
    rows = list(csv.DictReader((tmp_path / "r.csv").open(encoding="utf-8", newline="")))
    assert {base64.b64decode(r["path_bytes"]) if r["path_bytes"] else os.fsencode(r["path"]) for r in rows} == \
        set(by_bytes)
    # --resume knows the files again by those names: nothing is redone
    again = _predict(str(folder), "--jsonl", str(tmp_path / "r.jsonl"), "--resume")
    assert again.returncode == 0 and b"2 of 2 inputs already" in again.stderr


def test_a_16_bit_pil_image_finds_the_faces_it_finds_by_path(tmp_path):
    from facemark.imageio import image_to_gray, read_gray
    from facemark.runtime.landmarker import FaceLandmarker

    gray8 = np.asarray(Image.open(sorted(SAMPLES.glob("*.jpg"))[0]).convert("L"), np.uint16)
    path = tmp_path / "gray16.png"
    cv2.imwrite(str(path), gray8 * 257)  # 16-bit PNG
    pil = Image.open(path)
    assert pil.mode.startswith("I")
    assert np.array_equal(image_to_gray(pil), read_gray(path))
    as_float = Image.fromarray((gray8 / 255.0).astype(np.float32), "F")
    assert np.abs(image_to_gray(as_float).astype(int) - gray8).max() <= 1
    landmarker = FaceLandmarker(provider="cpu")
    assert len(landmarker.detect(pil)) == len(landmarker.detect(path)) > 0


def _mjpeg_of_sizes(path: Path, sizes: list[tuple[int, int]]) -> None:
    """A raw MJPEG stream (JPEG after JPEG), each frame the sample photo at its size."""
    photo = cv2.imread(str(sorted(SAMPLES.glob("*.jpg"))[0]))
    with path.open("wb") as f:
        for size in sizes:
            f.write(cv2.imencode(".jpg", cv2.resize(photo, size))[1].tobytes())


def test_video_frames_of_another_size_are_damaged_skipped_and_fail_the_run(tmp_path):
    from facemark.runtime.video import read_frames

    clip = tmp_path / "alt.mjpeg"
    sizes = [(500, 332), (250, 166), (1000, 664)] * 3
    _mjpeg_of_sizes(clip, sizes)
    damaged: list[int] = []
    frames = [index for index, _t, _f in read_frames(str(clip), on_damaged=lambda i, _why: damaged.append(i))]
    assert frames == [0, 3, 6] and damaged == [1, 2, 4, 5, 7, 8]
    proc = subprocess.run([sys.executable, "-m", "facemark", "runtime", "video", str(clip), "--jsonl",
                           str(tmp_path / "f.jsonl")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "6 damaged" in proc.stderr and "250x166" in proc.stderr, proc.stderr
    lines = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == [0, 3, 6]
    assert len({len(line["faces"]) for line in lines}) == 1, "every drawn frame is the same photo"


def test_a_video_of_one_size_has_no_damaged_frame(tmp_path):
    from facemark.runtime.video import read_frames

    clip = tmp_path / "same.mjpeg"
    _mjpeg_of_sizes(clip, [(320, 212)] * 4)
    damaged: list[int] = []
    assert [i for i, _t, _f in read_frames(str(clip), on_damaged=lambda i, _w: damaged.append(i))] == [0, 1, 2, 3]
    assert damaged == []


def test_train_that_fails_its_data_check_claims_no_run_folder_and_says_why_each_file_was_skipped(tmp_path):
    pytest.importorskip("torch")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(sorted(SAMPLES.glob("*.jpg"))[0], data / "face.jpg")
    (data / "face.pts").write_text("version: 1\nn_points: 68\n{\n1 2\n}\n")  # 1 point, not 68
    out = tmp_path / "runs" / "x"
    proc = subprocess.run([sys.executable, "-m", "facemark", "train", "--data", str(data), "--out-dir", str(out),
                           "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    text = proc.stdout + proc.stderr
    assert "no annotated faces found" in text and "face.pts" in text and "skipped" in text, text
    reason = [line for line in text.splitlines() if "face.pts" in line and "skipped" in line]
    assert reason and "68" in reason[0], text
    assert not out.exists() and not (tmp_path / "runs" / "x-2").exists()


def test_evaluate_reports_of_a_face_whose_file_name_is_not_utf8_are_written(tmp_path, capsys):
    import xml.etree.ElementTree as ET

    image = ET.parse(SAMPLES / "landmarks.xml").getroot().find(".//image")
    points = sorted((int(p.get("name")), float(p.get("x")), float(p.get("y"))) for p in image.find("box").iter("part"))
    stem = os.fsencode(tmp_path / "data") + b"/caf\xe9\xff"
    os.mkdir(tmp_path / "data")
    shutil.copy(SAMPLES / image.get("file"), stem + b".jpg")
    with open(stem + b".pts", "w") as f:  # .pts points are 1-based
        f.write("version: 1\nn_points: 68\n{\n" + "".join(f"{x + 1} {y + 1}\n" for _, x, y in points) + "}\n")
    report, table = tmp_path / "r.json", tmp_path / "r.csv"
    assert run(["evaluate", "--model", str(MODEL), "--data", str(tmp_path / "data"), "--split", "all",
                "--json", str(report), "--csv", str(table)]) == 0, capsys.readouterr().err
    assert json.loads(report.read_text(encoding="utf-8"))["faces"] == 1
    assert "caf\ufffd\ufffd.jpg" in table.read_text(encoding="utf-8")
