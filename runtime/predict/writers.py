"""What `runtime predict` writes: the JSON document, JSONL lines, CSV, annotated pictures and aligned chips.

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
from (the calibrated detector box, refined), "detector_box" the raw detector box, "score" the face presence in
[0, 1] (models with a presence head), "detector_score" the detector's confidence, "landmark_scores" the
per-point confidence (pip head). A bad file gets "error" (one line naming it) and an empty face list; no
face is an empty list, not an error. JSON never holds NaN.

JSONL (`--jsonl`): exactly one `images[]` entry per line, in input order, written and flushed as soon as that
input is done, so a killed run loses at most the line being written. Each line also holds "run": the model's
sha256 and the settings that change results. `--resume` keeps the complete lines of the same run, drops damaged
lines (anywhere) and lines with an error, and processes only the inputs without a kept line (paths compared
resolved); lines of another model or other settings are refused (`force` mixes them).

Pictures (--out-dir, --aligned): each input gets an output stem unique in its folder and stable across runs, kept
in the folder's OUTPUTS_MANIFEST: a rerun or a resumed run replaces only what it wrote for the same input, a
file it did not write is never replaced, and a folder where an output would replace an input is refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from facemark.drawing import DrawMode, draw_face
from facemark.errors import FacemarkError, ImageError
from facemark.fileio import (
    check_writable_folder,
    file_sha256,
    is_stdout,
    is_stream,
    write_error,
    write_output_text,
    write_text_atomic,
)
from facemark.geometry import ARCFACE_SIZE, Template
from facemark.imageio import write_image
from facemark.outputs import name_of, path_bytes, utf8_text
from facemark.runtime.landmarker import Face
from facemark.runtime.predict.inputs import ImageResult
from facemark.scheme import NUM_POINTS

WRITABLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ChipOptions:
    """--aligned: one similarity-aligned chip per face (facemark.geometry), PNG, in `folder`."""

    folder: Path
    size: int = ARCFACE_SIZE
    template: Template = "arcface"


class Describable(Protocol):
    def describe(self) -> dict: ...  # {"model": {...}, "detector": {...}}: the document's header


OUTPUTS_MANIFEST = "facemark-outputs.json"  # in each --out-dir / --aligned folder: {resolved input: output stem}


_CHIP_STEM = re.compile(r"^(.*)-face\d+$", re.IGNORECASE)
_FRAME_STEM = re.compile(r"^(.*)-frame\d+$", re.IGNORECASE)  # a video's chips: STEM-frameN-faceI.png


def annotated_suffix(path: Path) -> str:
    """The annotated picture keeps its input's format when it is a writable one, else PNG."""
    return path.suffix.lower() if path.suffix.lower() in WRITABLE_SUFFIXES else ".png"


def chip_name(stem: str, index: int) -> str:
    return f"{stem}-face{index}.png"


