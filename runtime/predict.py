"""Batch prediction over image files: input listing, per-file results, annotated pictures, JSON and JSONL.

JSON schema (one document per run):
{"model": {...ModelInfo.summary(), "path": str | null, "providers": [str]},
 "detector": {...HaarDetector.config()},
 "complete": bool,  (false when the run was interrupted: the images finished so far)
 "images": [{"path": str, "width": int | null, "height": int | null,
             "faces": [{"box": [x, y, w, h], "landmarks": [[x, y] x 68], "score": float | null,
                        "detector_score": float | null, "detector_box": [x, y, w, h] | null,
                        "landmark_scores": [float x 68] | null}],
             "error": null | str}]}
Coordinates are 0-based image pixels (pixel centres at integers); "box" is the box the last crop was made
from (the calibrated detector box, refined), "detector_box" the raw Haar box, "score" the face presence in
[0, 1] (models with a presence head), "detector_score" the cascade's level weight, "landmark_scores" the
per-point confidence (pip head). A bad file gets "error" (one line naming it) and an empty face list; no
face is an empty list, not an error. JSON never holds NaN.

JSONL (`--jsonl`): exactly one `images[]` entry per line, in input order, written and flushed as soon as that
input is done, so a killed run loses at most the line being written; `--resume` keeps the complete lines,
drops a truncated last one and processes only the inputs without a line.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from imutils.paths import list_files

from facemark.drawing import DrawMode, draw_face
from facemark.errors import FacemarkError
from facemark.imageio import IMAGE_SUFFIXES, read_image, write_image
from facemark.runtime.landmarker import Face, FaceLandmarker

WRITABLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
GLOB_CHARS = set("*?[")


@dataclass
class ImageResult:
    path: str
    width: int | None = None
    height: int | None = None
    faces: list[Face] = field(default_factory=list)
    error: str | None = None
    ms: float = 0.0
    output: str | None = None  # the annotated picture, when written

    def to_json(self) -> dict:
        return {"path": self.path, "width": self.width, "height": self.height,
                "faces": [f.to_json() for f in self.faces], "error": self.error}


def find_images(folder: str) -> list[str]:
    """Image files below `folder` (recursive), by the one extension list of facemark.imageio, any case."""
    return [p for p in list_files(folder) if Path(p).suffix.lower() in IMAGE_SUFFIXES]


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[ImageResult]]:
    """Files as given, folders searched recursively for images, globs expanded (recursive `**`).

    Returns the files in order (each once) and an error result for each input that yields nothing."""
    files: list[Path] = []
    failures: list[ImageResult] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.normpath(path)
        if key not in seen:
            seen.add(key)
            files.append(path)

    for raw in inputs:
        text = str(raw)
        path = Path(text)
        if path.is_dir():
            found = sorted(find_images(text))
            if not found:
                failures.append(ImageResult(text, error=f"{text}: no image files in this folder"))
            for item in found:
                add(Path(item))
        elif path.exists():
            add(path)
        elif GLOB_CHARS & set(text):
            matches = sorted(m for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                failures.append(ImageResult(text, error=f"{text}: no file matches this pattern"))
            for item in matches:
                add(Path(item))
        else:
            failures.append(ImageResult(text, error=f"{text}: no such file or folder"))
    return files, failures


def predict_image(landmarker: FaceLandmarker, path: Path) -> tuple[ImageResult, np.ndarray | None]:
    """One file -> its result (with the error message when it cannot be read) and the decoded image."""
    start = time.perf_counter()
    try:
        image = read_image(path)
    except FacemarkError as exc:
        return ImageResult(str(path), error=str(exc)), None
    found = landmarker.detect_full(image)
    result = ImageResult(str(path), image.shape[1], image.shape[0], found.faces,
                         error=f"{path}: " + "; ".join(found.problems) if found.problems else None,
                         ms=(time.perf_counter() - start) * 1000.0)
    return result, image


def annotated_name(path: Path, taken: set[str]) -> str:
    """Output file name for an input: its own name (a writable format) made unique within the run."""
    suffix = path.suffix.lower() if path.suffix.lower() in WRITABLE_SUFFIXES else ".png"
    name, index = f"{path.stem}{suffix}", 1
    while name in taken:
        name, index = f"{path.stem}-{index}{suffix}", index + 1
    taken.add(name)
    return name


def predict_files(
    landmarker: FaceLandmarker,
    files: Sequence[Path],
    out_dir: str | os.PathLike | None = None,
    draw: DrawMode = "points",
    on_result: Callable[[ImageResult], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> list[ImageResult]:
    """Predict every file in order; a bad file becomes an error result and the batch goes on. Stops before
    the next file once `stop_requested()` is true (the results so far are returned)."""
    taken: set[str] = set()
    results = []
    for path in files:
        if stop_requested():
            break
        result, image = predict_image(landmarker, path)
        if image is not None and out_dir is not None:
            canvas = image.copy()
            for face in result.faces:
                draw_face(canvas, face.landmarks, face.box, draw)
            target = Path(out_dir) / annotated_name(path, taken)
            try:
                write_image(target, canvas)
                result.output = str(target)
            except (FacemarkError, OSError) as exc:
                result.error = f"{target}: cannot write the annotated image ({exc})"
        results.append(result)
        if on_result:
            on_result(result)
    return results


def build_document(landmarker: FaceLandmarker, results: Sequence[ImageResult | dict], complete: bool = True
                   ) -> dict:
    """The JSON document; `results` may mix ImageResults and `images[]` entries read back from a JSONL file."""
    path = landmarker.model.path
    model = {**landmarker.info.summary(), "path": None if path is None else str(path),
             "providers": list(landmarker.providers)}
    images = [r if isinstance(r, dict) else r.to_json() for r in results]
    return {"model": model, "detector": landmarker.detector.config(), "complete": complete, "images": images}


def dumps(document: dict, indent: int | None = None) -> str:
    """JSON text with NaN/Infinity forbidden (they are not JSON): a ValueError instead of an invalid file."""
    return json.dumps(document, indent=indent, allow_nan=False)


def read_jsonl_entries(path: str | os.PathLike) -> dict[str, dict]:
    """The complete `images[]` entries of a JSONL file, by path. A last line cut short by a killed run (no
    newline, or not valid JSON) is removed from the file, so appending continues on a clean line boundary."""
    target = Path(path)
    if not target.is_file():
        return {}
    data = target.read_bytes()
    entries: dict[str, dict] = {}
    good_end = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            entry = json.loads(line)
        except ValueError:
            break
        if not isinstance(entry, dict) or "path" not in entry:
            break
        entries[str(entry["path"])] = entry
        good_end += len(line)
    if good_end < len(data):
        with open(target, "r+b") as f:
            f.truncate(good_end)
    return entries


class JsonlWriter:
    """Appends one `images[]` entry per line and flushes it to disk at once."""

    def __init__(self, path: str | os.PathLike, append: bool) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, result: ImageResult) -> None:
        self._file.write(dumps(result.to_json()) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
