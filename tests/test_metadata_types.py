"""Model metadata in real types (issue 40, item 5): numbers as numbers, lists as lists, data paths normalised, in
the file (one declared kind per key, facemark.metadata.KINDS), in the JSON's model block and in its schema; files
of earlier exports (the shipped model) read the same way. Export's file names say the precision they hold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest

from facemark import metadata as meta
from facemark.cli import run
from facemark.contract import CropContract
from facemark.runtime.schema import schema

SHIPPED = Path(__file__).resolve().parents[1] / "facemark" / "assets" / "facemark-68.onnx"
PYTHON_TYPES = {meta.TEXT: str, meta.NUMBER: float, meta.LIST: list, meta.OBJECT: dict, meta.PATHS: list}


def shipped_props() -> dict[str, str]:
    onnx = pytest.importorskip("onnx")
    return {p.key: p.value for p in onnx.load(str(SHIPPED), load_external_data=False).metadata_props}


def test_every_key_has_one_declared_kind():
    assert set(meta.KINDS) == set(meta.ALL_KEYS)
    assert set(meta.KINDS.values()) <= set(PYTHON_TYPES)


def test_the_shipped_file_of_an_earlier_export_reads_in_real_types():
    props = shipped_props()
    values = meta.decode(props)
    assert {k.removeprefix(meta.PREFIX) for k in props if k in meta.KINDS} == set(values), "every key reads"
    for key, kind in meta.KINDS.items():
        name = key.removeprefix(meta.PREFIX)
        if name in values:
            assert isinstance(values[name], PYTHON_TYPES[kind]), (name, values[name])
    assert 0 < values["val_nme"] < 0.08
    assert values["train_data"] == ["../shared/data/300w"]  # recorded relative by that export: kept, normalised
    assert values["train_split"] == {"split_seed": 0, "val_fraction": 0.1}


def test_the_model_block_has_real_types_and_the_schema_holds_them():
    from facemark.runtime.landmarker import FaceLandmarker

    model = FaceLandmarker().describe()["model"]
    assert isinstance(model["val_nme"], float) and 0 < model["val_nme"] < 0.08
    assert isinstance(model["train_data"], list) and all(isinstance(p, str) for p in model["train_data"])
    document = {**FaceLandmarker().describe(), "complete": True, "images": []}
    validator = jsonschema.Draft202012Validator(schema("predict"))
    validator.validate(document)
    for name, stringly in (("val_nme", "0.0381"), ("train_data", '["../shared/data/300w"]')):
        broken = {**document, "model": {**model, name: stringly}}
        assert not validator.is_valid(broken), f"the schema lets a string {name} through"


def written_props(train: dict, val_nme: float | None = 0.0412) -> dict[str, str]:
    """The metadata export writes for a checkpoint document (the exporter's own function)."""
    pytest.importorskip("torch")
    from facemark.export.exporter import _metadata

    doc = {"model": {"arch": "resnet18", "head": "pip"}, "train": train, "metrics": {"val_nme": val_nme}}
    return _metadata(CropContract(size=64), doc, "int8", "ab" * 32, {"checked": False}, None)


def test_export_writes_every_value_in_its_declared_kind_with_data_paths_absolute_and_normalised():
    props = written_props({"data": ["data//300w/", "/srv/faces/./lfpw", "..\\other\\set"], "cwd": "/runs/base",
                           "val_fraction": 0.2, "split_seed": 3})
    info = meta.parse_metadata(props, "m.onnx")
    values = info.values
    assert set(values) == {k.removeprefix(meta.PREFIX) for k in props}, "every written value reads back"
    for key in props:
        assert isinstance(values[key.removeprefix(meta.PREFIX)], PYTHON_TYPES[meta.KINDS[key]]), key
    assert info.train_data == ["/runs/base/data/300w", "/srv/faces/lfpw", "/runs/other/set"]
    assert json.loads(props[meta.TRAIN_DATA]) == info.train_data, "the file itself holds the normalised paths"
    summary = info.summary()
    assert summary["val_nme"] == 0.0412 and summary["train_data"] == info.train_data
    assert info.train_split == {"split_seed": 3, "val_fraction": 0.2}
    assert json.dumps(summary, allow_nan=False)


def test_a_checkpoint_without_a_recorded_folder_or_figure_keeps_relative_paths_and_null():
    props = written_props({"data": ["data/./300w"]}, val_nme=None)
    summary = meta.parse_metadata(props, "m.onnx").summary()
    assert summary["train_data"] == ["data/300w"] and "val_nme" not in summary


@pytest.mark.parametrize(("key", "text", "expected"), [
    (meta.VAL_NME, "0.05", 0.05),
    (meta.VAL_NME, "NaN", None),  # no figure: JSON output forbids NaN
    (meta.VAL_NME, "true", None),
    (meta.VAL_NME, "not a number", None),
    (meta.TRAIN_DATA, '["a\\\\b//c/"]', ["a/b/c"]),
    (meta.TRAIN_DATA, "data/300w", ["data/300w"]),  # a bare path (not JSON) is one path
    (meta.TRAIN_DATA, "[1, 2]", None),
    (meta.PARITY, "[]", None),
    (meta.PRECISION, "int8", "int8"),
])
def test_a_value_of_another_type_or_malformed_reads_as_absent_never_as_an_error(key, text, expected):
    assert meta.decode_value(key, text) == expected


def test_nan_reads_as_absent_in_the_model_block():
    props = {meta.CONTRACT: CropContract(size=64).to_json(), meta.VAL_NME: "NaN"}
    summary = meta.parse_metadata(props, "m.onnx").summary()
    assert "val_nme" not in summary and not any(isinstance(v, float) and math.isnan(v) for v in summary.values())


# --- file names --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16", "fp16w", "int8"])
def test_the_default_output_name_says_its_precision(precision):
    from facemark.export.exporter import report_path
    from facemark.export.precisions import check_output_name, default_output

    out = default_output(Path("runs/x/best.pt"), precision)
    assert out == Path(f"runs/x/best.{precision}.onnx")
    assert report_path(out) == Path(f"runs/x/best.{precision}.parity.json")
    check_output_name(out, precision)  # its own default is never refused


def test_export_help_names_the_default_it_uses(capsys):
    assert run(["export", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "best.fp32.onnx" in help_text and "e.g. best.int8.onnx)" not in help_text


def _refused(argv: list[str], capsys) -> str:
    code = run(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_model_name_without_onnx_is_refused_in_one_line_before_any_work(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "model.pt"
    line = _refused(["export", str(tiny_checkpoint), "-o", str(out)], capsys)
    assert "model.pt" in line and ".onnx" in line and "model.fp32.onnx" in line
    assert list(tmp_path.iterdir()) == [], "nothing written, not even a report"


@pytest.mark.parametrize(("name", "precision", "said"), [
    ("best.int8.onnx", "fp32", "int8"),
    ("best.fp32.onnx", "int8", "fp32"),
    ("best_fp16w.onnx", "fp16", "fp16w"),
    ("model-FP16.onnx", "fp32", "fp16"),
])
def test_a_model_name_that_says_another_precision_is_refused_naming_both(tiny_checkpoint, tmp_path, capsys, name,
                                                                          precision, said):
    line = _refused(["export", str(tiny_checkpoint), "-o", str(tmp_path / name), "--precision", precision], capsys)
    assert name in line and said in line and precision in line
    assert list(tmp_path.iterdir()) == []


def test_the_python_api_refuses_the_same_names(tiny_checkpoint, tmp_path):
    pytest.importorskip("torch")
    from facemark.errors import FacemarkError
    from facemark.export.exporter import export_model

    with pytest.raises(FacemarkError, match="says int8 but the model is fp16"):
        export_model(tiny_checkpoint, tmp_path / "m.int8.onnx", precision="fp16")
    with pytest.raises(FacemarkError, match=r"must end in \.onnx"):
        export_model(tiny_checkpoint, tmp_path / "m.bin")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["best.int8u7.onnx", "model-int8.onnx", "int8.ONNX"])
def test_names_that_agree_or_say_nothing_of_precision_are_accepted(name):
    from facemark.export.precisions import check_output_name

    check_output_name(Path(name), "int8")
