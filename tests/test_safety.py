"""Issue 26: no input can crash a run, and no run overwrites or loses anything."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES
from PIL import Image

from facemark.imageio import decoder_for, sniff_format

# Imports facemark once, then decodes each file named on stdin in a forked child: every file meets the
# decoders in the same fresh state (a memory corruption that kills a fresh process can stay silent in one that
# has decoded other files first), and a child's death by a signal is reported, not shared.
DECODE_WORKER = r"""
import os, sys
from facemark.errors import ImageError
from facemark.imageio import decode_image
for index, path in enumerate(sys.stdin.read().splitlines()):
    pid = os.fork()
    if pid == 0:
        os.close(2)  # OpenCV's and libjpeg's warnings about the damage
        try:
            decode_image(open(path, "rb").read(), path)
        except ImageError:
            os._exit(3)
        except BaseException:
            os._exit(4)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        print(index, "signal", os.WTERMSIG(status), flush=True)
    else:
        print(index, {0: "decoded", 3: "refused"}.get(os.WEXITSTATUS(status), "raised"), flush=True)
"""


def _encodings() -> dict[str, list[bytes]]:
    """Each format encoded from two repo samples by Pillow (several variants of the containers)."""
    sources = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.jpg"))[:2]]
    variants = {
        "jpeg": [{"format": "JPEG", "quality": 90}, {"format": "JPEG", "progressive": True}],
        "png": [{"format": "PNG"}],
        "tiff": [{"format": "TIFF"}, {"format": "TIFF", "compression": "tiff_lzw"},
                 {"format": "TIFF", "compression": "jpeg"}],
        "webp": [{"format": "WEBP", "quality": 80}],
        "jpeg2000": [{"format": "JPEG2000", "quality_mode": "rates", "quality_layers": [40]},
                     {"format": "JPEG2000", "no_jp2": True}],
    }
    encoded: dict[str, list[bytes]] = {}
    for fmt, options in variants.items():
        for image in sources:
            for kwargs in options:
                buffer = io.BytesIO()
                image.save(buffer, **kwargs)
                encoded.setdefault(fmt, []).append(buffer.getvalue())
    return encoded


def _mutants(data: bytes, count: int, seed: int) -> list[bytes]:
    """Damaged copies: bytes inverted or overwritten (header and body), or the file cut short."""
    out = []
    for k in range(count):
        rng = np.random.default_rng(seed * 1000 + k)
        damaged = bytearray(data)
        kind = k % 4
        if kind == 0:  # a few inverted bytes past the header (the JPEG 2000 crash of the issue)
            for pos in rng.integers(200, len(damaged), 8):
                damaged[pos] ^= 0xFF
        elif kind == 1:  # random bytes anywhere
            for pos in rng.integers(0, len(damaged), int(rng.integers(1, 12))):
                damaged[pos] = int(rng.integers(0, 256))
        elif kind == 2:  # the header's fields
            for pos in rng.integers(0, min(len(damaged), 400), int(rng.integers(1, 5))):
                damaged[pos] = int(rng.integers(0, 256))
        else:  # truncated
            damaged = damaged[: int(rng.integers(16, len(damaged)))]
        out.append(bytes(damaged))
    return out


def _decode_each_in_a_fork(paths: list[Path]) -> list[str]:
    """ "decoded", "refused" (an ImageError), "raised" (any other exception) or "signal N" per file."""
    proc = subprocess.run([sys.executable, "-c", DECODE_WORKER], input="\n".join(map(str, paths)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcomes = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    return [outcomes[str(i)] for i in range(len(paths))]


def test_damaged_images_of_every_format_never_end_the_process(tmp_path):
    files: list[Path] = []
    formats: list[str] = []
    for fmt, encodings in _encodings().items():
        per_encoding = 64 // len(encodings) + 1
        for e, data in enumerate(encodings):
            for k, damaged in enumerate(_mutants(data, per_encoding, seed=10 * len(files) + e)):
                path = tmp_path / f"{fmt}-{e}-{k}.jpg"  # the name says JPEG whatever the bytes are
                path.write_bytes(damaged)
                files.append(path)
                formats.append(fmt)
    outcomes = _decode_each_in_a_fork(files)
    counts = Counter(f"{fmt} {decoder_for(path.read_bytes())} {outcome}"
                     for fmt, path, outcome in zip(formats, files, outcomes, strict=True))
    print(f"\n{len(files)} damaged files:", json.dumps(dict(sorted(counts.items()))))
    failed = [f"{path.name}: {outcome}" for path, outcome in zip(files, outcomes, strict=True)
              if outcome not in ("decoded", "refused")]
    assert not failed, f"decode_image ended the process or raised something else than ImageError: {failed}"
    assert len(files) >= 300 and set(formats) == {"jpeg", "png", "tiff", "webp", "jpeg2000"}
    assert {"decoded", "refused"} <= set(outcomes)


@pytest.mark.parametrize(("head", "expected"), [
    (b"\xff\xd8\xff\xe0", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"), (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (b"\xff\x4f\xff\x51", "jpeg2000"), (b"GIF89a", "gif"), (b"BM", "bmp"), (b"P6\n", "pnm"), (b"hello", "other"),
])
def test_format_is_told_by_the_bytes_and_jpeg2000_never_reaches_opencv(head, expected):
    data = head + bytes(32)
    assert sniff_format(data) == expected
    assert decoder_for(data) == ("pillow" if expected in ("jpeg2000", "gif", "other") else "opencv")


# Runs the real `facemark` CLI in an interpreter where the train extra's modules cannot be imported, as in an
# install without it (`pip install facemark`).
WITHOUT_TRAIN_EXTRA = r"""
import sys
from importlib.abc import MetaPathFinder

