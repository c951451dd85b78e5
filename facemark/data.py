"""Readers for the two real annotation formats (torch-free): 300-W folders (.pts) and dlib's XML.

Both give `FaceRecord`s: one face, its image path and 68 points in 0-based image pixels.
"""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facemark.contract import Box, box_from_landmarks
from facemark.errors import DataError, ImageError
from facemark.imageio import IMAGE_SUFFIXES, probe_size
from facemark.scheme import NUM_POINTS, interocular_distance

Warn = Callable[[str], None]


@dataclass(frozen=True)
class FaceRecord:
    image_path: Path
    landmarks: np.ndarray = field(repr=False)  # (68, 2) float32, 0-based image pixels
    key: str  # identity for the split: image file name + face index (independent of the data root)
    source_box: Box | None = None  # a box given by the annotation (dlib XML), if any


def read_pts(path: str | os.PathLike) -> np.ndarray:
    """Read an iBUG .pts file -> (68, 2) float32 in 0-based pixels (.pts files are 1-based)."""
    p = Path(path)
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="strict").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: cannot read ({exc})") from None
    lines = [ln for ln in lines if ln]
    declared: int | None = None
    if lines and lines[0].lower().startswith("version"):
        try:
            header = dict(ln.split(":", 1) for ln in lines[:2])
            declared = int(header["n_points"].strip())
            start, end = lines.index("{"), lines.index("}")
        except (ValueError, KeyError):
            raise DataError(f"{p}: malformed .pts header (expected version, n_points, '{{' ... '}}')") from None
        body = lines[start + 1 : end]
    else:  # bare "x y" lines, as some 300-W mirrors ship them
        body = lines
    try:
        points = np.array([[float(v) for v in ln.split()] for ln in body], dtype=np.float64)
    except ValueError:
        raise DataError(f"{p}: non-numeric coordinate line") from None
    if points.ndim != 2 or points.shape[1] != 2:
        raise DataError(f"{p}: every point line must hold exactly two numbers")
    if declared is not None and declared != len(points):
        raise DataError(f"{p}: header says n_points {declared} but {len(points)} points follow")
    if len(points) != NUM_POINTS:
        raise DataError(f"{p}: {len(points)} points, expected {NUM_POINTS}")
    if not np.isfinite(points).all():
        raise DataError(f"{p}: non-finite coordinate")
    return (points - 1.0).astype(np.float32)


def _image_beside(pts: Path) -> Path | None:
    for candidate in pts.parent.glob(pts.stem + ".*"):
        if candidate.suffix.lower() in IMAGE_SUFFIXES:
            return candidate
    return None


def read_pts_folder(folder: str | os.PathLike, warn: Warn) -> list[FaceRecord]:
    """All .pts files below `folder` with the image of the same stem beside them. A file without an image,
    malformed, or with points far outside its image is reported through `warn` and skipped."""
    root = Path(folder)
    records: list[FaceRecord] = []
    for pts in sorted(root.rglob("*.pts")):
        image = _image_beside(pts)
        if image is None:
            warn(f"{pts}: no image beside it (tried {', '.join(IMAGE_SUFFIXES)}); skipped")
            continue
        try:
            points = read_pts(pts)
            check_face(points, image, str(pts))
        except (DataError, ImageError) as exc:
            warn(f"{exc}; skipped")
            continue
        records.append(FaceRecord(image, points, key=f"{image.name}#0"))
    return records


# Annotations may run a little past the border (300-W's contours do, by < 1 px); half an image is a bug.
MAX_OUTSIDE_SHARE = 0.5


# NME divides by the outer-eye-corner distance: below this many pixels a face's error would be meaningless
# (two coinciding corners gave an NME of 1.9e9 %), and its training target is degenerate.
MIN_INTEROCULAR_PX = 1.0


