"""One name per idea across every command (issue 40; docs/CLI.md, "One name per idea").

`NAMES` is the vocabulary: for each idea the flag that spells it, the commands that take it and the old spellings
still accepted. `renamed` keeps a command's old spellings working: each becomes a hidden option of the same type,
which hands its value to the new parameter and prints one deprecation line on stderr; giving both is one error
line. tests/test_cli_names.py walks every command against this table and docs/CLI.md's copy of it.
Light at import (typer only), like every cli module.
"""

from __future__ import annotations

import copy
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass

import typer

DEVICE = "--device"
THREADS = "--threads"
WORKERS = "--workers"
BATCH_SIZE = "--batch-size"
MAX_BATCH_SIZE = "--max-batch-size"
TRITON_MAX_BATCH_SIZE = "--triton-max-batch-size"
OUTPUT = ("-o", "--output")  # always a FILE
OUT_DIR = "--out-dir"  # always a folder
SPLIT_SEED = "--split-seed"
SEED = "--seed"
FILE, DIR = "FILE", "DIR"  # the metavars of output files and folders


@dataclass(frozen=True)
class Old:
    """An old spelling and the commands where it was the name."""

    flag: str
    commands: tuple[str, ...]


@dataclass(frozen=True)
class Idea:
    idea: str
    names: tuple[str, ...]  # the flags that spell it (an alias pair such as -o/--output counts as one name)
    commands: tuple[str, ...]
    old: tuple[Old, ...] = ()
    note: str = ""  # what the values are, where they differ by command


PREDICT, VIDEO, SERVE, EVALUATE = "runtime predict", "runtime video", "serve", "evaluate"
TRAIN, EXPORT, BENCH = "train", "export", "bench"
CALIBRATE, BOXES = "detectors calibrate", "detectors boxes"

NAMES: tuple[Idea, ...] = (
    Idea("where the model runs (hardware)", (DEVICE,), (TRAIN, EVALUATE, BENCH, PREDICT, VIDEO, SERVE),
         (Old("--provider", (EVALUATE, PREDICT, VIDEO, SERVE)), Old("-p", (PREDICT, VIDEO, SERVE)),
          Old("--providers", (BENCH,))),
         "auto, cpu, cuda or tensorrt; train: auto, cpu or cuda; bench: repeatable or a comma list"),
    Idea("CPU threads of the model (ONNX Runtime intra-op)", (THREADS,), (BENCH, PREDICT, VIDEO, SERVE),
         note="N; bench: a comma list of thread budgets; predict --ray: CPUs per Ray actor"),
    Idea("parallel workers of a command's input pipeline", (WORKERS,), (TRAIN, PREDICT, SERVE),
         (Old("--decoders", (SERVE,)),),
         "N: train's data loader processes, predict's decode/detect/write threads (with --ray: its Ray actors), "
         "serve's upload decoder processes"),
    Idea("fixed batch size", (BATCH_SIZE,), (TRAIN, EVALUATE, EXPORT, BENCH),
         (Old("--batch", (EXPORT,)), Old("--batch-sizes", (BENCH,))),
         "N; export: dynamic or N; bench: a comma list of sizes"),
    Idea("ceiling of a dynamic batcher (Triton max_batch_size)", (MAX_BATCH_SIZE, TRITON_MAX_BATCH_SIZE),
         (SERVE, EXPORT), (Old("--max-batch", (SERVE,)), Old("--triton-max-batch", (EXPORT,))), "N"),
    Idea("an output file", ("/".join(OUTPUT),), (EXPORT, VIDEO, CALIBRATE, BOXES),
         (Old("--out", (VIDEO, CALIBRATE, BOXES)),),
         "FILE: export's model, video's annotated .mp4, the detectors' JSON"),
    Idea("an output folder", (OUT_DIR,), (TRAIN, BENCH, PREDICT),
         (Old("--out", (TRAIN, BENCH, PREDICT)), Old("-o", (PREDICT,))),
         "DIR: train's run folder, bench's report folder, predict's annotated pictures"),
    Idea("one output per format", ("--json", "--jsonl", "--csv", "--parquet", "--plot", "--aligned"),
         (EVALUATE, PREDICT, VIDEO), note="FILE (- for stdout where it makes sense); --aligned: a DIR of aligned "
         "face crops"),
    Idea("the validation split's seed", (SPLIT_SEED,), (TRAIN, EVALUATE, CALIBRATE),
         (Old("--seed", (EVALUATE,)),), "N"),
    Idea("training randomness (initialisation, augmentation, batch order)", (SEED,), (TRAIN,), note="N"),
)


