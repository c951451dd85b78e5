"""The `facemark` command. Thin: parse, call a typed library function, print.

Stage commands live in each stage's `cli` module, which imports nothing heavy at module level, so
`facemark runtime predict` starts without torch installed; the stage itself is imported when its command runs.
"""

from __future__ import annotations

import errno
import sys
import warnings
from collections.abc import Sequence

import typer
from rich.console import Console
from rich.markup import escape  # messages hold paths and hints like facemark[serve]: text, not markup

from facemark.choices import choice_enum
from facemark.cli_help import use_plain_help
from facemark.errors import FacemarkError, ModelWarning, cli_message, missing_extra_message, printable
from facemark.fileio import write_error
from facemark.runtime.schema import SCHEMA_NAMES

# The errors of a write the machine refused: one line and exit 2, like any FacemarkError, never a traceback.
WRITE_FAILURES = {errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EPERM}
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    name="facemark",
    help="68-point face landmarks: train, export to ONNX, run torch-free, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings=HELP_OPTIONS,
)
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from facemark import __version__

        print(f"facemark {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """68-point face landmarks: train, export to ONNX, run torch-free, benchmark."""


def _register() -> None:
    # Each stage's cli module is light (typer + core only); the stage itself loads when its command runs.
    from facemark import evaluate_cli
    from facemark.benchmarks import cli as bench_cli
    from facemark.export import cli as export_cli
    from facemark.runtime import cli as runtime_cli
    from facemark.runtime import detectors_cli
    from facemark.train import cli as train_cli
    from facemark.web import cli as web_cli

    app.command("train")(train_cli.train_command)
    app.command("evaluate")(evaluate_cli.evaluate_command)
    app.command("export")(export_cli.export_command)
    app.add_typer(runtime_cli.app, name="runtime")
    app.add_typer(detectors_cli.app, name="detectors")
    app.command("bench")(bench_cli.bench_command)
    app.command("serve")(runtime_cli.serve_command)
    app.command("schema")(schema_command)
    app.command("web")(web_cli.web_command)
    use_plain_help(app)  # help pages that read at 80 columns (facemark.cli_help)


SchemaName = choice_enum("SchemaName", SCHEMA_NAMES)


def schema_command(name: SchemaName = typer.Argument("predict", help="predict (the JSON document), "
                                                     "image (a predict --jsonl line), video (a video --jsonl line) "
                                                     "or video-document (the video --json document)."
                                                     )) -> None:
    """Print the JSON Schema of facemark's JSON output."""
    from facemark.runtime.schema import schema_text

    sys.stdout.write(schema_text(name.value))


_register()


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code; a FacemarkError becomes one line on stderr (exit 2)."""
    warnings.showwarning = _show_warning
    try:
        app(args=list(argv) if argv is not None else None, prog_name="facemark")
    except SystemExit as exc:  # typer's standalone mode ends every run this way
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except FacemarkError as exc:
        print_error(cli_message(exc))  # settings named as flags, not as Python keywords
        return 2
    except OSError as exc:
        if exc.errno not in WRITE_FAILURES:
            raise
        print_error(str(write_error(exc.filename or "output", exc)))  # a write outside facemark.fileio's helpers
        return 2
    except ModuleNotFoundError as exc:  # a command of an extra that this install lacks
        message = missing_extra_message(exc)
        if message is None:
            raise
        print_error(message)
        return 2
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A ModelWarning (facemark.errors) is one line for a CLI user, not a file name and a code line."""
    if issubclass(category, ModelWarning):
        err_console.print(f"[yellow]warning:[/yellow] {escape(printable(str(message)))}", highlight=False,
                          soft_wrap=True)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def print_error(message: str) -> None:
    err_console.print(f"[red]error:[/red] {escape(printable(message))}", highlight=False, soft_wrap=True)


def main() -> None:
    sys.exit(run())