class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "onnx", "onnxscript"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
from facemark.cli import main
sys.argv = ["facemark", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("command", [
    ["train", "--data", str(SAMPLES / "landmarks.xml"), "--epochs", "1"],
    ["export", str(SAMPLES / "missing.pt")],
    ["bench", "--quick"],
    ["evaluate", "--model", "best.pt", "--data", str(SAMPLES / "landmarks.xml")],
])
def test_a_command_of_a_missing_extra_says_how_to_install_it_in_one_line(tmp_path, command):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRAIN_EXTRA, *command], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'facemark[train]'" in lines[0] and "train extra" in lines[0], lines
    assert not any(tmp_path.iterdir())  # nothing written


def _predict(*args: str, limit_bytes: int | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`facemark runtime predict` (the shipped model) in a subprocess; `limit_bytes`: a full disk, simulated
    by the file-size limit (ulimit -f) with SIGXFSZ ignored, so a write fails with EFBIG as on a full disk."""
    def limit() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "facemark", "runtime", "predict", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if limit_bytes is not None else None, **kwargs)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture
def two_photos(tmp_path) -> list[Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    names = sorted(SAMPLES.glob("*.jpg"))[:2]
    for source in names:
        (folder / source.name).write_bytes(source.read_bytes())
    return sorted(folder.iterdir())


def test_out_folder_holding_the_inputs_is_refused_before_any_work_and_inputs_keep_their_bytes(two_photos):
    folder = two_photos[0].parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    proc = _predict(str(folder), "--out-dir", str(folder), "--jsonl", str(folder.parent / "r.jsonl"))
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "--out-dir would write over the input" in line and str(folder) in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not (folder.parent / "r.jsonl").exists(), "refused before any output was opened"


def test_inputs_sharing_a_stem_and_a_rerun_with_other_inputs_never_overwrite_a_picture(tmp_path, two_photos):
    from facemark.runtime.predict.writers import OUTPUTS_MANIFEST

    as_png = tmp_path / "photos" / f"{two_photos[0].stem}.png"
    Image.open(two_photos[0]).save(as_png)
    out, chips = tmp_path / "out", tmp_path / "chips"
    out.mkdir()
    foreign = out / two_photos[1].name  # a file of the user's, not written by facemark, with an output's name
    foreign.write_bytes(b"the user's own file")
    assert _predict(str(two_photos[0]), str(as_png), str(two_photos[1]), "--out-dir", str(out),
                    "--aligned", str(chips), "--json", str(tmp_path / "r.json")).returncode == 0
    first, second = two_photos[0].stem, two_photos[1].stem
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{first}.jpg", f"{first}-1.png", f"{second}.jpg", f"{second}-1.jpg", OUTPUTS_MANIFEST])
    assert foreign.read_bytes() == b"the user's own file"
    chip_stems = {p.name.rsplit("-face", 1)[0] for p in chips.glob("*.png")}
    assert {first, f"{first}-1"} <= chip_stems, "the .jpg and the .png of one stem have their own chips"
    pictures = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".json"}
    # The same inputs again replace their own pictures; another input with a taken name gets a new one.
    other = tmp_path / "other" / two_photos[0].name
    other.parent.mkdir()
    other.write_bytes(two_photos[1].read_bytes())
    assert _predict(str(two_photos[0]), str(other), "--out-dir", str(out), "--json", "-").returncode == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in pictures} == pictures
    assert (out / f"{first}-2.jpg").is_file() and foreign.read_bytes() == b"the user's own file"


def test_out_and_aligned_in_one_folder_is_refused(tmp_path, two_photos):
    proc = _predict(str(two_photos[0]), "--out-dir", str(tmp_path / "o"), "--aligned", str(tmp_path / "o"))
    assert proc.returncode == 2 and "same folder" in _one_error_line(proc)


def test_dash_writes_the_document_to_stdout_and_the_summary_to_stderr(tmp_path, two_photos):
    proc = _predict(*map(str, two_photos), "--json", "-", "--out-dir", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["images"]) == 2 and "2 images" in proc.stderr
    assert not (tmp_path / "-").exists()
    proc = _predict(*map(str, two_photos), "--jsonl", "-", cwd=tmp_path)
    assert [json.loads(line)["path"] for line in proc.stdout.splitlines()] == list(map(str, two_photos))
    proc = _predict(*map(str, two_photos), "--csv", "-", cwd=tmp_path)
    assert proc.stdout.startswith("path,face,box_x") and not (tmp_path / "-").exists()


def test_dev_stdout_and_a_fifo_are_written_directly_not_renamed_over(tmp_path, two_photos):
    import os
    import threading

    proc = _predict(str(two_photos[0]), "--json", "/dev/stdout")  # stdout is a pipe here
    assert proc.returncode == 0 and json.loads(proc.stdout)["images"][0]["path"] == str(two_photos[0])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    proc = _predict(str(two_photos[0]), "--json", str(fifo))
    reader.join(60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(received[0])["complete"] is True and fifo.is_fifo()


def test_a_full_disk_is_one_line_exit_2_and_leaves_no_partial_file(tmp_path, two_photos):
    out, jsonl = tmp_path / "out", tmp_path / "r.jsonl"
    proc = _predict(*map(str, two_photos), "--out-dir", str(out), "--jsonl", str(jsonl), "--workers", "1",
                    limit_bytes=30_000)  # the annotated photos are larger
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert str(out) in line and "File too large" in line
    assert [p.name for p in out.iterdir()] == ["facemark-outputs.json"], "no partial or temporary picture"
    assert all(json.loads(text) for text in jsonl.read_text().splitlines()), "only whole lines"


def test_a_full_disk_under_a_video_fails_the_command(tmp_path):
    import cv2

    clip = tmp_path / "clip.mp4"
    frame = cv2.imread(str(sorted(SAMPLES.glob("*.jpg"))[0]))
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (frame.shape[1], frame.shape[0]))
    for _ in range(8):
        writer.write(frame)
    writer.release()
    out = tmp_path / "out" / "annotated.mp4"

    def limit() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run([sys.executable, "-m", "facemark", "runtime", "video", str(clip), "--output", str(out),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(out) in _one_error_line(proc) and not any(out.parent.iterdir())


def test_resume_refuses_lines_of_other_settings_unless_forced(tmp_path, two_photos):
    jsonl = tmp_path / "r.jsonl"
    assert _predict(str(two_photos[0]), "--jsonl", str(jsonl)).returncode == 0
    proc = _predict(*map(str, two_photos), "--jsonl", str(jsonl), "--resume", "--min-face", "0.2")
    assert proc.returncode == 2
    assert "detector min_face_fraction: 0.08 (now 0.2)" in _one_error_line(proc) and "--force" in proc.stderr
    assert len(jsonl.read_text().splitlines()) == 1, "nothing appended"
    proc = _predict(*map(str, two_photos), "--jsonl", str(jsonl), "--resume", "--min-face", "0.2", "--force")
    assert proc.returncode == 0 and len(jsonl.read_text().splitlines()) == 2


def test_resume_compares_resolved_paths_and_redoes_error_and_damaged_lines(tmp_path, two_photos):
    folder = two_photos[0].parent
    broken = folder / "zz-later-fixed.jpg"
    broken.write_bytes(b"\xff\xd8\xff not yet a photo")
    jsonl = tmp_path / "r.jsonl"
    relative = [str(p.relative_to(tmp_path)) for p in (*two_photos, broken)]
    assert _predict(*relative, "--jsonl", str(jsonl), cwd=tmp_path).returncode == 1
    lines = jsonl.read_text().splitlines()
    assert json.loads(lines[2])["error"]
    broken.write_bytes(two_photos[0].read_bytes())  # fixed since
    jsonl.write_text("{\"path\": \"damag\n" + lines[1] + "\n" + lines[2] + "\n")  # the first line damaged
    proc = _predict(*map(str, (*two_photos, broken)), "--jsonl", str(jsonl), "--resume")  # absolute paths
    assert proc.returncode == 0, proc.stderr
    assert "1 of 3 inputs already" in proc.stderr
    entries = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(entries) == 3 and not any(e["error"] for e in entries)
    assert entries[0]["path"] == relative[1], "the good line is kept as it was"
    assert sorted(e["path"] for e in entries[1:]) == sorted(map(str, (two_photos[0], broken)))


def test_control_characters_in_a_file_name_are_printed_escaped(tmp_path):
    bad = tmp_path / "evil\x1b[31m\nname.jpg"
    bad.write_bytes(b"not an image")
    proc = _predict(str(bad), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "evil\\x1b[31m\\nname.jpg" in line and "\x1b" not in proc.stderr


def test_a_face_whose_outer_eye_corners_coincide_is_reported_and_skipped_by_evaluate(tmp_path):
    import cv2

    from facemark.data import read_pts_folder
    from facemark.scheme import OUTER_EYE_CORNERS

    source = sorted(SAMPLES.glob("*.jpg"))[0]
    height, width = cv2.imread(str(source)).shape[:2]
    angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    points = np.stack([width / 2 + 60 * np.cos(angles), height / 2 + 60 * np.sin(angles)], axis=1)
    for name, corners_apart in (("good", True), ("degenerate", False)):
        (tmp_path / f"{name}.jpg").write_bytes(source.read_bytes())
        face = points.copy()
        if not corners_apart:
            face[OUTER_EYE_CORNERS[1]] = face[OUTER_EYE_CORNERS[0]]
        body = "\n".join(f"{x + 1} {y + 1}" for x, y in face)
        (tmp_path / f"{name}.pts").write_text(f"version: 1\nn_points: 68\n{{\n{body}\n}}")
    warnings: list[str] = []
    assert [r.image_path.name for r in read_pts_folder(tmp_path, warnings.append)] == ["good.jpg"]
    assert len(warnings) == 1 and "degenerate.pts" in warnings[0] and "outer eye corners" in warnings[0]
    proc = subprocess.run([sys.executable, "-m", "facemark", "evaluate", "--model",
                           str(SAMPLES.parent / "facemark-68.onnx"), "--data", str(tmp_path), "--split", "all",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "degenerate.pts" in proc.stdout and "1 faces" in proc.stdout
    nme = float(proc.stdout.split("): NME ")[1].split("%")[0])
    assert nme < 1000, "the NME of one plain face, not divided by a zero distance"


def test_two_training_runs_started_with_one_out_claim_different_folders(tmp_path):
    pytest.importorskip("torch")
    from facemark.train.loop import next_free_folder

    first, second = next_free_folder(tmp_path / "run"), next_free_folder(tmp_path / "run")
    assert first == tmp_path / "run" and second == tmp_path / "run-2"
