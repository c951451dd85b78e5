"""Landmarks over a Ray Data Dataset on a cluster (extra `ray`): docs/DESIGN.md, section 7; docs/RAY.md.

`FaceLandmarks` is the callable class for `Dataset.map_batches` on an actor pool: each actor builds one
FaceLandmarker (ONNX Runtime and OpenCV pinned to the actor's `threads`) and runs local predict's own steps
(facemark.runtime.predict.runner: the same decoding, errors, Haar and batched model) on each batch of rows. A row
names its image in `path` (a local path, a URI such as s3://bucket/a.jpg, or a path of the `filesystem`
given) and may carry its encoded bytes in `bytes` (as `ray.data.read_binary_files(..., include_paths=True)`
gives); each output row is one `images[]` entry of `runtime predict`: path, width, height, faces, error. A bad
image is an error row, never a failed task. `landmarks_dataset` wires the class with an ActorPoolStrategy;
`runtime predict --ray` lists the inputs, runs the job and writes the rows in input order.

Nothing here is imported unless the ray path runs: without the extra, importing this module raises one line
naming it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from facemark.errors import FacemarkError, ImageError, missing_extra_message

try:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy, Dataset
except ModuleNotFoundError as exc:  # the extra is absent: one line naming it, for library users as for the CLI
    raise ModuleNotFoundError(missing_extra_message(exc) or str(exc), name=exc.name) from None

from facemark.imageio import IMAGE_SUFFIXES
from facemark.runtime.predict.inputs import ImageResult, collect_inputs
from facemark.runtime.predict.runner import LocalSteps, ReadBytes, predict_files
from facemark.runtime.predict.writers import dumps, jsonl_line
from facemark.runtime.schema import FACE

FacesFormat = Literal["nested", "json"]
DEFAULT_BATCH_SIZE = 16  # images per map_batches call: one actor's model batches their faces when threads > 1
URI_MARK = "://"
CONNECT_TIMEOUT_S = 10.0  # for the head node to accept a connection

_POINT = pa.list_(pa.float64())
# The Arrow type of each face field; the names and their order are the JSON Schema's (facemark.runtime.schema).
_FACE_FIELD_TYPES = {"box": _POINT, "landmarks": pa.list_(_POINT), "score": pa.float64(),
                     "detector_score": pa.float64(), "detector_box": _POINT, "landmark_scores": _POINT,
                     "pose": pa.struct([(axis, pa.float64()) for axis in FACE["properties"]["pose"]["required"]])}


def face_type(pose: bool = False) -> pa.DataType:
    """One face as an Arrow struct, its fields in the order of a JSON face (pose only with `pose`)."""
    names = [*FACE["required"], *(("pose",) if pose else ())]
    return pa.struct([(name, _FACE_FIELD_TYPES[name]) for name in names])


def image_schema(faces: FacesFormat = "nested", pose: bool = False) -> pa.Schema:
    """The rows `FaceLandmarks` returns: a JSON line's fields; faces nested, or one JSON text per image."""
    faces_type = pa.list_(face_type(pose)) if faces == "nested" else pa.string()
    return pa.schema([("path", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                      ("faces", faces_type), ("error", pa.string())])


def is_uri(path: str) -> bool:
    return URI_MARK in path


def read_with_pyarrow(path: str, filesystem: pafs.FileSystem | None = None) -> bytes:
    """The bytes of `path` through `filesystem`, or the filesystem its URI names (s3://, gs://, hdfs://,
    file://, ...); ImageError (one line naming it) when it cannot be read."""
    try:
        if filesystem is None:
            filesystem, path_in_fs = pafs.FileSystem.from_uri(path)
        else:
            path_in_fs = path
        with filesystem.open_input_stream(path_in_fs) as stream:
            return stream.read()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (OSError, pa.ArrowException) as exc:
        raise ImageError(f"{path}: cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                         ) from None


def row_reader(data: Mapping[str, bytes | None], filesystem: pafs.FileSystem | None) -> ReadBytes:
    """How the files of one batch are read: a row's own bytes, else through pyarrow (a URI or `filesystem`),
    else None (local predict reads it from the disk, with its own messages)."""

    def read(path: str) -> bytes | None:
        if data.get(path) is not None:
            return data[path]
        if filesystem is not None or is_uri(path):
            return read_with_pyarrow(path, filesystem)
        return None

    return read


def result_rows(results: Sequence[ImageResult], faces: FacesFormat, pose: bool) -> pa.Table:
    """Predict's results as rows of `image_schema`: each row is the result's JSON line entry."""
    entries = [result.to_json() for result in results]
    if faces == "json":
        entries = [{**entry, "faces": dumps(entry["faces"])} for entry in entries]
    return pa.Table.from_pylist(entries, schema=image_schema(faces, pose))


class FaceLandmarks:
    """The `map_batches` callable: one FaceLandmarker per actor, landmarks for a batch of rows (pyarrow format).

    model: a path readable on every node, the model's bytes, or None (the model shipped with facemark).
    threads: ONNX Runtime's and OpenCV's threads in this actor, and the files it decodes at once (give the actor
    as many CPUs). faces: "nested" (a list of structs) or "json" (one JSON text per image). filesystem: a pyarrow
    filesystem every path is read through (default: local paths from the disk, URIs through the filesystem they
    name). cwd: the folder relative local paths are read from (runtime predict --ray passes its own).
    landmarker_options: FaceLandmarker's (provider, detector_options, refine, flip, min_score, max_faces, ...)."""

    def __init__(self, model: str | os.PathLike | bytes | None = None, threads: int = 1,
                 faces: FacesFormat = "nested", pose: bool = False, filesystem: pafs.FileSystem | None = None,
                 cwd: str | None = None, **landmarker_options: Any) -> None:
        import cv2

        from facemark.runtime.landmarker import FaceLandmarker

        cv2.setNumThreads(threads)  # OpenCV would take threads of its own beside the actor's CPUs
        if cwd is not None and os.path.isdir(cwd):  # this process is the actor's alone
            os.chdir(cwd)
        self.landmarker = FaceLandmarker(model, threads=threads, **landmarker_options)
        self.threads, self.faces, self.pose, self.filesystem = threads, faces, pose, filesystem

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = [str(p) for p in batch.column("path").to_pylist()]
        data = batch.column("bytes").to_pylist() if "bytes" in batch.column_names else [None] * len(paths)
        steps = LocalSteps(self.landmarker, row_reader(dict(zip(paths, data, strict=True)), self.filesystem))
        results = predict_files(steps, paths, workers=self.threads, pose=self.pose)
        return result_rows(results, self.faces, self.pose)


def landmarks_dataset(ds: Dataset, *, actors: int | tuple[int, int] | None = None, threads: int = 1,
                      batch_size: int = DEFAULT_BATCH_SIZE, **options: Any) -> Dataset:
    """`ds` (a `path` column, optionally `bytes`) -> one row per image (`image_schema`), computed by
    FaceLandmarks on a pool of `actors` (a size, or (min, max) to autoscale; default: the cluster's CPUs over
    `threads`), each holding `threads` CPUs. `options`: FaceLandmarks's (model, faces, pose, filesystem, cwd and
    FaceLandmarker's). A killed actor is restarted and its batch retried: Ray Data gives actor pools
    max_restarts=-1 and max_task_retries=-1 (Ray 2.60 deprecates passing them to map_batches)."""
    size = actors if actors is not None else default_actors(threads)
    pool = ActorPoolStrategy(min_size=size[0], max_size=size[1]) if isinstance(size, tuple) else \
        ActorPoolStrategy(size=size)
    return ds.map_batches(FaceLandmarks, fn_constructor_kwargs={"threads": threads, **options},
                          batch_format="pyarrow", batch_size=batch_size, compute=pool, num_cpus=threads,
                          udf_modifying_row_count=False)


def default_actors(threads: int) -> int:
    """As many actors of `threads` CPUs as the connected cluster holds (at least one)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1) // threads))


@contextmanager
def ray_cluster(address: str | None = None, quiet: bool = True) -> Iterator[None]:
    """Ray connected for the block: to `address` ("auto", "HOST:6379", "ray://HOST:10001") or a new local
    cluster ("local" or None), shut down afterwards; a connection already open is used as it is and kept."""
    if ray.is_initialized():
        yield
        return
    local = address in (None, "local")
    settings: dict[str, Any] = {"include_dashboard": False} if local else {}
    if quiet:  # the CLI prints its own summary and errors; Ray's progress bars and worker logs would bury them
        settings.update(logging_level="WARNING", log_to_driver=False)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ray.data.DataContext.get_current().enable_progress_bars = False
    if not local:
        check_reachable(address)
    try:
        ray.init(address="local" if local else address, **settings)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise FacemarkError(f"--ray {address}: cannot connect to a Ray cluster ({str(exc).splitlines()[0]})"
                            ) from None
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """FacemarkError (one line) when nothing answers at a HOST:PORT or ray://HOST:PORT address: ray.init would
    wait minutes for it. "auto" is left to Ray (it fails at once without a cluster)."""
    if not address or address == "auto":
        return
    parsed = urlsplit(address if URI_MARK in address else f"tcp://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise FacemarkError(f"--ray {address}: expected local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise FacemarkError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def list_uri_images(uri: str) -> list[str]:
    """The image files below a URI folder (recursive), or the URI itself when it names a file."""
    filesystem, root = pafs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(uri)
    at = uri.find(root)  # what comes before the filesystem's own paths: "s3://", "hdfs://host:8020", ...
    prefix = uri[:at] if at > 0 else uri.split(URI_MARK, 1)[0] + URI_MARK
    found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(prefix + item.path for item in found
                  if item.type == pafs.FileType.File and Path(item.path).suffix.lower() in IMAGE_SUFFIXES)


def job_inputs(inputs: Sequence[str]) -> tuple[list[str], list[ImageResult]]:
    """runtime predict's input listing (facemark.runtime.predict.collect_inputs) for local inputs, and the
    images below each URI (object storage), in the order given, each once; an input that yields nothing is an
    error."""
    files: dict[str, str] = {}  # each file once (a local one by its real path), in order
    failures: list[ImageResult] = []
    for item in inputs:
        if not is_uri(item):
            found, failed = collect_inputs([item])
            files.update({os.path.realpath(f): str(f) for f in found if os.path.realpath(f) not in files})
            failures += failed
            continue
        try:
            listed = list_uri_images(item)
        except FileNotFoundError:
            listed, why = [], "no such file or folder"
        except (OSError, pa.ArrowException) as exc:
            listed, why = [], f"cannot be listed ({str(exc).splitlines()[0]})"
        else:
            why = "no image files below this URI"
        if not listed:
            failures.append(ImageResult(item, error=f"{item}: {why}"))
        files.update({uri: uri for uri in listed})
    return list(files.values()), failures


@dataclass(frozen=True)
class JobTimes:
    """Seconds of a `run_landmarks_job` over `images` files: connecting (a local cluster starts here), the job,
    and the first rows' wait (actors starting, their models loading)."""

    connect_s: float
    job_s: float
    first_row_s: float
    actors: int
    images: int


def run_landmarks_job(files: Sequence[str], address: str | None = None, actors: int | None = None,
                      threads: int = 1, **options: Any) -> tuple[pa.Table, JobTimes]:
    """Landmarks of `files` on a Ray cluster (`ray_cluster(address)`): their rows in input order, and the times.
    `options`: landmarks_dataset's. Relative paths are read from this process's folder."""
    start = time.perf_counter()
    with ray_cluster(address):
        connected = time.perf_counter()
        count = actors or default_actors(threads)
        rows = ray.data.from_items([{"path": path} for path in files])
        ds = landmarks_dataset(rows, actors=count, threads=threads, cwd=os.getcwd(), **options)
        batches, first = [], None
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            first = first or time.perf_counter()
            batches.append(batch)
        done = time.perf_counter()
    empty = image_schema(options.get("faces", "nested"), options.get("pose", False)).empty_table()
    table = in_input_order(pa.concat_tables(batches) if batches else empty, files)
    return table, JobTimes(connected - start, done - connected, (first or done) - connected, count, len(files))


def in_input_order(table: pa.Table, files: Sequence[str]) -> pa.Table:
    """The rows of `table` in the order of `files` (a file listed twice: its rows in turn); FacemarkError if the
    job lost or doubled a row."""
    paths = table.column("path").to_pylist()
    if sorted(paths) != sorted(files):
        raise FacemarkError(f"the Ray job returned {len(paths)} rows for {len(files)} files (lost or doubled rows)")
    places: dict[str, deque[int]] = {}
    for index, path in enumerate(files):
        places.setdefault(path, deque()).append(index)
    target = [places[path].popleft() for path in paths]
    return table.take(sorted(range(len(paths)), key=target.__getitem__))


def write_jsonl_rows(path: str | os.PathLike, rows: Sequence[dict], run: dict | None) -> None:
    """--jsonl with --ray: local predict's lines (facemark.runtime.predict.jsonl_line), written at once
    (atomically for a file; `-` is standard output)."""
    from facemark.fileio import write_output_text

    write_output_text(path, "".join(jsonl_line(row, run) for row in rows))


def write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    """--parquet: the rows as one Parquet file (faces nested), written atomically."""
    import pyarrow.parquet as pq

    from facemark.fileio import write_with_atomic

    write_with_atomic(path, lambda tmp: pq.write_table(table, tmp))


def predict_job(inputs: Sequence[str], address: str | None = None, actors: int | None = None, threads: int = 1,
                **options: Any) -> tuple[list[ImageResult], pa.Table, JobTimes]:
    """`runtime predict --ray`: the inputs listed (job_inputs) and the job run: the inputs that yield nothing
    (errors, as local predict lists them), one row per file in input order, the times."""
    files, failures = job_inputs(inputs)
    if not files:
        empty = image_schema(options.get("faces", "nested"), options.get("pose", False)).empty_table()
        return failures, empty, JobTimes(0.0, 0.0, 0.0, 0, 0)
    return failures, *run_landmarks_job(files, address, actors, threads, **options)
