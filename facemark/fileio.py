"""Atomic writes: a file is either complete at its path or not there at all.

A write that fails (disk full, file too large, permission, read-only file system, I/O error) raises WriteError,
one line naming the file and the reason, and leaves no partial file. `-` names standard output, and a target
that is not a regular file (a pipe, a FIFO, /dev/stdout, a terminal) is written directly, never renamed over."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from facemark.errors import FacemarkError, WriteError

STDOUT = "-"
# An input image larger than this is refused by its size, before it is read (facemark.imageio, predict's
# --max-file-mb): the largest photos of the pixel limit (a 64-megapixel PNG, a 16-bit TIFF) stay under it, and a
# multi-gigabyte file named .jpg costs nothing.
DEFAULT_MAX_FILE_MB = 200.0


def is_stdout(path: str | os.PathLike | None) -> bool:
    return path is not None and str(path) == STDOUT


def is_stream(path: str | os.PathLike) -> bool:
    """True for `-` and for an existing target that is neither a regular file nor a folder (a pipe, a device):
    written directly, not replaced. A folder is not a stream: check_writable refuses it as an output file."""
    if is_stdout(path):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def write_error(target: str | os.PathLike, exc: OSError, what: str = "") -> WriteError:
    """The one line for a failed write: the file, what it was, and the system's reason."""
    reason = exc.strerror or exc.__class__.__name__
    return WriteError(f"{target}: cannot write{' the ' + what if what else ''} ({reason})")


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    `suffix` defaults to the target's own (so writers that pick a format by extension keep working). A symlink
    is followed: the file it names is replaced, not the link. An OSError becomes a WriteError naming `path`.
    """
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        yield Path(tmp)
        # mkstemp makes 0600 files: give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_output_text(path: str | os.PathLike, text: str) -> None:
    """A document the user asked for: `-` to stdout, a pipe or device directly, a file atomically."""
    write_output_chunks(path, [text])


def write_output_chunks(path: str | os.PathLike, chunks: Iterable[str]) -> None:
    """write_output_text for a document made piece by piece (a long video's): never whole in memory."""
    if is_stdout(path):
        sys.stdout.writelines(chunks)
        sys.stdout.flush()
        return
    try:
        if is_stream(path):
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(chunks)
        else:
            with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.writelines(chunks)
    except OSError as exc:
        raise write_error(path, exc) from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_with_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` and rename the result onto `path` only if it returns."""
    with atomic_path(path) as tmp:
        writer(tmp)


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise FacemarkError (one line) when `path` cannot be written, before any image is processed."""
    target = Path(path)
    if is_stream(target):
        if not is_stdout(target) and not os.access(target, os.W_OK):
            raise FacemarkError(f"{target}: the {what} is not writable here (permission denied)")
        return
    if target.is_dir():
        raise FacemarkError(f"{target}: {what} is a folder, expected a file path")
    check_writable_folder(target.parent, f"folder for the {what}")
    if target.exists() and not os.access(target, os.W_OK):
        raise FacemarkError(f"{target}: the {what} is not writable here (permission denied)")


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """Create `folder` if needed, and raise FacemarkError (one line) when files cannot be created in it."""
    target = Path(folder)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FacemarkError(f"{target}: cannot create the {what} ({exc.strerror})") from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise FacemarkError(f"{target}: the {what} is not writable here (permission denied)")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
