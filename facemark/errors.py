"""Exceptions with messages a user can act on. The CLI turns each into one line; library code never exits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Self


class FacemarkError(Exception):
    """Base class: anything facemark raises on purpose.

    A message that tells the user which setting to change names it as the caller writes it: str(exc) in
    Python's words (device='cpu'), `cli_message(exc)` in the command line's (--device cpu) when the raiser gave
    that wording as `cli` (see `worded`)."""

    def __init__(self, message: str, *, cli: str | None = None) -> None:
        super().__init__(message)
        self.cli = cli

    @classmethod
    def worded(cls, message: Callable[[bool], str]) -> Self:
        """The error whose text `message(cli)` names settings by `setting(name, value, cli=cli)`."""
        return cls(message(False), cli=message(True))


def setting(name: str, value: object = None, *, cli: bool) -> str:
    """A setting as the caller writes it: `name=value` (a FaceLandmarker keyword) or `--name value` (a flag)."""
    if cli:
        return f"--{name.replace('_', '-')}" + ("" if value is None else f" {value}")
    return name if value is None else f"{name}={value!r}"


def cli_message(exc: BaseException) -> str:
    """The one line a command prints for `exc`: its command-line wording when it has one."""
    return getattr(exc, "cli", None) or str(exc)


class SettingError(FacemarkError, ValueError):
    """A setting (a FaceLandmarker keyword, a command-line option) with a value that cannot work."""


class ClosedError(FacemarkError, ValueError):
    """An object used after its close() (its model sessions are released)."""


class DataError(FacemarkError):
    """A malformed or unusable annotation file or data set."""


class ImageError(FacemarkError):
    """An image that cannot be read: missing, corrupt, empty, not an image, or too large."""


class WriteError(FacemarkError):
    """An output that could not be written (disk full, file too large, permission, read-only, I/O error).
    Unlike a bad input it ends the run: every later write would fail the same way."""


class ModelError(FacemarkError):
    """A model file that is missing, corrupt, or not a facemark model."""


class ProviderError(FacemarkError):
    """An execution provider that was asked for explicitly but cannot run here."""


class ParityError(FacemarkError):
    """An exported model that fails its numerical parity or accuracy gate."""


class ModelWarning(UserWarning):
    """Something about a model a user should know before trusting its output (exported unverified, a presence
    score the runtime does not apply); the CLI prints each as one line."""


# The optional extras of pyproject.toml, by the top-level modules only they install.
EXTRA_OF_MODULE = {"torch": "train", "torchvision": "train", "onnx": "train", "onnxscript": "train",
                   "matplotlib": "train", "pytriton": "serve", "tritonclient": "serve", "ray": "ray",
                   "pyarrow": "ray"}


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install when `exc` is the absence of one of its modules, else None."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return f"this needs the {extra} extra ({module} is not installed): pip install 'facemark[{extra}]'"


def printable(text: str) -> str:
    """`text` with its control characters (a newline or a terminal escape in a file name) written as a Python
    repr writes them, so a message stays one honest line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
