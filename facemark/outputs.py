"""The output plan: nothing a command is pointed at is ever written over.

Every command that writes lists, before any work, what it will read (images, the files under input folders,
video sources, the model, the checkpoint, the data files) and what it will write (files, and folders with the
names it writes in them). `OutputPlan.check` resolves every path (symlinks, `..`, and hard links by device and
inode) and raises OutputClash -- one line naming both paths; the CLI exits 2 -- when an output would be an input
or two outputs would be one file. Nothing is written before the check. Streams (`-`, pipes, FIFOs, terminals,
/dev/stdout on a pipe) are never files to replace and stay allowed.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from facemark.errors import FacemarkError
from facemark.fileio import check_writable, is_stdout


class OutputClash(FacemarkError):
    """An output that would replace an input, or two outputs on one path."""


@dataclass(frozen=True)
class Place:
    """A path as given, what it resolves to, and the file it names when it exists."""

    given: str
    option: str  # how the command names it: "--json", "the input", "--model", ...
    real: str
    inode: tuple[int, int] | None  # (st_dev, st_ino) of an existing file or folder
    kind: str  # "file", "folder", "stream" or "missing"
    links: int = 1  # hard links to an existing file
    folder_output: bool = False  # an output folder (its files are chosen or declared by the command)
    replaced: bool = False  # an output folder replaced whole: nothing below it may be an input or an output

    @staticmethod
    def of(path: str | os.PathLike, option: str) -> Place:
        given = os.fsdecode(path)
        if is_stdout(given):
            return Place(given, option, given, None, "stream")
        real = os.path.realpath(given)
        try:
            info = os.stat(real)
        except OSError:  # a new file, a symlink loop, a folder we may not search: compared by name only
            return Place(given, option, real, None, "missing")
        kind = "file" if stat.S_ISREG(info.st_mode) else "folder" if stat.S_ISDIR(info.st_mode) else "stream"
        return Place(given, option, real, (info.st_dev, info.st_ino), kind, info.st_nlink)

    def same_file(self, other: Place) -> bool:
        return self.real == other.real or (self.inode is not None and self.inode == other.inode)

    def inside(self, folder: Place) -> bool:
        return self.real.startswith(folder.real.rstrip(os.sep) + os.sep)

    def relation(self, other: Place) -> str:
        """How this path reaches `other`'s file, for the message."""
        if self.real != other.real:
            return "a hard link to it"
        if os.path.abspath(self.given) != self.real:
            return "through a symlink"
        return "the same file"


@dataclass
class OutputPlan:
    """What one command reads and writes; `check()` before any work."""

    inputs: list[Place] = field(default_factory=list)
    outputs: list[Place] = field(default_factory=list)

    def read(self, paths: Iterable[str | os.PathLike | None] | str | os.PathLike | None, option: str
             ) -> OutputPlan:
        """Inputs: files, or folders (every file below them counts as an input)."""
        if paths is None or isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.inputs += [Place.of(p, option) for p in paths if p is not None]
        return self

    def read_data(self, paths: Iterable[str | os.PathLike], option: str) -> OutputPlan:
        """Annotated data (dlib XML files, .pts files, folders of them) and the photos they name."""
        for path in paths:
            self.read(path, option)
            self.read(_photos_of(Path(path)), f"a photo of {option}")
        return self

    def write(self, path: str | os.PathLike | None, option: str) -> OutputPlan:
        """An output file (None: not asked for)."""
        if path is not None:
            self.outputs.append(Place.of(path, option))
        return self

    def write_folder(self, folder: str | os.PathLike | None, option: str, names: Iterable[str] = ()) -> OutputPlan:
        """An output folder and the files the command writes in it (relative names; others are chosen so that
        they replace nothing, e.g. predict's pictures)."""
        if folder is not None:
            self.outputs.append(replace(Place.of(folder, option), folder_output=True))
            self.outputs += [Place.of(Path(folder) / name, option) for name in names]
        return self

    def replace_folder(self, folder: str | os.PathLike | None, option: str) -> OutputPlan:
        """An output folder the command replaces whole (a Triton model folder)."""
        if folder is not None:
            self.outputs.append(replace(Place.of(folder, option), folder_output=True, replaced=True))
        return self

    def check(self, writable: bool = True) -> None:
        """Raise OutputClash for an output that is an input or another output; then (`writable`) raise
        FacemarkError for an output file that cannot be written (its folder is made if needed)."""
        files = [o for o in self.outputs if o.kind != "stream"]
        for output in files:
            clash = self._input_of(output)
            if clash is not None:
                raise OutputClash(f"{output.given}: {output.option} would write over {_what(output, clash)}; "
                                  "nothing was written, give another path")
        for i, first in enumerate(files):
            for second in files[i + 1:]:
                if first.same_file(second):
                    what = "folder" if first.folder_output or second.folder_output else "file"
                    also = "" if first.given == second.given else f" ({first.given})"
                    raise OutputClash(f"{second.given}: {first.option} and {second.option} name the same {what}"
                                      f"{also}; nothing was written, give each output its own path")
                for outer, inner in ((first, second), (second, first)):
                    if outer.replaced and inner.inside(outer):
                        raise OutputClash(f"{inner.given}: {inner.option} and {outer.option} would both write it "
                                          f"({outer.option} replaces the folder {outer.given} whole); nothing was "
                                          "written, give each output its own path")
        if writable:
            for output in self.outputs:
                if not output.folder_output and not self._is_declared_in_folder(output):
                    check_writable(output.given, f"{output.option} file")

    def _is_declared_in_folder(self, output: Place) -> bool:
        return any(o is not output and o.option == output.option and output.inside(o) for o in self.outputs)

    def _input_of(self, output: Place) -> Place | None:
        """The input `output` would replace: the same file (by name or inode), a file below an input folder,
        or the input folder itself."""
        for place in self.inputs:
            if place.kind == "stream":
                continue
            if output.replaced and (place.inside(output) or place.real == output.real):
                return place
            if place.kind == "folder":
                if output.real == place.real or (output.kind == "file" and output.inside(place)):
                    return place
                if output.kind == "file" and output.links > 1 and _holds_inode(place.real, output.inode):
                    return place
            elif output.same_file(place):
                return place
        return None


