"""Every command's --help reads in an 80-column terminal (issue 40): each option name and default whole, no line
wider than the terminal, flags without a value placeholder, help text kept as written (no markup eating
`facemark[serve]`), hidden aliases absent, and every option in one of the named panels (facemark.cli_help)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from facemark.cli import app, run


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(typer.main.get_command(app)))
PATHS = sorted(COMMANDS, key=" ".join)


def render_help(path: tuple[str, ...], capsys, monkeypatch, columns: int = 80) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    assert run([*path, "--help"]) == 0
    return capsys.readouterr().out


def visible_options(command) -> list:
    return [p for p in command.params if p.param_type_name == "option" and not p.hidden]


def whole(name: str) -> re.Pattern:
    """`name` as a whole option name or word: --min-face matches, --min-face-windows and --min-fac do not."""
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "facemark")
def test_help_fits_80_columns_with_every_option_name_whole(path, capsys, monkeypatch):
    command = COMMANDS[path]
    page = render_help(path, capsys, monkeypatch)
    lines = page.splitlines()
    wide = [line for line in lines if len(line) > 80]
    assert not wide, f"lines wider than 80 columns: {wide}"
    assert "\u2026" not in page, "an ellipsis: something was cut"
    assert "<bool>" not in page and "BOOLEAN" not in page, "a flag shows a value placeholder"
    for option in visible_options(command):
        for name in (*option.opts, *option.secondary_opts):
            assert any(whole(name).search(line) for line in lines), f"{name} is not whole on any line"
        if option.is_flag:  # `--pose`, `--smooth / --no-smooth`: never `--pose <bool>` or `--pose BOOLEAN`
            for name in (*option.opts, *option.secondary_opts):
                term = next(line for line in lines if line.lstrip().startswith("-") and whole(name).search(line))
                after = term[whole(name).search(term).end():]
                assert not re.match(r" (<\w+>|[A-Z]{2,})", after), f"flag {name} shows a value: {term!r}"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "facemark")
def test_help_shows_defaults_and_help_text_as_written(path, capsys, monkeypatch):
    command = COMMANDS[path]
    text = flat(render_help(path, capsys, monkeypatch))
    tokens = set(text.split())
    written = [command.help or ""] + [p.help or "" for p in command.params if not getattr(p, "hidden", False)]
    for help_text in written:  # every word of every help string, brackets included: nothing eaten or cut
        body = help_text.partition("\f")[0]
        missing = [word for word in body.split() if word not in tokens]
        assert not missing, f"help words missing from the page: {missing}"
    for option in visible_options(command):
        default = option.default
        if option.is_flag or default is None or default == [] or option.required:
            continue
        values = default if isinstance(default, list | tuple) else [default]
        for value in values:
            shown = Path(value).name if isinstance(value, Path) else str(getattr(value, "value", value))
            assert re.search(rf"\[default: ([^\]]*[ /])?{re.escape(shown)}[;,\]]", text), \
                f"{option.opts[0]}: default {shown!r} not shown whole"
    for option in (p for p in command.params if p.param_type_name == "option" and p.hidden):
        for name in (*option.opts, *option.secondary_opts):
            if not any(name in (*p.opts, *p.secondary_opts) for p in visible_options(command)):
                assert not whole(name).search(text), f"hidden option {name} appears in the help"


def test_markup_does_not_eat_bracketed_text(capsys, monkeypatch):
    assert "facemark[serve]" in render_help((), capsys, monkeypatch), "the root help lists serve's extra"
    assert "facemark[serve]" in render_help(("serve",), capsys, monkeypatch)


def test_narrow_terminal_still_keeps_lines_and_names_whole(capsys, monkeypatch):
    page = render_help(("runtime", "predict"), capsys, monkeypatch, columns=60)
    assert max(map(len, page.splitlines())) <= 60
    assert whole("--detector-input-side").search(page) and whole("--min-detector-score").search(page)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "facemark")
def test_every_option_has_a_panel(path, capsys, monkeypatch):
    from facemark.cli_help import PANELS, option_name, panel_of

    command = COMMANDS[path]
    unassigned = [p.opts[0] for p in visible_options(command) if panel_of(" ".join(path), option_name(p)) is None]
    assert not unassigned, f"options in no panel of facemark.cli_help.PANEL_MEMBERS: {unassigned}"
    section = None
    for line in render_help(path, capsys, monkeypatch).splitlines():
        if re.fullmatch(r"[A-Z][\w ]*:", line):
            section = line[:-1]
        elif section is not None and line.startswith("  -"):  # an option's term (its help is indented further)
            assert section in PANELS, f"{line.strip()} is under {section!r}, not a panel"


def test_panel_table_names_only_panels_and_real_commands():
    from facemark.cli_help import COMMAND_PANELS, PANEL_MEMBERS, PANELS

    assert set(PANEL_MEMBERS) <= set(PANELS)
    assert all(set(changes.values()) <= set(PANELS) for changes in COMMAND_PANELS.values())
    assert set(COMMAND_PANELS) <= {" ".join(p) for p in PATHS}



def test_the_installed_command_prints_the_same_page():
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "facemark", "runtime", "predict", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Usage: ") and max(map(len, lines)) <= 80
    assert any(whole("--min-detector-score").search(line) for line in lines)
