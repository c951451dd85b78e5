"""docs/CLI.md true to the code (issue 40, item 6): its JSON examples validate against `facemark schema` and hold
what the code really writes for the defaults; the Python signatures it documents have the real defaults; every
command's row names every option the command has, with the defaults the command really uses.

The JSON examples are strict JSON but for one elision: an array written with one item and `...N points]` /
`...N values]` (`[[170.5, 128.2], ...68 points]`) stands for that item N times.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import typer

from facemark.cli import app, run

CLI_MD = Path(__file__).resolve().parents[1] / "docs" / "CLI.md"
ELISION = re.compile(r"\[(\[[^\[\]]*\]|[^\[\],]+),\s*\.\.\.(\d+) \w+\]")


def doc_text() -> str:
    return CLI_MD.read_text(encoding="utf-8")


def json_examples() -> list[dict]:
    """Every ```json block of docs/CLI.md, parsed (elisions expanded)."""
    blocks = re.findall(r"```json\n(.*?)```", doc_text(), flags=re.DOTALL)
    return [json.loads(ELISION.sub(lambda m: "[" + ", ".join([m[1]] * int(m[2])) + "]", block)) for block in blocks]


def schema_of(example: dict) -> str:
    """The `facemark schema` name an example is an instance of, told by its required keys."""
    from facemark.runtime.schema import SCHEMA_NAMES, schema

    fitting = [name for name in SCHEMA_NAMES if set(schema(name).get("required", ())) <= set(example)]
    assert fitting, f"a JSON example of docs/CLI.md is none of {SCHEMA_NAMES}: keys {sorted(example)}"
    return max(fitting, key=lambda name: len(schema(name)["required"]))  # the most specific


def test_the_json_examples_validate_against_facemark_schema(capsys):
    examples = json_examples()
    assert examples, "docs/CLI.md shows the JSON it writes"
    for example in examples:
        name = schema_of(example)
        assert run(["schema", name]) == 0
        printed = json.loads(capsys.readouterr().out)  # what `facemark schema NAME` prints
        jsonschema.Draft202012Validator(printed).validate(example)


def test_the_predict_example_holds_the_real_default_settings_and_the_shipped_models_metadata():
    from facemark.runtime.landmarker import FaceLandmarker

    documents = [e for e in json_examples() if schema_of(e) == "predict"]
    assert documents, "docs/CLI.md shows a runtime predict document"
    real = FaceLandmarker().describe()  # the shipped model with every default, as `runtime predict` runs it
    for example in documents:
        assert example["detector"] == real["detector"], "the documented detector settings are not the defaults"
        assert example["pipeline"] == real["pipeline"]
        shown = {k: v for k, v in example["model"].items() if k not in ("path", "providers")}
        assert shown == {k: v for k, v in real["model"].items() if k not in ("path", "providers")}
        assert example["model"]["path"].endswith("facemark/assets/facemark-68.onnx")


# --- Python signatures -------------------------------------------------------------------------------------------
def documented_signatures() -> Iterator[tuple[str, list[tuple[str, ast.expr | None]]]]:
    """Each signature docs/CLI.md defines: a code span `name(params)` followed by ':' or '->' (a call shown as an
    example is followed by prose), in Python's notation; `...` alone stands for more parameters and `k=...` for a
    default not stated. Yields the name and its (parameter, documented default or None) pairs."""
    for span in re.finditer(r"`([A-Za-z_][\w.]*)\(([^`]*)\)`(?=\s*(?::|->))", doc_text()):
        params = [p.strip() for p in " ".join(span[2].split()).split(",")]
        function = ast.parse(f"def f({', '.join(p for p in params if p != '...')}): pass").body[0]
        declared = function.args
        positional = [*declared.posonlyargs, *declared.args]
        defaults = [None] * (len(positional) - len(declared.defaults)) + list(declared.defaults)
        yield span[1], [*zip((a.arg for a in positional), defaults, strict=True),
                        *zip((a.arg for a in declared.kwonlyargs), declared.kw_defaults, strict=True)]


def api_callable(name: str):
    """The documented name in the public API: a name of facemark.runtime, or a method of one of its classes
    (those of `from facemark import ...` first: FaceLandmarker, Face)."""
    import facemark
    from facemark import runtime

    head, _, method = name.rpartition(".")
    if not head and name in runtime.__all__:
        return getattr(runtime, name)
    for exported in dict.fromkeys([*facemark.__all__, *runtime.__all__]):
        owner = getattr(runtime, exported, None)
        if inspect.isclass(owner) and callable(getattr(owner, method, None)):
            return getattr(owner, method)
    raise AssertionError(f"docs/CLI.md documents {name}(...), which the Python API does not have")


def test_the_documented_python_signatures_have_the_real_defaults():
    checked = []
    for name, params in documented_signatures():
        parameters = inspect.signature(api_callable(name)).parameters
        for param, default in params:
            assert param in parameters, f"{name}: documented parameter {param} does not exist"
            if default is None or (isinstance(default, ast.Constant) and default.value is Ellipsis):
                continue  # no default documented
            documented, real = ast.literal_eval(default), parameters[param].default
            assert documented == real, f"{name}: {param}={documented!r} documented, the default is {real!r}"
            checked.append(f"{name}.{param}")
    assert any(c.startswith("FaceLandmarker.") for c in checked), "FaceLandmarker's signature is documented"


# --- command rows ------------------------------------------------------------------------------------------------
def commands() -> Iterator[tuple[str, object]]:
    """("runtime predict", click command) for every visible command of `facemark`."""
    def walk(command, path: str):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                if not getattr(sub, "hidden", False):
                    yield from walk(sub, f"{path} {name}".strip())
        else:
            yield path, command

    yield from walk(typer.main.get_command(app), "")


def visible_options(command) -> list:
    return [p for p in command.params if p.param_type_name == "option" and not p.hidden and p.name != "help"]


def rows_of(path: str) -> list[str]:
    """The commands-table rows of docs/CLI.md for a command: their code cell starts with `facemark GROUP`, and a
    subcommand's name is a word of it (the detectors row lists list|fetch|calibrate|boxes)."""
    group, _, sub = path.partition(" ")
    rows = []
    for line in doc_text().splitlines():
        cell = re.match(r"\| `facemark ([^`]*)`", line)
        if cell and cell[1].split()[0] == group and (not sub or re.search(rf"(?<![\w-]){sub}(?![\w-])", cell[1])):
            rows.append(line)
    return rows


def names_option(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


COMMANDS = sorted(path for path, _c in commands())


@pytest.mark.parametrize("path", COMMANDS)
def test_each_command_row_names_every_option_with_its_real_default(path):
    """Every visible option is named (any of its spellings, `--no-verify` for `--verify/--no-verify`); a plain
    number shown after an option (`[--epochs 55]`) is its default, where it has a numeric one."""
    command = dict(commands())[path]
    rows = rows_of(path)
    assert rows, f"docs/CLI.md has no row for `facemark {path}`"
    text = " ".join(rows)
    options = visible_options(command)
    missing = [o.opts[0] for o in options if not any(names_option(text, n) for n in o.opts + o.secondary_opts)]
    assert not missing, f"docs/CLI.md's row of `facemark {path}` misses {', '.join(missing)}"
    wrong = [f"{name} {shown} (the default is {option.default})"
             for option in options if isinstance(option.default, int | float) and not isinstance(option.default, bool)
             for name in option.opts
             for shown in re.findall(rf"\[{re.escape(name)} (-?\d+(?:\.\d+)?)[\]\s]", text)
             if float(shown) != float(option.default)]
    assert not wrong, f"docs/CLI.md's row of `facemark {path}` shows {', '.join(wrong)}"