def _photos_of(data: Path) -> list[Path]:
    """The photos a data file names (a dlib XML's <image file=...>, the image beside a .pts); a folder's are
    below it already. Unreadable data names none here: loading it says why."""
    from facemark.imageio import IMAGE_SUFFIXES

    if data.suffix.lower() == ".pts":
        return [data.with_suffix(s) for s in IMAGE_SUFFIXES if data.with_suffix(s).is_file()]
    if data.suffix.lower() != ".xml" or not data.is_file():
        return []
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(data).getroot()
    except (ET.ParseError, OSError):
        return []
    return [data.parent / name for name in (e.get("file") for e in root.iter("image")) if name]


def _what(output: Place, clash: Place) -> str:
    """The input `output` reaches, named in words: `the input a.jpg (a hard link to it)`."""
    if output.replaced and clash.real != output.real:
        return f"{clash.option} {clash.given} (it replaces the folder that holds it)"
    if clash.kind != "folder":
        return f"{clash.option} {clash.given} ({output.relation(clash)})"
    if output.real == clash.real:
        return f"{clash.option} folder {clash.given}"
    return f"a file of {clash.option} folder {clash.given}"


def _holds_inode(folder: str, inode: tuple[int, int] | None) -> bool:
    """Whether a file below `folder` is `inode` (a hard link to it from outside the folder)."""
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                info = os.stat(os.path.join(root, name))
            except OSError:
                continue
            if (info.st_dev, info.st_ino) == inode:
                return True
    return False


# File names in JSON, JSONL and CSV. The OS may give a name any bytes (not UTF-8, newlines, control characters);
# Python holds undecodable bytes as lone surrogates, which strict JSON parsers reject and UTF-8 cannot encode.
# The one form: "path" is the name as text -- itself when it is valid UTF-8, else with each undecodable byte as
# U+FFFD -- and "path_bytes" (only then) is the name's exact bytes in base64, so the name is always recoverable.
def _name_bytes(text: str) -> bytes:
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:  # a surrogate that no undecodable byte made
        return text.encode("utf-8", "surrogatepass")


def utf8_text(text: str) -> str:
    """`text` as valid UTF-8 text (a name's undecodable bytes as U+FFFD); unchanged when it is valid."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _name_bytes(text).decode("utf-8", "replace")


def path_bytes(name: str) -> str | None:
    """The exact bytes of a name that is not valid UTF-8, in base64; None for a valid name."""
    if utf8_text(name) is name:
        return None
    return base64.b64encode(_name_bytes(name)).decode("ascii")


def name_of(path: str, encoded: str | None) -> str:
    """The name a "path" / "path_bytes" pair was written from (the inverse of utf8_text + path_bytes)."""
    return os.fsdecode(base64.b64decode(encoded)) if encoded else path


def utf8_strings(value: object) -> object:
    """`value` (JSON-like: dicts, lists, strings, numbers) with every string made valid UTF-8 (utf8_text): a
    report that quotes file names is then strict JSON and UTF-8 text whatever the names' bytes."""
    if isinstance(value, str):
        return utf8_text(value)
    if isinstance(value, dict):
        return {utf8_text(str(k)): utf8_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [utf8_strings(v) for v in value]
    return value
