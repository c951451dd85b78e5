"""The `facemark` command. Thin: parse, call a typed library function, print.

Stage commands live in each stage's `cli` module, which imports nothing heavy at module level, so
`facemark runtime predict` starts without torch installed; the stage itself is imported when its command runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
import typer
from rich.console import Console

from facemark.errors import FacemarkError

app = typer.Typer(
    name="facemark",
    help="68-point face landmarks: train, export to ONNX, run torch-free, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """68-point face landmarks: train, export to ONNX, run torch-free, benchmark."""


def _register() -> None:
    # One line per stage; each stage's cli module is light (typer + core only).
    from facemark import evaluate_cli
    from facemark.train import cli as train_cli

    app.command("train")(train_cli.train_command)
    app.command("evaluate")(evaluate_cli.evaluate_command)
    # -- stage registrations (export, runtime, bench) below --


_register()


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code; a FacemarkError becomes one line on stderr (exit 2)."""
    try:
        result = app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except FacemarkError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    return result if isinstance(result, int) else 0


def main() -> None:
    sys.exit(run())
