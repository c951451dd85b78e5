"""One name per idea across every command (issue 40; facemark/cli_names.py, docs/CLI.md "One name per idea"):
walks every command's options against the naming table, and runs each old spelling once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from facemark.choices import PROVIDERS
from facemark.cli import app, run
from facemark.cli_names import (
    ALIASES_ATTR,
    BATCH_SIZE,
    DEVICE,
    DIR,
    FILE,
    MAX_BATCH_SIZE,
    NAMES,
    OUT_DIR,
    OUTPUT,
    SEED,
    SPLIT_SEED,
    THREADS,
    TRITON_MAX_BATCH_SIZE,
    WORKERS,
    Alias,
    naming_table,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "CLI.md"


def _walk(command, path: tuple[str, ...] = ()):
    for name, sub in (getattr(command, "commands", None) or {}).items():
        yield from _walk(sub, (*path, name))
    if not getattr(command, "commands", None):
        yield " ".join(path), command


COMMANDS = dict(_walk(get_command(app)))


def _callbacks(typer_app: typer.Typer, path: tuple[str, ...] = ()):
    """command path -> the Python function typer calls (where @renamed keeps the aliases)."""
    for info in typer_app.registered_commands:
        yield " ".join((*path, info.name or info.callback.__name__)), info.callback
    for group in typer_app.registered_groups:
        yield from _callbacks(group.typer_instance, (*path, group.name))


ALIASES: dict[str, tuple[Alias, ...]] = {name: getattr(callback, ALIASES_ATTR, ())
                                         for name, callback in _callbacks(app)}
ALIAS_CASES = [(command, alias) for command, aliases in ALIASES.items() for alias in aliases]


def _visible(command) -> dict[str, object]:
    """flag -> option, for every option --help shows."""
    return {flag: p for p in command.params if p.param_type_name == "option" and not p.hidden
            for flag in (*p.opts, *p.secondary_opts)}


def _flags(idea) -> set[str]:
    return {flag for name in idea.names for flag in name.split("/")}


def test_every_command_is_walked_and_has_its_callback():
    assert {"train", "evaluate", "export", "bench", "serve", "runtime predict", "runtime video",
            "detectors calibrate", "detectors boxes", "web"} <= set(COMMANDS)
    assert set(ALIASES) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_no_old_name_is_visible(name):
    """An old spelling is hidden wherever it is not a name of the table for that command (train's --seed is)."""
    names_here = {flag for idea in NAMES if name in idea.commands for flag in _flags(idea)}
    old = {o.flag for idea in NAMES for o in idea.old} - names_here
    assert not old & set(_visible(COMMANDS[name])), f"{name} shows an old name"


# A flag matching a pattern speaks of that idea, so it must be spelled one of the table's ways.
SPELLINGS = {
    r"provider|device|gpu": {DEVICE},
    r"thread": {THREADS},
    r"worker|decoder|process|-actors?$": {WORKERS},
    r"batch": {BATCH_SIZE, MAX_BATCH_SIZE, TRITON_MAX_BATCH_SIZE},
    r"^--out|^-o$|output": {*OUTPUT, OUT_DIR},
    r"seed": {SEED, SPLIT_SEED},
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_idea_has_one_spelling(name):
    for flag in _visible(COMMANDS[name]):
        for pattern, allowed in SPELLINGS.items():
            if re.search(pattern, flag):
                assert flag in allowed, f"{name} {flag}: spell it {' or '.join(sorted(allowed))}"


def _choices(option) -> set[str]:
    return {member.value for member in option.type_descriptor.annotation}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_name_means_one_thing(name):
    """-o is always --output, a FILE; --out-dir and --aligned always a DIR; the per-format outputs FILEs;
    --device of the runtime commands takes the runtime's hardware."""
    visible = _visible(COMMANDS[name])
    for flag, option in visible.items():
        if flag in OUTPUT:
            assert option.opts == list(OUTPUT) and option.metavar == FILE, f"{name} {flag}"
        if flag in (OUT_DIR, "--aligned"):
            assert option.metavar == DIR, f"{name} {flag}"
        if flag in ("--json", "--jsonl", "--csv", "--parquet", "--plot"):
            assert option.metavar == FILE, f"{name} {flag}"
    if DEVICE in visible and name not in ("train", "bench"):
        assert _choices(visible[DEVICE]) == set(PROVIDERS), name
    if name == "train":
        assert _choices(visible[DEVICE]) == {"auto", "cpu", "cuda"}
    if name == "bench":
        assert visible[DEVICE].multiple


@pytest.mark.parametrize("idea", NAMES, ids=lambda idea: idea.idea)
def test_the_table_lists_the_commands_that_take_each_name(idea):
    taking = {name for name, command in COMMANDS.items() if _flags(idea) & set(_visible(command))}
    assert taking == set(idea.commands)


def test_the_tables_old_names_are_the_aliases_in_the_code():
    idea_of = {flag: idea for idea in NAMES for flag in _flags(idea)}
    in_code = {(command, a.flag, idea_of[a.new].idea) for command, a in ALIAS_CASES}
    in_table = {(command, o.flag, idea.idea) for idea in NAMES for o in idea.old for command in o.commands}
    assert in_code == in_table


def test_docs_carry_the_naming_table():
    assert naming_table() in DOCS.read_text(encoding="utf-8")


# What each kind of alias is given, and the arguments each command needs besides (no file is read: the body is
# replaced).
VALUES = {"device": "cpu", "out": "x.json", "out_dir": "x.json", "batch_size": "4", "batch_sizes": "4",
          "max_batch_size": "4", "triton_max_batch_size": "4", "workers": "4", "split_seed": "4"}
NEEDED = {"runtime predict": ["a.jpg"], "runtime video": ["a.mp4"], "export": ["best.pt"],
          "evaluate": ["--model", "m.onnx", "--data", "d"], "detectors calibrate": ["scrfd", "--data", "d"],
          "detectors boxes": ["--data", "d"]}


def _text(err: str) -> str:
    """stderr without the error panel's frame and wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", err).split())


def _plain(value: object) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(_plain, value))
    return str(getattr(value, "value", value))


@pytest.fixture()
def recorded(monkeypatch):
    """The commands' bodies replaced by a recorder of the values they get."""
    calls: list[dict] = []
    for _name, callback in _callbacks(app):
        if getattr(callback, ALIASES_ATTR, ()):
            monkeypatch.setattr(callback, "__wrapped__", lambda **values: calls.append(values))
    return calls


@pytest.mark.parametrize(("command", "alias"), ALIAS_CASES, ids=lambda c: c if isinstance(c, str) else c.flag)
def test_an_old_name_still_works_and_prints_one_deprecation_line(command, alias, recorded, capsys):
    value = VALUES[alias.target]
    assert run([*command.split(), *NEEDED.get(command, []), alias.flag, value]) == 0
    assert capsys.readouterr().err.splitlines() == [f"warning: {alias.flag} is deprecated: use {alias.new}"]
    assert len(recorded) == 1 and _plain(recorded[0][alias.target]) == value


@pytest.mark.parametrize(("command", "alias"), ALIAS_CASES, ids=lambda c: c if isinstance(c, str) else c.flag)
def test_an_old_name_and_its_new_one_together_are_refused(command, alias, recorded, capsys):
    value = VALUES[alias.target]
    assert run([*command.split(), *NEEDED.get(command, []), alias.new, value, alias.flag, value]) == 2
    assert f"{alias.new} and {alias.flag} set the same option" in _text(capsys.readouterr().err)
    assert not recorded


def test_an_old_name_reaches_the_checks_of_its_new_one(capsys):
    """End to end, nothing replaced: --provider counts as a --device given, which --server refuses."""
    assert run(["runtime", "predict", "missing.jpg", "--provider", "cpu", "--server", "http://127.0.0.1:9"]) == 2
    err = _text(capsys.readouterr().err)
    assert "warning: --provider is deprecated: use --device" in err and "--device: set on the server" in err
