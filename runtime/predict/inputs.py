"""Input listing for `runtime predict` (docs/DESIGN.md section 7): files, folders (recursive) and glob patterns
become an ordered list of image files, each once (compared resolved); what cannot be an input becomes an
`ImageResult` with its one-line error. `ImageResult` is the per-file result every later step fills in.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from imutils.paths import list_files

from facemark.imageio import IMAGE_SUFFIXES, is_url, url_error
from facemark.outputs import path_bytes, utf8_text
from facemark.runtime.landmarker import Face

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
    with_pose: bool = False  # faces carry "pose" in JSON (--pose)
    chips: list[str] = field(default_factory=list)  # aligned face chips written (--aligned)
    presence_dropped: int = 0  # detections whose presence score fell below the threshold (the run's summary)

    def to_json(self) -> dict:
        """The `images[]` entry; a name that is not valid UTF-8 is written in the one documented form
        (facemark.outputs: "path" as UTF-8 text, its exact bytes in "path_bytes")."""
        entry = {"path": utf8_text(self.path), "width": self.width, "height": self.height,
                 "faces": [f.to_json(self.with_pose) for f in self.faces],
                 "error": None if self.error is None else utf8_text(self.error)}
        encoded = path_bytes(self.path)
        return entry if encoded is None else {**entry, "path_bytes": encoded}


def find_images(folder: str) -> list[str]:
    """Image files below `folder` (recursive), by the one extension list of facemark.imageio, any case."""
    return [p for p in list_files(folder) if Path(p).suffix.lower() in IMAGE_SUFFIXES]


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[ImageResult]]:
    """Files as given, folders searched recursively for images, globs expanded (recursive `**`).

    Returns the files in order (each once) and an error result for each input that yields nothing, or that is a
    video (by name or content): that one points to `runtime video`."""
    from facemark.runtime.video import looks_like_video  # here: video imports predict's writers, which import us

    files: list[Path] = []
    failures: list[ImageResult] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.realpath(path)  # a relative and an absolute name (or a link) of one file: one input
        if key in seen:
            return
        seen.add(key)
        if looks_like_video(path):
            failures.append(ImageResult(str(path), error=f"{path}: a video: use `facemark runtime video {path}`"))
        else:
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
            missing = url_error(text) if is_url(text) else f"{text}: no such file or folder"
            failures.append(ImageResult(text, error=missing))
    return files, failures
