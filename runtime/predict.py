"""Batch prediction over image files: input listing, per-file results, annotated pictures, JSON and JSONL.

JSON document (one per run; the JSON Schema, the one source of truth, is facemark.runtime.schema: `facemark schema`):
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

import csv
import glob
import io
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from imutils.paths import list_files

from facemark.drawing import DrawMode, draw_face
from facemark.errors import FacemarkError
from facemark.fileio import write_text_atomic
from facemark.geometry import ARCFACE_SIZE, Template
from facemark.imageio import IMAGE_SUFFIXES, read_image, write_image
from facemark.runtime.landmarker import Detections, Face, FaceLandmarker, Found, default_workers
from facemark.scheme import NUM_POINTS

WRITABLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
GLOB_CHARS = set("*?[")
PIPELINE_GROUP = 8  # files whose faces share one landmark-model call in a pipelined run


@dataclass
class ImageResult:
    path: str
    width: int | None = None
    height: int | None = None
    faces: list[Face] = field(default_factory=list)
    error: str | None = None
    ms: float = 0.0
    output: str | None = None  # the annotated picture, when written
    with_pose: bool = False  # faces carry "pose" in JSON (--pose)
    chips: list[str] = field(default_factory=list)  # aligned face chips written (--aligned)

    def to_json(self) -> dict:
        return {"path": self.path, "width": self.width, "height": self.height,
                "faces": [f.to_json(self.with_pose) for f in self.faces], "error": self.error}


@dataclass(frozen=True)
class ChipOptions:
    """--aligned: one similarity-aligned chip per face (facemark.geometry), PNG, in `folder`."""

    folder: Path
    size: int = ARCFACE_SIZE
    template: Template = "arcface"


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


@dataclass
class LoadedFile:
    """A file after decoding and Haar (or its error), waiting for the landmark model."""

    result: ImageResult
    image: np.ndarray | None = None
    found: Found | None = None  # local detection, waiting for the landmark model
    done: Detections | None = None  # faces already complete (a server made them: facemark.runtime.remote)
    seconds: float = 0.0  # decode + detect


def _load_and_find(landmarker: FaceLandmarker, path: Path) -> LoadedFile:
    start = time.perf_counter()
    try:
        image = read_image(path)
    except FacemarkError as exc:
        return LoadedFile(ImageResult(str(path), error=str(exc)))
    found = landmarker.find(image)
    return LoadedFile(ImageResult(str(path), image.shape[1], image.shape[0]), image, found,
                   time.perf_counter() - start)


def _landmarks_of(landmarker: FaceLandmarker, group: Sequence[LoadedFile]) -> list[Detections | None]:
    """The landmark model once per pass over the faces of every readable file of `group` (None: unreadable)."""
    done = iter(landmarker.landmarks_for_found([item.found for item in group if item.found is not None]))
    return [next(done) if item.found is not None else None for item in group]


class Describable(Protocol):
    def describe(self) -> dict: ...  # {"model": {...}, "detector": {...}}: the document's header


class FileSteps(Protocol):
    """The two steps predict_files runs: `load` a file on a worker thread (decode, and detect or send it to a
    server), then `landmarks` once for a group of loaded files (None for an unreadable one)."""

    def load(self, path: Path) -> LoadedFile: ...

    def landmarks(self, group: Sequence[LoadedFile]) -> list[Detections | None]: ...


@dataclass(frozen=True)
class LocalSteps:
    """In this process: Haar on the worker threads, the landmark model batched over the group."""

    landmarker: FaceLandmarker

    def load(self, path: Path) -> LoadedFile:
        return _load_and_find(self.landmarker, path)

    def landmarks(self, group: Sequence[LoadedFile]) -> list[Detections | None]:
        return _landmarks_of(self.landmarker, group)


def _resolved(item: Future | ImageResult) -> ImageResult:
    return item.result() if isinstance(item, Future) else item


def _with_landmarks(loaded: LoadedFile, found: Detections) -> ImageResult:
    result = loaded.result
    result.faces = found.faces
    result.error = f"{result.path}: " + "; ".join(found.problems) if found.problems else None
    result.ms = loaded.seconds * 1000.0 + found.times["landmarks"]
    return result


def annotated_name(path: Path, taken: set[str]) -> str:
    """Output file name for an input: its own name (a writable format) made unique within the run."""
    suffix = path.suffix.lower() if path.suffix.lower() in WRITABLE_SUFFIXES else ".png"
    name, index = f"{path.stem}{suffix}", 1
    while name in taken:
        name, index = f"{path.stem}-{index}{suffix}", index + 1
    taken.add(name)
    return name


def _write_outputs(result: ImageResult, image: np.ndarray, target: Path | None, draw: DrawMode,
                   chips: ChipOptions | None, chip_stem: str) -> ImageResult:
    """The annotated picture (`target`) and the aligned chips of one image; a failed write is its error."""
    if target is not None:
        canvas = image.copy()
        for face in result.faces:
            draw_face(canvas, face.landmarks, face.box, draw)
        try:
            write_image(target, canvas)
            result.output = str(target)
        except (FacemarkError, OSError) as exc:
            result.error = f"{target}: cannot write the annotated image ({exc})"
    if chips is not None:
        for index, face in enumerate(result.faces):
            chip_path = chips.folder / f"{chip_stem}-face{index}.png"
            try:
                write_image(chip_path, face.aligned(image, chips.size, chips.template))
                result.chips.append(str(chip_path))
            except (FacemarkError, OSError) as exc:
                result.error = f"{chip_path}: cannot write the aligned face ({exc})"
    return result


def predict_files(
    landmarker: FaceLandmarker | FileSteps,
    files: Sequence[Path],
    out_dir: str | os.PathLike | None = None,
    draw: DrawMode = "points",
    on_result: Callable[[ImageResult], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    workers: int | None = None,
    chips: ChipOptions | None = None,
    pose: bool = False,
) -> list[ImageResult]:
    """Predict every file; results (and `on_result` calls) in input order. A bad file becomes an error result
    and the batch goes on. Stops before the next file once `stop_requested()` is true (the results so far
    are returned).

    workers: 1 processes one file after another; more (default: one per core) pipelines the run: decoding,
    Haar and writing annotated images of the next files run on that many threads while the landmark model
    runs once per pass over the faces of a group of files. The landmarks equal one-by-one processing.
    chips: also write each face's aligned chip. pose: the results' JSON carries each face's head pose.
    `landmarker` may also be other FileSteps (facemark.runtime.remote: a Triton server does the work)."""
    steps = LocalSteps(landmarker) if isinstance(landmarker, FaceLandmarker) else landmarker
    count = workers or default_workers()
    taken: set[str] = set()
    results: list[ImageResult] = []

    def finish(loaded: LoadedFile, found: Detections | None, pool: ThreadPoolExecutor | None) -> Future | ImageResult:
        result = loaded.result if found is None else _with_landmarks(loaded, found)
        result.with_pose = pose
        if loaded.image is None or (out_dir is None and chips is None):
            return result
        name = annotated_name(Path(result.path), taken)  # unique within the run: also names the chips
        target = None if out_dir is None else Path(out_dir) / name
        job = (result, loaded.image, target, draw, chips, Path(name).stem)
        return _write_outputs(*job) if pool is None else pool.submit(_write_outputs, *job)

    def deliver(result: ImageResult) -> None:
        results.append(result)
        if on_result:
            on_result(result)

    if count <= 1:
        for path in files:
            if stop_requested():
                break
            loaded = steps.load(path)
            deliver(finish(loaded, steps.landmarks([loaded])[0], None))  # type: ignore[arg-type]
        return results

    group = max(count, PIPELINE_GROUP)
    with ThreadPoolExecutor(count, thread_name_prefix="facemark-predict") as pool:
        queued: deque[Future] = deque()
        upcoming = iter(files)

        def refill() -> None:  # keep the workers two groups ahead of the model
            while len(queued) < 2 * group and not stop_requested():
                path = next(upcoming, None)
                if path is None:
                    return
                queued.append(pool.submit(steps.load, path))

        refill()
        writing: list[Future | ImageResult] = []  # the previous group, its pictures being written
        while queued:
            loaded = [queued.popleft().result() for _ in range(min(group, len(queued)))]
            refill()
            finished = [finish(item, found, pool)
                        for item, found in zip(loaded, steps.landmarks(loaded), strict=True)]
            for item in writing:
                deliver(_resolved(item))
            writing = finished
            if stop_requested():
                for future in queued:
                    future.cancel()
                break
        for item in writing:
            deliver(_resolved(item))
    return results


def build_document(landmarker: Describable, results: Sequence[ImageResult | dict], complete: bool = True
                   ) -> dict:
    """The JSON document; `results` may mix ImageResults and `images[]` entries read back from a JSONL file."""
    images = [r if isinstance(r, dict) else r.to_json() for r in results]
    return {**landmarker.describe(), "complete": complete, "images": images}


def csv_header(pose: bool) -> list[str]:
    """Columns of --csv: one row per face."""
    points = [f"{axis}{i}" for i in range(NUM_POINTS) for axis in ("x", "y")]
    return ["path", "face", "box_x", "box_y", "box_w", "box_h", "score", *points,
            *(("yaw", "pitch", "roll") if pose else ())]


def csv_rows(results: Sequence[ImageResult], pose: bool) -> list[list]:
    """One row per face of every result (images without a face or with an error have no row)."""
    rows = []
    for result in results:
        for index, face in enumerate(result.faces):
            row = [result.path, index, *(round(float(v), 2) for v in face.box),
                   "" if face.score is None else round(face.score, 4),
                   *(round(float(v), 2) for v in np.asarray(face.landmarks).reshape(-1))]
            if pose:
                row += [round(v, 2) for v in face.pose]
            rows.append(row)
    return rows


def write_csv(path: str | os.PathLike, results: Sequence[ImageResult], pose: bool = False) -> None:
    """--csv: the faces of `results` as CSV, written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header(pose))
    writer.writerows(csv_rows(results, pose))
    write_text_atomic(path, buffer.getvalue())


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