def check_face(points: np.ndarray, image: Path, where: str) -> None:
    """Raise DataError for a face that evaluation and training cannot use: points far outside its image, or
    outer eye corners (the NME's normalising distance) that (nearly) coincide."""
    check_inside_image(points, image, where)
    distance = float(interocular_distance(points))
    if not distance >= MIN_INTEROCULAR_PX:
        raise DataError(f"{where}: the outer eye corners are {distance:.3g} px apart (under {MIN_INTEROCULAR_PX:g}); "
                        "no NME can be normalised by that")


def check_inside_image(points: np.ndarray, image: Path, where: str) -> None:
    """Raise DataError when a point lies more than MAX_OUTSIDE_SHARE of the image size outside it."""
    width, height = probe_size(image)
    lo = -MAX_OUTSIDE_SHARE * np.array([width, height])
    hi = (1 + MAX_OUTSIDE_SHARE) * np.array([width, height])
    bad = ~((points >= lo) & (points <= hi)).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{where}: point {i} at ({points[i, 0]:.4g}, {points[i, 1]:.4g}) lies far outside the "
                        f"{width}x{height} image {image.name}")


def read_dlib_xml(path: str | os.PathLike, warn: Warn) -> list[FaceRecord]:
    """dlib's imglab XML: <images><image file=...><box top left width height [ignore]><part name x y/>."""
    p = Path(path)
    try:
        root = ET.parse(p).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{p}: not a readable XML file ({exc})") from None
    images = root if root.tag == "images" else root.find(".//images")
    if images is None:
        raise DataError(f"{p}: no <images> element")
    records: list[FaceRecord] = []
    without_parts = 0
    for image_el in images.iter("image"):
        file_attr = image_el.get("file")
        if not file_attr:
            raise DataError(f"{p}: an <image> without a file attribute")
        image_path = (p.parent / file_attr).resolve()
        if not image_path.is_file():
            warn(f"{p}: image {file_attr} not found; its boxes skipped")
            continue
        for index, box_el in enumerate(image_el.iter("box")):
            if box_el.get("ignore", "0") not in ("0", "", "false"):
                continue
            if box_el.find("part") is None:
                without_parts += 1
            try:
                records.append(_dlib_box_record(p, image_path, file_attr, index, box_el))
            except (DataError, ImageError) as exc:
                warn(f"{exc}; skipped")
    if not records and without_parts:
        raise DataError(f"{p}: none of its {without_parts} boxes has 68 landmark parts (a detector-box file such as "
                        "dlib's training.xml, not a landmark file?)")
    return records


def _dlib_box_record(xml: Path, image_path: Path, file_attr: str, index: int, box_el: ET.Element) -> FaceRecord:
    where = f"{xml}: image {file_attr}, box {index}"
    try:
        box = tuple(float(box_el.get(k, "nan")) for k in ("left", "top", "width", "height"))
        parts = {int(part.get("name")): (float(part.get("x")), float(part.get("y"))) for part in box_el.iter("part")}
    except (TypeError, ValueError):
        raise DataError(f"{where}: non-numeric box or part attribute") from None
    if len(parts) != NUM_POINTS or sorted(parts) != list(range(NUM_POINTS)):
        raise DataError(f"{where}: {len(parts)} landmark parts, expected {NUM_POINTS} named 0..{NUM_POINTS - 1}")
    points = np.array([parts[i] for i in range(NUM_POINTS)], dtype=np.float32)  # dlib parts are 0-based
    if not np.isfinite(points).all():
        raise DataError(f"{where}: non-finite landmark coordinate")
    check_face(points, image_path, where)
    return FaceRecord(image_path, points, key=f"{Path(file_attr).name}#{index}", source_box=box)


def load_records(paths: Iterable[str | os.PathLike], warn: Warn) -> list[FaceRecord]:
    """Read every data source: an XML file (dlib) or a folder searched recursively for .pts."""
    records: list[FaceRecord] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = read_pts_folder(path, warn)
        elif path.suffix.lower() == ".xml":
            found = read_dlib_xml(path, warn)
        elif path.suffix.lower() == ".pts":
            image = _image_beside(path)
            if image is None:
                raise DataError(f"{path}: no image beside it")
            found = [FaceRecord(image, read_pts(path), key=f"{image.name}#0")]
        elif not path.exists():
            raise DataError(f"{path}: no such file or folder")
        else:
            raise DataError(f"{path}: expected a folder of .pts files or a dlib .xml file")
        if not found:
            raise DataError(f"{path}: no annotated faces found")
        records.extend(found)
    return records


