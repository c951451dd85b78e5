"""The predict runner (docs/DESIGN.md section 7): files are decoded and their faces found on worker threads
(`FileSteps.load`), the landmark model runs once per group of files (`FileSteps.landmarks`), results are
delivered in input order, and pictures are written by facemark.runtime.predict.writers. `LocalSteps` does the
work in this process; facemark.runtime.serving.client and facemark.runtime.ray bring other steps.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from facemark.drawing import DrawMode
from facemark.errors import FacemarkError, cli_message
from facemark.imageio import DEFAULT_MAX_FILE_BYTES, decode_image, read_image
from facemark.runtime.landmarker import Detections, FaceLandmarker, Found, default_workers
from facemark.runtime.predict.inputs import ImageResult
from facemark.runtime.predict.writers import (
    ChipOptions,
    annotated_suffix,
    claim_output_stems,
    output_folders,
    write_outputs,
)

PIPELINE_GROUP = 8  # files whose faces share one landmark-model call in a pipelined run


@dataclass
class LoadedFile:
    """A file after decoding and Haar (or its error), waiting for the landmark model."""

    result: ImageResult
    image: np.ndarray | None = None
    found: Found | None = None  # local detection, waiting for the landmark model
    done: Detections | None = None  # faces already complete (a server made them: facemark.runtime.serving.client)
    seconds: float = 0.0  # decode + detect


# How a file's encoded bytes are got when not from the local disk (facemark.runtime.ray: a row's bytes, object
# storage); it raises ImageError for an unreadable file, and None means "read it from the local disk".
ReadBytes = Callable[[str], bytes | None]


def _load_and_find(landmarker: FaceLandmarker, path: Path | str, read: ReadBytes | None = None,
                   max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> LoadedFile:
    start = time.perf_counter()
    try:
        data = read(str(path)) if read is not None else None
        image = read_image(path, max_bytes=max_bytes) if data is None else decode_image(data, path)
    except FacemarkError as exc:
        return LoadedFile(ImageResult(str(path), error=cli_message(exc)))  # the command line's words
    found = landmarker.find(image)
    return LoadedFile(ImageResult(str(path), image.shape[1], image.shape[0]), image, found,
                   time.perf_counter() - start)


def _landmarks_of(landmarker: FaceLandmarker, group: Sequence[LoadedFile]) -> list[Detections | None]:
    """The landmark model once per pass over the faces of every readable file of `group` (None: unreadable)."""
    done = iter(landmarker.landmarks_for_found([item.found for item in group if item.found is not None]))
    return [next(done) if item.found is not None else None for item in group]


class FileSteps(Protocol):
    """The two steps predict_files runs: `load` a file on a worker thread (decode, and detect or send it to a
    server), then `landmarks` once for a group of loaded files (None for an unreadable one)."""

    def load(self, path: Path | str) -> LoadedFile: ...

    def landmarks(self, group: Sequence[LoadedFile]) -> list[Detections | None]: ...


@dataclass(frozen=True)
class LocalSteps:
    """In this process: Haar on the worker threads, the landmark model batched over the group."""

    landmarker: FaceLandmarker
    read: ReadBytes | None = None  # None: every file from the local disk
    max_bytes: int = DEFAULT_MAX_FILE_BYTES  # a larger local file is refused by its size (--max-file-mb)

    def load(self, path: Path | str) -> LoadedFile:
        return _load_and_find(self.landmarker, path, self.read, self.max_bytes)

    def landmarks(self, group: Sequence[LoadedFile]) -> list[Detections | None]:
        return _landmarks_of(self.landmarker, group)


def _resolved(item: Future | ImageResult) -> ImageResult:
    return item.result() if isinstance(item, Future) else item


def _with_landmarks(loaded: LoadedFile, found: Detections) -> ImageResult:
    result = loaded.result
    result.faces = found.faces
    result.presence_dropped = found.presence_dropped
    result.error = f"{result.path}: " + "; ".join(found.problems) if found.problems else None
    result.ms = loaded.seconds * 1000.0 + found.times["landmarks"]
    return result


def predict_files(
    landmarker: FaceLandmarker | FileSteps,
    files: Sequence[Path | str],  # a str keeps a URI's "//" (facemark.runtime.ray)
    out_dir: str | os.PathLike | None = None,
    draw: DrawMode = "points",
    on_result: Callable[[ImageResult], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    workers: int | None = None,
    chips: ChipOptions | None = None,
    pose: bool = False,
    stems: Mapping[str, str] | None = None,
) -> list[ImageResult]:
    """Predict every file; results (and `on_result` calls) in input order. A bad file becomes an error result
    and the batch goes on. Stops before the next file once `stop_requested()` is true (the results so far
    are returned).

    workers: 1 processes one file after another; more (default: one per core) pipelines the run: decoding,
    Haar and writing annotated images of the next files run on that many threads while the landmark model
    runs once per pass over the faces of a group of files. The landmarks equal one-by-one processing.
    chips: also write each face's aligned chip. pose: the results' JSON carries each face's head pose.
    stems: each file's output stem (default: claim_output_stems over `files`, which refuses unsafe folders).
    `landmarker` may also be other FileSteps (facemark.runtime.serving.client: a Triton server does the work)."""
    steps = LocalSteps(landmarker) if isinstance(landmarker, FaceLandmarker) else landmarker
    count = workers or default_workers()
    if stems is None:
        stems = claim_output_stems(files, output_folders(out_dir, chips))
    results: list[ImageResult] = []

    def finish(loaded: LoadedFile, found: Detections | None, pool: ThreadPoolExecutor | None) -> Future | ImageResult:
        result = loaded.result if found is None else _with_landmarks(loaded, found)
        result.with_pose = pose
        if loaded.image is None or (out_dir is None and chips is None):
            return result
        stem = stems[result.path]  # unique in its folders and stable across runs: also names the chips
        target = None if out_dir is None else Path(out_dir) / f"{stem}{annotated_suffix(Path(result.path))}"
        job = (result, loaded.image, target, draw, chips, stem)
        return write_outputs(*job) if pool is None else pool.submit(write_outputs, *job)

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