@dataclass(frozen=True)
class OutputFolder:
    """A folder predict writes pictures into: annotated (STEM.ext) or aligned chips (STEM-faceN.png)."""

    path: Path
    option: str  # "--out-dir" or "--aligned"

    @property
    def chips(self) -> bool:
        return self.option == "--aligned"

    def stem_of(self, name: str) -> str:
        """The output stem a file name of this folder uses (lower case: file systems may ignore case)."""
        stem = Path(name).stem
        match = _CHIP_STEM.match(stem) if self.chips else None
        return (match.group(1) if match else stem).lower()

    def manifest(self) -> dict[str, str]:
        try:
            claims = json.loads((self.path / OUTPUTS_MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in claims.items()} if isinstance(claims, dict) else {}

    def check_no_input_replaced(self, files: Sequence[Path], resolved: set[str]) -> None:
        """Refuse (one line, before any work) a folder where an input's output would replace an input."""
        for path in files:
            if self.chips:
                hit = Path(path).parent.resolve() == self.path.resolve() and _CHIP_STEM.match(path.stem)
            else:
                hit = os.path.realpath(self.path / f"{path.stem}{annotated_suffix(path)}") in resolved
            if hit:
                raise FacemarkError(f"{self.path}: {self.option} would write over the input {path}; "
                                    "give a folder that holds no inputs")


def claim_output_stems(files: Sequence[Path], folders: Sequence[OutputFolder], per_frame: bool = False
                       ) -> dict[str, str]:
    """The output stem of each input (by str(path)) in these folders, saved in each folder's manifest before any
    picture is written. An input named in a manifest keeps its stem (a rerun or --resume replaces only what it
    wrote for that input); a new one gets its own stem, or stem-1, stem-2, ... when a file in the folders (one
    that facemark did not write for it) or another input of the run uses that one. Raises FacemarkError for a
    folder that cannot be written, that is another option's folder too, or where an output would be an input.
    `per_frame`: the names will be STEM-frameN-... (runtime video's chips), so a name STEM-frameN takes STEM too."""
    if not folders:
        return {}
    if len({os.path.realpath(f.path) for f in folders}) < len(folders):
        raise FacemarkError(f"{folders[0].path}: --out-dir and --aligned name the same folder; give each its own")
    resolved = {str(p): os.path.realpath(p) for p in files}
    for folder in folders:
        check_writable_folder(folder.path, f"{folder.option} folder")
        folder.check_no_input_replaced(files, set(resolved.values()))
    claims = [folder.manifest() for folder in folders]
    mine = {real: stem for claim in claims for real, stem in claim.items()}
    taken = {stem.lower() for stem in mine.values()}
    for folder in folders:
        taken |= {folder.stem_of(name) for name in os.listdir(folder.path) if name != OUTPUTS_MANIFEST}
    if per_frame:
        taken |= {match.group(1) for stem in list(taken) if (match := _FRAME_STEM.match(stem))}
    stems: dict[str, str] = {}
    for path in dict.fromkeys(files):  # a file listed twice is one input
        stem = mine.get(resolved[str(path)])
        if stem is None:
            stem, index = Path(path).stem, 1
            while stem.lower() in taken:
                stem, index = f"{Path(path).stem}-{index}", index + 1
        taken.add(stem.lower())
        stems[str(path)] = stem
    for folder, claim in zip(folders, claims, strict=True):
        claim.update({resolved[key]: stem for key, stem in stems.items()})
        write_text_atomic(folder.path / OUTPUTS_MANIFEST, json.dumps(claim, indent=0, sort_keys=True) + "\n")
    return stems


def output_folders(out_dir: str | os.PathLike | None, chips: ChipOptions | None) -> list[OutputFolder]:
    return ([OutputFolder(Path(out_dir), "--out-dir")] if out_dir is not None else []) + \
        ([OutputFolder(Path(chips.folder), "--aligned")] if chips is not None else [])


def write_outputs(result: ImageResult, image: np.ndarray, target: Path | None, draw: DrawMode,
                   chips: ChipOptions | None, chip_stem: str) -> ImageResult:
    """The annotated picture (`target`) and the aligned chips of one image. A picture that cannot be encoded is
    this image's error; a failed write (disk full, ...) raises WriteError: it ends the run."""
    if target is not None:
        canvas = image.copy()
        for face in result.faces:
            draw_face(canvas, face.landmarks, face.box, draw)
        try:
            write_image(target, canvas)
            result.output = str(target)
        except ImageError as exc:
            result.error = f"{target}: cannot write the annotated image ({exc})"
    if chips is not None:
        for index, face in enumerate(result.faces):
            chip_path = chips.folder / chip_name(chip_stem, index)
            try:
                write_image(chip_path, face.aligned(image, chips.size, chips.template))
                result.chips.append(str(chip_path))
            except ImageError as exc:
                result.error = f"{chip_path}: cannot write the aligned face ({exc})"
    return result


def build_document(landmarker: Describable, results: Sequence[ImageResult | dict], complete: bool = True
                   ) -> dict:
    """The JSON document; `results` may mix ImageResults and `images[]` entries read back from a JSONL file."""
    images = [r if isinstance(r, dict) else r.to_json() for r in results]
    return {**landmarker.describe(), "complete": complete, "images": images}


def face_csv_columns(pose: bool) -> list[str]:
    """The columns of one face in a CSV row (predict's --csv, video's --csv): box, score, points, pose."""
    points = [f"{axis}{i}" for i in range(NUM_POINTS) for axis in ("x", "y")]
    return ["box_x", "box_y", "box_w", "box_h", "score", *points, *(("yaw", "pitch", "roll") if pose else ())]


def face_csv_cells(face: Face, pose: bool) -> list:
    """The cells of face_csv_columns for `face`."""
    cells = [*(round(float(v), 2) for v in face.box), "" if face.score is None else round(face.score, 4),
             *(round(float(v), 2) for v in np.asarray(face.landmarks).reshape(-1))]
    return cells + ([round(v, 2) for v in face.pose] if pose else [])


def csv_header(pose: bool) -> list[str]:
    """Columns of --csv: one row per face."""
    return ["path", "face", *face_csv_columns(pose), "path_bytes"]


def csv_rows(results: Sequence[ImageResult], pose: bool) -> list[list]:
    """One row per face of every result (images without a face or with an error have no row)."""
    return [[utf8_text(result.path), index, *face_csv_cells(face, pose), path_bytes(result.path) or ""]
            for result in results for index, face in enumerate(result.faces)]


def write_csv(path: str | os.PathLike, results: Sequence[ImageResult], pose: bool = False) -> None:
    """--csv: the faces of `results` as CSV, written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header(pose))
    writer.writerows(csv_rows(results, pose))
    write_output_text(path, buffer.getvalue())


def dumps(document: dict, indent: int | None = None) -> str:
    """JSON text with NaN/Infinity forbidden (they are not JSON): a ValueError instead of an invalid file."""
    return json.dumps(document, indent=indent, allow_nan=False)


def run_identity(header: dict, settings: Mapping[str, object]) -> dict:
    """What a JSONL line records of its run: the model's sha256 (of the file here; a server's header names its
    own), every setting that changes a result (the detector's, the landmark pipeline's -- written as the line's
    top-level `pipeline` -- then `settings`) and the folder relative input paths were given from (so --resume
    from elsewhere still knows the files)."""
    model = header["model"]
    path = model.get("path")
    sha = model.get("sha256") or (file_sha256(path) if path and Path(path).is_file() else model.get("source_sha256"))
    return {"model_sha256": sha, "detector": header["detector"], "pipeline": header.get("pipeline"), **settings,
            "cwd": os.getcwd()}


def _first_difference(theirs: object, ours: dict) -> str | None:
    """`name: theirs (now ours)` for the first setting that differs, None when equal."""
    if not isinstance(theirs, dict):
        return "run settings: none recorded (a line of an older facemark)"
    flat_theirs, flat_ours = ({**d, **{f"{group} {k}": v for group in ("detector", "pipeline")
                                        for k, v in (d.get(group) or {}).items()}} for d in (theirs, ours))
    for key in sorted(set(flat_theirs) | set(flat_ours)):
        if key not in ("detector", "pipeline", "cwd") and flat_theirs.get(key) != flat_ours.get(key):
            return f"{key}: {flat_theirs.get(key)!r} (now {flat_ours.get(key)!r})"
    return None


def read_jsonl_entries(path: str | os.PathLike, run: dict | None = None, force: bool = False) -> dict[str, dict]:
    """The entries of a JSONL file to keep on --resume, by resolved path (the "run" field removed).

    A damaged line (cut short by a killed run, not JSON, not an entry) and a line with an error are dropped
    wherever they are, and the file is rewritten (atomically) without them, so their inputs are redone and
    appending continues on a clean line boundary. With `run`, a line of another model or other settings raises
    FacemarkError naming the difference, unless `force`."""
    target = Path(path)
    if not target.is_file():
        return {}
    data = target.read_bytes()
    entries: dict[str, dict] = {}
    kept: list[bytes] = []
    for line in data.splitlines(keepends=True):
        try:
            entry = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or entry.get("error"):
            continue
        if isinstance(entry.get("run"), dict):  # the line's own pipeline belongs to its run
            entry["run"]["pipeline"] = entry.pop("pipeline", None)
        if run is not None and not force:
            difference = _first_difference(entry.get("run"), run)
            if difference is not None:
                raise FacemarkError(f"{target}: --resume with other settings than its lines ({difference}); "
                                    "use the same ones, another --jsonl, or --force to mix them")
        recorded = entry.pop("run", None)
        given_in = str(recorded.get("cwd") or "") if isinstance(recorded, dict) else ""
        name = name_of(entry["path"], entry.get("path_bytes") if isinstance(entry.get("path_bytes"), str) else None)
        entries[os.path.realpath(os.path.join(given_in, name))] = entry
        kept.append(line)
    if sum(map(len, kept)) < len(data):
        write_text_atomic(target, b"".join(kept).decode("utf-8"))
    return entries


def jsonl_line(entry: dict, run: dict | None) -> str:
    """One --jsonl line: an `images[]` entry and, when given, its run's settings as the document header has them
    (pipeline on top, then the run)."""
    if run is not None:
        entry = {**entry, "pipeline": run.get("pipeline"), "run": {k: v for k, v in run.items() if k != "pipeline"}}
    return dumps(entry) + "\n"


class JsonlWriter:
    """Appends one `images[]` entry (with `run`, when given) per line and flushes it to disk at once. `-` is
    standard output; a pipe or FIFO is written as it is. A failed write is undone to the last whole line and
    raises WriteError."""

    def __init__(self, path: str | os.PathLike, append: bool, run: dict | None = None) -> None:
        self.path = Path(path)
        self.run = run
        try:
            if is_stdout(path):
                self._fd = os.dup(1)
            else:
                if not is_stream(path):
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
                self._fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            raise write_error(path, exc, "--jsonl file") from None
        self._regular = not is_stdout(path) and not is_stream(path)

    def write(self, result: ImageResult) -> None:
        data = jsonl_line(result.to_json(), self.run).encode("utf-8")
        start = os.lseek(self._fd, 0, os.SEEK_END) if self._regular else None
        try:
            while data:  # unbuffered: nothing is left to be written later, after a failure
                data = data[os.write(self._fd, data):]
            if self._regular:
                os.fsync(self._fd)
        except OSError as exc:
            if start is not None:
                self._undo(start)
            raise write_error(self.path, exc, "--jsonl file") from None

    def _undo(self, end: int) -> None:
        """Cut a half-written line: what stays is whole lines only."""
        try:
            os.ftruncate(self._fd, end)
        except OSError:
            pass

    def close(self) -> None:
        os.close(self._fd)