def is_validation(key: str, val_fraction: float, seed: int) -> bool:
    """Seeded hash of the record's key: stable when files are added, independent of order."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_of(train_config: Mapping) -> tuple[float, int]:
    """(val_fraction, split seed) of a training run's saved config. The split has its own seed since
    `split_seed` exists; older runs split by their training seed."""
    seed = train_config.get("split_seed", train_config.get("seed", 0))
    return float(train_config.get("val_fraction", 0.1)), int(seed)


def split_records(
    records: Sequence[FaceRecord], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[FaceRecord], list[FaceRecord]]:
    """Deterministic train/validation split of `records`."""
    train = [r for r in records if not is_validation(r.key, val_fraction, seed)]
    val = [r for r in records if is_validation(r.key, val_fraction, seed)]
    return train, val


def other_faces(records: Sequence[FaceRecord]) -> list[list[Box]]:
    """For each record, the landmark boxes of the other annotated faces of the same photo, in its image's pixels.

    Faces annotated in the same image file (dlib XML) share its pixels. 300-W gives each face of a photo its
    own image file (`photo_1.jpg`, `photo_2.jpg`); the pack in ../shared/data cropped each file differently and
    lists the crops in `manifest.tsv` (crop origin and scale in the source photo), which maps one file's
    points into its sibling's pixels. Sibling files without a manifest entry are left out (unknown frame).
    """
    frames = _manifest_frames(records)
    groups: dict[tuple[Path, str], list[int]] = {}
    for i, record in enumerate(records):
        stem = record.image_path.stem
        head, _, tail = stem.rpartition("_")
        photo = head if head and tail.isdigit() and len(tail) <= 2 else stem
        groups.setdefault((record.image_path.parent, photo), []).append(i)
    result: list[list[Box]] = [[] for _ in records]
    for members in groups.values():
        for i in members:
            for j in members:
                if i == j:
                    continue
                points = records[j].landmarks.astype(np.float64)
                if records[i].image_path != records[j].image_path:
                    fi, fj = frames.get(records[i].image_path), frames.get(records[j].image_path)
                    if fi is None or fj is None:
                        continue
                    points = (points / fj[2] + fj[:2] - fi[:2]) * fi[2]  # j's crop -> source photo -> i's crop
                result[i].append(box_from_landmarks(points))
    return result


def _manifest_frames(records: Sequence[FaceRecord]) -> dict[Path, np.ndarray]:
    """image path -> (crop_left, crop_top, scale) from the data pack's manifest.tsv, where there is one."""
    frames: dict[Path, np.ndarray] = {}
    roots = {p for r in records for p in r.image_path.parents if (p / "manifest.tsv").is_file()}
    for root in roots:
        lines = (root / "manifest.tsv").read_text(encoding="utf-8").splitlines()
        header = lines[0].split("\t")
        col = {name: header.index(name) for name in ("file", "crop_left", "crop_top", "crop_right", "out_w")}
        for line in lines[1:]:
            f = line.split("\t")
            if len(f) < len(header):
                continue
            scale = float(f[col["out_w"]]) / (float(f[col["crop_right"]]) - float(f[col["crop_left"]]))
            frames[root / f[col["file"]]] = np.array([float(f[col["crop_left"]]), float(f[col["crop_top"]]), scale])
    return frames


def spread(records: Sequence[FaceRecord], count: int) -> list[FaceRecord]:
    """`count` records evenly spread over the list (subjects and sources vary along it)."""
    if len(records) <= count:
        return list(records)
    return [records[i] for i in np.linspace(0, len(records) - 1, count).round().astype(int)]
