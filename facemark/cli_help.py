"""The `--help` pages of every facemark command: plain text that reads in an 80-column terminal.

Typer's rich help boxes every option in a table whose columns cut long option names and defaults at 80
columns, shows `<bool>` after every flag and reads help text as markup (`facemark[serve]` lost its
`[serve]`). This formatter prints each option as `-m, --model PATH` beside (or, when long, above) its help,
wrapped at the terminal's width without ever breaking an option name or a default, flags without a value
placeholder, every help string as plain text, and the options grouped in panels.

The panels are named once (PANELS) and every option's panel is set here, by option name (PANEL_MEMBERS, which
also orders each panel), with the few names whose meaning differs between commands set per command
(COMMAND_PANELS); tests/test_cli_help.py fails on an option that no panel holds. `use_plain_help(app)`, called
once at the root (facemark/cli.py), gives every command these pages; errors keep typer's own display.
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

import typer
from typer.core import TyperCommand, TyperGroup

INPUT = "Input"
OUTPUT = "Output"
MODEL = "Model and hardware"
DETECTOR = "Detector"
LANDMARKS = "Landmark pipeline"
TRAINING = "Training"
AUGMENTATION = "Augmentation"
SERVER = "Server"
RUN = "Run"
GENERAL = "Options"  # --help and --version
PANELS = (INPUT, OUTPUT, MODEL, DETECTOR, LANDMARKS, TRAINING, AUGMENTATION, SERVER, RUN, GENERAL)

# Each panel's options by option name (its first long flag without the dashes, `-` as `_`: `--out-dir` is
# out_dir; docs/CLI.md's naming table), in the order they print: an option has the same place in every command.
PANEL_MEMBERS: dict[str, tuple[str, ...]] = {
    # what the command reads
    INPUT: ("data", "val_data", "calib_data", "checkpoint", "split", "val_fraction", "split_seed", "max_images",
            "max_file_mb", "max_frames", "first_pass_boxes", "node_modules"),
    # what it writes
    OUTPUT: ("out", "out_dir", "output", "exist_ok", "json", "jsonl", "csv", "parquet", "plot", "draw", "aligned",
             "aligned_size", "aligned_template", "pose", "resume", "force", "precision", "int8_activations", "opset"),
    # the model and where it runs
    MODEL: ("model", "device", "threads", "instances", "batch_size", "trt_fp16", "trt_cache", "amp"),
    # the face detector (and the video tracker's detector schedule)
    DETECTOR: ("boxes", "calibrated", "detector", "min_face", "max_side", "min_face_windows", "scale_factor",
               "min_neighbors", "cascade", "octaves", "min_detector_score", "detector_input_side", "detect_every",
               "full_scan_every"),
    # what the landmark stage does with each face
    LANDMARKS: ("preset", "refine", "tta", "min_score", "max_faces", "smooth"),
    # train's run, network, optimisation and validation
    TRAINING: ("resume", "init", "epochs", "batch_size", "image_size", "head", "pip_stride", "presence", "loss",
               "optimizer", "lr", "schedule", "ema", "amp", "seed", "val_boxes", "teacher", "distill"),
    # train's augmentation
    AUGMENTATION: ("rotate", "flip", "zoom", "shift", "detector_boxes", "blur", "motion_blur", "occlusion"),
    # serve's network and request limits; export's Triton model repository
    SERVER: ("host", "http_port", "grpc_port", "metrics_port", "max_batch_size", "max_images", "max_request_mb",
             "max_megapixels", "grace", "triton_repo", "triton_max_batch_size", "triton_kind", "triton_tensorrt"),
    # how the run goes: parallelism, remote execution, checks, console output
    RUN: ("workers", "actors", "server", "wait", "timeout", "ray", "quick", "no_pipeline", "no_peer",
          "serve", "serve_requests", "serve_clients", "serve_damaged_every", "verify", "force", "progress",
          "verbose"),
    GENERAL: ("version", "help"),
}
# A name's panel when the command does not say otherwise: the first panel that lists it.
PANEL_OF: dict[str, str] = {}
for _panel, _names in PANEL_MEMBERS.items():
    for _name in _names:
        PANEL_OF.setdefault(_name, _panel)
# Names whose panel depends on the command (its path below `facemark`).
COMMAND_PANELS: dict[str, dict[str, str]] = {
    "train": {"batch_size": TRAINING, "resume": TRAINING, "amp": TRAINING, "max_images": INPUT},
    "export": {"batch_size": OUTPUT},  # the exported file's batch dimension
    "serve": {"max_images": SERVER},
    "detectors fetch": {"force": RUN},
}

TERM_COLUMN_MAX = 28  # widest option column beside the help; longer terms get a line of their own
INDENT = "  "


def option_name(param) -> str:
    """The name the panels know an option by: its first long flag, `--out-dir` -> out_dir (else its parameter)."""
    flag = next((opt for opt in param.opts if opt.startswith("--")), None)
    return flag[2:].replace("-", "_") if flag else param.name


def panel_of(command_path: str, name: str) -> str | None:
    """The panel of option `name` (option_name) in the command `command_path` ("runtime predict"); None: none."""
    return COMMAND_PANELS.get(command_path, {}).get(name) or PANEL_OF.get(name)


def _place(panel: str, name: str) -> int:
    """Where `name` prints within `panel` (unlisted names last, in the command's order)."""
    members = PANEL_MEMBERS.get(panel, ())
    return members.index(name) if name in members else len(members)


# --- one option's help record ---------------------------------------------------------------------------------
def _type_label(param) -> str:
    """PATH, INTEGER, FLOAT, TEXT or the choices `[a|b|c]` (typer's vendored click, or click for typer < 0.20)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:  # click's ParamType
        choices = getattr(param.type, "choices", None)
        return f"[{'|'.join(map(str, choices))}]" if choices else param.type.name.upper()
    if descriptor.is_choice:
        return "[" + "|".join(str(c.value if isinstance(c, Enum) else c) for c in descriptor.choices) + "]"
    if descriptor.is_path:
        return descriptor.path_type.upper()
    annotation = descriptor.annotation.__args__[0] if descriptor.is_list else descriptor.annotation
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "PATH"
    return {int: "INTEGER", float: "FLOAT"}.get(annotation, "TEXT")


def _is_flag(param) -> bool:
    return bool(getattr(param, "is_flag", False) or getattr(param, "count", False))


def option_term(param) -> str:
    """`-m, --model PATH`; `--smooth / --no-smooth`; `--pose` (a flag takes no value)."""
    if param.param_type_name == "argument":
        return (param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else "")
    names = ", ".join(sorted(param.opts, key=lambda opt: opt.startswith("--")))  # -m, --model
    if param.secondary_opts:
        return f"{names} / {', '.join(param.secondary_opts)}"
    return names if _is_flag(param) else f"{names} {param.metavar or _type_label(param)}"


def _shown_path(path: Path) -> str:
    """A default inside the facemark package as `facemark/...` (its install folder varies), others as given."""
    for name, module in list(sys.modules.items()):
        if (name == "facemark" or name.startswith("facemark.")) and getattr(module, "__path__", None):
            folder = Path(module.__path__[0])
            if path.parent == folder:
                return "/".join([*name.split("."), path.name])
    return str(path)


def default_text(param, ctx) -> str | None:
    """The default as the user would type it; None when there is nothing worth showing."""
    show = getattr(param, "show_default", True)
    if isinstance(show, str):
        return show
    if show is False or param.param_type_name == "argument" and param.required:
        return None
    default = param.get_default(ctx, call=False) if hasattr(param, "get_default") else param.default
    if callable(default):
        return "(dynamic)"
    if _is_flag(param):  # the flag that gives the default: --smooth, --no-octaves; nothing for an unset --pose
        chosen = param.opts if default else param.secondary_opts
        return next((opt for opt in chosen if opt.startswith("--")), chosen[0]) if chosen else None
    if default is None or default == [] or default == ():
        return None
    values = default if isinstance(default, list | tuple) else [default]
    return ", ".join(_shown_path(v) if isinstance(v, Path) else str(v.value if isinstance(v, Enum) else v)
                     for v in values)


def _number_range(param) -> str | None:
    low = getattr(param, "min", getattr(getattr(param, "type", None), "min", None))
    high = getattr(param, "max", getattr(getattr(param, "type", None), "max", None))
    if getattr(param, "count", False) or (low is None and high is None):
        return None
    return f"x>={low}" if high is None else f"x<={high}" if low is None else f"{low}<=x<={high}"


def option_help(param, ctx) -> tuple[str, str]:
    """(help text, `[default: ...; range; required]`) of one parameter, both plain text."""
    extra = []
    default = default_text(param, ctx)
    if default:
        extra.append(f"default: {default}")
    extra += [text for text in (_number_range(param),) if text]
    help_text = " ".join((getattr(param, "help", None) or "").split())
    if getattr(param, "multiple", False) and param.param_type_name == "option" and "repeatable" not in help_text:
        extra.append("repeatable")
    if param.required:
        extra.append("required")
    return help_text, f"[{'; '.join(extra)}]" if extra else ""


# --- layout ---------------------------------------------------------------------------------------------------
def wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` characters, never breaking a word, an option name (--min-face) or a path."""
    return textwrap.wrap(text, max(width, 1), break_long_words=False, break_on_hyphens=False) or [""]


def _help_lines(help_text: str, extra: str, width: int) -> list[str]:
    """The help wrapped, then `[default: ...]` on its last line or, when it does not fit there, its own."""
    lines = wrap(help_text, width) if help_text else []
    if not extra:
        return lines or [""]
    if lines and len(lines[-1]) + 1 + len(extra) <= width:
        lines[-1] += " " + extra
    else:
        lines += [extra] if len(extra) <= width else wrap(extra, width)
    return lines


def term_column(rows: Iterable[tuple[str, str, str]], width: int) -> int:
    """Where the help column starts: after the widest term that fits beside its help (one column per page;
    at most a third of the width, so that a narrow terminal keeps room for the help)."""
    widest = min(TERM_COLUMN_MAX, width // 3)
    fitting = [len(term) for term, _, _ in rows if len(term) <= widest]
    return len(INDENT) + (max(fitting) if fitting else widest) + 2


def definition_rows(rows: list[tuple[str, str, str]], width: int, column: int) -> list[str]:
    """Rows of (term, help, extra) as two columns: the help beside the term, or below it when the term is wide;
    a help with a word too long for its column (a file name) starts on the next line, less indented."""
    lines: list[str] = []
    for term, help_text, extra in rows:
        body = _help_lines(help_text, extra, width - column)
        indent = column
        if max(map(len, body)) > width - column:
            indent = 3 * len(INDENT)
            body = _help_lines(help_text, extra, width - indent)
        if indent == column and len(INDENT) + len(term) + 2 <= column:
            lines.append(f"{INDENT}{term}".ljust(column) + body[0])
            body = body[1:]
        else:
            lines.append(f"{INDENT}{term}")
        lines += [" " * indent + line for line in body if line]
    return lines


def paragraphs(text: str, width: int) -> list[str]:
    """A docstring as wrapped paragraphs (blank lines part them; the text before a form feed only)."""
    text = inspect.cleandoc(text).partition("\f")[0]
    lines: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        if lines:
            lines.append("")
        lines += [INDENT + line for line in wrap(" ".join(paragraph.split()), width - len(INDENT))]
    return lines


def first_sentence(text: str) -> str:
    """The help up to its first full stop outside parentheses: a command's line in its group's list."""
    flat = " ".join(inspect.cleandoc(text).partition("\f")[0].split())
    depth = 0
    for i, char in enumerate(flat):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "." and depth == 0 and (i + 1 == len(flat) or flat[i + 1] == " "):
            return flat[:i + 1]
    return flat


def command_path(ctx) -> str:
    """The command's path below the root: "runtime predict" (whatever the program is called)."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(reversed(names))


def _usage(command, ctx, width: int) -> list[str]:
    pieces = ["[OPTIONS]"]
    for param in command.get_params(ctx):
        if param.param_type_name == "argument":
            name = option_term(param)
            pieces.append(name if param.required else f"[{name}]")
    if isinstance(command, TyperGroup):
        pieces.append("COMMAND [ARGS]...")
    prefix = f"Usage: {ctx.command_path} "
    body = wrap(" ".join(pieces), width - len(prefix))
    return [prefix + body[0], *(" " * len(prefix) + line for line in body[1:])]


def help_page(command, ctx, width: int) -> list[str]:
    """Every line of the command's help page."""
    lines = _usage(command, ctx, width)
    if command.help:
        lines += ["", *paragraphs(command.help, width)]
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
    arguments = [(option_term(p), *option_help(p, ctx)) for p in params if p.param_type_name == "argument"]
    sections: list[tuple[str, list[tuple[str, str, str]]]] = [("Arguments", arguments)] if arguments else []
    path = command_path(ctx)
    by_panel: dict[str, list] = {}
    for param in params:
        if param.param_type_name == "option":
            by_panel.setdefault(panel_of(path, option_name(param)) or GENERAL, []).append(param)
    for panel in (p for p in PANELS if p in by_panel):  # sorted is stable: unlisted names keep their order
        ordered = sorted(by_panel[panel], key=lambda param: _place(panel, option_name(param)))
        sections.append((panel, [(option_term(param), *option_help(param, ctx)) for param in ordered]))
    if isinstance(command, TyperGroup):
        listed = [(name, command.get_command(ctx, name)) for name in command.list_commands(ctx)]
        sections.append(("Commands", [(name, sub.short_help or first_sentence(sub.help or ""), "")
                                      for name, sub in listed if sub is not None and not sub.hidden]))
    column = term_column((row for _, rows in sections for row in rows), width)
    for title, rows in sections:
        lines += ["", f"{title}:", *definition_rows(rows, width, column)]
    return lines


def format_help(command, ctx, formatter) -> None:
    """Write the page into click's formatter, at its width (the terminal's, at most 78 columns)."""
    for line in help_page(command, ctx, formatter.width):
        formatter.write(line.rstrip() + "\n")


class _PlainHelp:
    """This module's help page and usage line for a typer command or group."""

    def format_help(self, ctx, formatter) -> None:
        format_help(self, ctx, formatter)

    def format_usage(self, ctx, formatter) -> None:  # also the first line of a usage error
        for line in _usage(self, ctx, formatter.width):
            formatter.write(line + "\n")

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            typer.echo(ctx.get_help())  # as typer's rich help did: the page on stdout, exit code 2
            ctx.exit(2)
        return super().parse_args(ctx, args)


class PlainHelpCommand(_PlainHelp, TyperCommand):
    """A typer command with this module's help page."""


class PlainHelpGroup(_PlainHelp, TyperGroup):
    """A typer group with this module's help page (its commands listed by their first sentence)."""


def use_plain_help(app: typer.Typer) -> None:
    """Give `app`, its commands and its sub-apps (recursively) this module's help pages: one call at the root."""
    app.info.cls = PlainHelpGroup
    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):  # typer's default: a command class of its own is kept
            command.cls = PlainHelpCommand
    for group in app.registered_groups:
        group.cls = PlainHelpGroup
        use_plain_help(group.typer_instance)


def walk(command, path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], object]]:
    """(path below the root, command) of `command` and every command below it."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, (*path, name))
