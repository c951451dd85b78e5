"""Command-line flags made from the runtime's option dataclasses (facemark.runtime.options; docs/DESIGN.md
section 7): a command declares a parameter `detection: DetectorOptions` and/or `pipeline: PipelineOptions`,
`@with_options` replaces it with one flag per field (the field's `metadata["cli"]`) and hands the command the
built dataclass. `runtime predict`, `runtime video`, `evaluate` and `serve` so share every declaration; a
PipelineOptions parameter also brings `--preset fast|default|accurate` (flags given explicitly win over it).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import fields
from enum import Enum

import typer

from facemark.choices import choice_enum
from facemark.errors import cli_message
from facemark.runtime.detectors import HAAR
from facemark.runtime.options import PRESET_HELP, PRESETS, DetectorOptions, PipelineOptions

OPTION_CLASSES = (DetectorOptions, PipelineOptions)
PresetChoice = choice_enum("PresetChoice", tuple(PRESETS))
CTX = "_options_context"


def _flag_parameters(cls: type) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(cls)
    params = []
    for f in fields(cls):
        if "cli" not in f.metadata:
            continue
        spec = dict(f.metadata["cli"])
        decls, help_text, choices = spec.pop("decls"), spec.pop("help"), spec.pop("choices", None)
        annotation = choice_enum(f"{cls.__name__}_{f.name}", choices) if choices else hints[f.name]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(f.default, decls, help=help_text, **spec)))
    return params


def _plain(value: object) -> object:
    return value.value if isinstance(value, Enum) else value


def given(ctx: typer.Context, names: tuple[str, ...] | list[str]) -> list[str]:
    """The options among `names` that the command line (or the environment) set, not their defaults."""
    sources = {n: ctx.get_parameter_source(n) for n in names}
    return [n for n, source in sources.items() if source is not None and source.name != "DEFAULT"]


def flags_text(names: list[str]) -> str:
    """Parameter names as the flags a user typed: ["min_face", "tta"] -> "--min-face, --tta"."""
    return ", ".join("--" + n.replace("_", "-") for n in names)


def option_names(*classes: type) -> tuple[str, ...]:
    """The parameter names @with_options makes for `classes` (with --preset for PipelineOptions)."""
    return tuple(n for cls in classes for n in (*(f.name for f in fields(cls) if "cli" in f.metadata),
                                                *(("preset",) if cls is PipelineOptions else ())))


def build_options(ctx: typer.Context, cls: type, values: dict[str, object], preset: str | None = None):
    """The dataclass from the flags' values (a bad combination is one typer.BadParameter line)."""
    names = [f.name for f in fields(cls) if "cli" in f.metadata]
    try:
        built = cls(**{n: _plain(values.pop(n)) for n in names})
        clash = given(ctx, DetectorOptions.HAAR_ONLY) if cls is DetectorOptions else []
        if clash and built.detector != HAAR:
            raise typer.BadParameter(f"{flags_text(clash)}: Haar options, not for --detector {built.detector}")
        return built.with_preset(preset, keep=set(given(ctx, names)))  # a preset may set fields of both classes
    except ValueError as exc:
        raise typer.BadParameter(cli_message(exc)) from None


def with_options(command: Callable) -> Callable:
    """Replace the command's DetectorOptions / PipelineOptions parameters by their flags (module doc)."""
    signature = inspect.signature(command)
    hints = typing.get_type_hints(command)
    taken = {name: hints[name] for name in signature.parameters if hints.get(name) in OPTION_CLASSES}
    params = [p.replace(annotation=hints.get(name, p.annotation)) for name, p in signature.parameters.items()
              if name not in taken]
    own_ctx = next((p.name for p in params if p.annotation is typer.Context), None)
    if own_ctx is None:  # the wrapper needs the context (which flags were given): a parameter of its own
        params.insert(0, inspect.Parameter(CTX, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context))
    for cls in taken.values():
        params += _flag_parameters(cls)
        if cls is PipelineOptions:
            params.append(inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, annotation=PresetChoice | None,
                                            default=typer.Option(None, "--preset", help=PRESET_HELP)))

    @functools.wraps(command)
    def wrapper(**values):
        ctx = values[own_ctx] if own_ctx else values.pop(CTX)
        preset = _plain(values.pop("preset", None))
        for name, cls in taken.items():
            values[name] = build_options(ctx, cls, values, preset)
        return command(**values)

    wrapper.__signature__ = signature.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
