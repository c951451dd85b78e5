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