def naming_table() -> str:
    """NAMES as the Markdown table docs/CLI.md carries (a test keeps the two the same)."""
    rows = ["| idea | name | commands | values | old names (hidden; each prints one deprecation line) |",
            "|---|---|---|---|---|"]
    for idea in NAMES:
        name = ", ".join(" / ".join(f"`{flag}`" for flag in n.split("/")) for n in idea.names)
        old = "; ".join(f"`{o.flag}` ({', '.join(o.commands)})" for o in idea.old) or "-"
        rows.append(f"| {idea.idea} | {name} | {', '.join(idea.commands)} | {idea.note or '-'} | {old} |")
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class Alias:
    """A hidden old spelling of a command parameter."""

    param: str  # the hidden parameter's name
    flag: str  # the old spelling, e.g. --provider
    target: str  # the parameter it sets, e.g. device
    new: str  # the target's flag, e.g. --device
    required: bool  # the target is required: checked here, as click would refuse the alias alone


ALIASES_ATTR = "__facemark_aliases__"  # the aliases of a command (tests/test_cli_names.py reads them)
_CTX = "_names_context"


def _long_flag(info: typer.models.OptionInfo) -> str:
    decls = [d.split("/")[0] for d in info.param_decls or ()]
    return next((d for d in decls if d.startswith("--")), decls[0])


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def warn_deprecated(flag: str, new: str) -> None:
    """One line on the stderr console of facemark's warnings."""
    from facemark.cli import err_console  # here: facemark.cli imports every command module

    err_console.print(f"[yellow]warning:[/yellow] {flag} is deprecated: use {new}", highlight=False, soft_wrap=True)


def _apply(ctx: typer.Context, values: dict, aliases: tuple[Alias, ...]) -> None:
    """Move each given alias's value to its target (one deprecation line each); both given: one error line."""
    set_by: dict[str, str] = {}
    for alias in aliases:
        value = values.pop(alias.param)
        if not _given(ctx, alias.param):
            continue
        if _given(ctx, alias.target) or alias.target in set_by:
            first = set_by.get(alias.target, alias.new)
            raise typer.BadParameter(f"{first} and {alias.flag} set the same option: give {alias.new} only "
                                     f"({alias.flag} is its old name)")
        warn_deprecated(alias.flag, alias.new)
        values[alias.target] = value
        set_by[alias.target] = alias.flag
        ctx.set_parameter_source(alias.target, ctx.get_parameter_source(alias.param))  # so `given` sees it
    missing = next((a.new for a in aliases if a.required and values[a.target] is None), None)
    if missing is not None:
        raise typer.BadParameter(f"{missing} is required")


def renamed(**old: str | tuple[str, ...]) -> Callable[[Callable], Callable]:
    """`@renamed(device=("--provider", "-p"))`: the command's `device` parameter also answers to --provider and
    -p, hidden from --help, each printing "warning: --provider is deprecated: use --device" (module doc).
    Put it above @with_options."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        hints = typing.get_type_hints(command)
        params = [p.replace(annotation=hints.get(name, p.annotation)) for name, p in signature.parameters.items()]
        by_name = {p.name: p for p in params}
        aliases = []
        for target, flags in old.items():
            info = by_name[target].default
            required = info.default is ...
            if required:  # the new flag or an alias: click alone would ask for the new one
                info = copy.copy(info)
                info.default = None
                by_name[target] = by_name[target].replace(default=info, annotation=by_name[target].annotation | None)
                params = [by_name[target] if p.name == target else p for p in params]
            for flag in (flags,) if isinstance(flags, str) else flags:
                alias = Alias(f"_old_{flag.lstrip('-').replace('-', '_')}", flag, target, _long_flag(info), required)
                hidden = copy.copy(info)
                hidden.default, hidden.default_factory, hidden.param_decls = None, None, (flag,)
                hidden.hidden, hidden.help, hidden.envvar, hidden.callback = True, None, None, None
                params.append(inspect.Parameter(alias.param, inspect.Parameter.KEYWORD_ONLY,
                                                annotation=by_name[target].annotation | None, default=hidden))
                aliases.append(alias)
        own_ctx = next((p.name for p in params if p.annotation is typer.Context), None)
        if own_ctx is None:  # the wrapper needs the context (which flags were given): a parameter of its own
            params.insert(0, inspect.Parameter(_CTX, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                               annotation=typer.Context))

        @functools.wraps(command)
        def wrapper(**values):
            ctx = values[own_ctx] if own_ctx else values.pop(_CTX)
            _apply(ctx, values, tuple(aliases))
            return wrapper.__wrapped__(**values)  # looked up when called: a test may stand in for the body

        wrapper.__signature__ = signature.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        setattr(wrapper, ALIASES_ATTR, tuple(aliases))
        return wrapper

    return decorate
