"""`facemark export`: parse, call facemark.export.exporter.export_model, print the parity report.

Light at module level (typer + rich + core); torch and onnx are imported when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from facemark.choices import Int8Activations, choice_enum
from facemark.cli_names import FILE, renamed
from facemark.errors import ParityError
from facemark.export.parity import figure
from facemark.export.precisions import PRECISIONS, check_output_name, default_output

console = Console(soft_wrap=True)
Precision = choice_enum("Precision", tuple(PRECISIONS))


@renamed(batch_size="--batch", triton_max_batch_size="--triton-max-batch")
def export_command(
    checkpoint: Path = typer.Argument(..., help="A facemark checkpoint (best.pt); or an exported .onnx model "
                                      "with --triton-repo (the repository only, no re-export)."),
    output: Path | None = typer.Option(
        None, "-o", "--output", metavar=FILE,
        help="Model file, .onnx (default: beside the checkpoint, named for its precision: best.fp32.onnx, "
             "best.int8.onnx, ...)."),
    opset: int = typer.Option(17, "--opset", help="Default-domain ONNX opset the file declares."),
    precision: Precision = typer.Option(
        "fp32", "--precision", help="; ".join(f"{p.name}: {p.help}" for p in PRECISIONS.values())),
    int8_activations: Int8Activations = typer.Option(
        "int8", "--int8-activations",
        help="uint8 (U8S8) is fastest on CPUs with VNNI but saturates on AVX2-only "
             "CPUs; uint8-7bit (7-bit weights) cannot saturate; int8 (S8S8) is right everywhere."),
    calib_data: list[Path] = typer.Option(
        [], "--calib-data",
        help="dlib XML or .pts folder; repeatable (default: the data the checkpoint was trained on, when "
             "reachable). Training split: int8 calibration and the Haar box calibration; validation split: parity "
             "crops and the NME gate."),
    verbose: bool = typer.Option(False, "--verbose", help="List every data warning (default: one line per kind)."),
    batch_size: str = typer.Option("dynamic", "--batch-size", help="dynamic | N (a fixed batch size)."),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="--no-verify skips parity (explicit opt-out)."),
    triton_repo: Path | None = typer.Option(
        None, "--triton-repo", help="Also write a Triton model repository: DIR/facemark_crops/config.pbtxt + "
        "1/model.onnx for Triton's onnxruntime backend."),
    triton_max_batch_size: int = typer.Option(16, "--triton-max-batch-size", min=1,
                                              help="max_batch_size of the repository."),
    triton_kind: str = typer.Option("gpu", "--triton-kind", help="Instance kind: gpu | cpu."),
    triton_tensorrt: bool = typer.Option(
        False, "--triton-tensorrt", help="Run the model through ONNX Runtime's TensorRT accelerator (fp16, engine "
        "cache in /tmp/facemark-trt-cache on the server; GPU instances)."),
) -> None:
    """Export a checkpoint to one self-contained ONNX file, verified against PyTorch and gated. Optionally also a
    Triton model repository for it."""
    if triton_kind not in ("gpu", "cpu"):
        raise typer.BadParameter(f"--triton-kind {triton_kind!r}: expected gpu or cpu")
    if triton_tensorrt and triton_kind != "gpu":
        raise typer.BadParameter("--triton-tensorrt needs --triton-kind gpu")
    exported = checkpoint.suffix.lower() == ".onnx"
    if exported and triton_repo is None:
        raise typer.BadParameter(f"{checkpoint} is exported already: give --triton-repo DIR, or a checkpoint")
    target = None if exported else output or default_output(checkpoint, precision.value)
    _check_outputs(checkpoint, calib_data, target, triton_repo)
    if target is not None:
        check_output_name(target, precision.value)  # before torch is imported
    if exported:
        _write_repo(checkpoint, triton_repo, triton_max_batch_size, triton_kind, triton_tensorrt)
        return
    from facemark.export.exporter import export_model, report_path

    precision, int8_activations = precision.value, int8_activations.value
    try:
        result = export_model(checkpoint, target, opset=opset, precision=precision,
                              calib_data=calib_data or None, batch=batch_size, verify=verify,
                              int8_activations=int8_activations, verbose=verbose,
                              progress=lambda msg: console.print(f"[dim]{msg}[/dim]", highlight=False))
    except ParityError:
        report = report_path(target)
        if report.is_file():
            print_report(json.loads(report.read_text(encoding="utf-8")))
        raise
    print_report(result.report)
    console.print(f"{result.path} ({result.size_bytes / 1e6:.1f} MB); report {report_path(result.path)}")
    if triton_repo is not None:
        _write_repo(result.path, triton_repo, triton_max_batch_size, triton_kind, triton_tensorrt)


def _check_outputs(checkpoint: Path, calib_data: list[Path], target: Path | None, repo: Path | None) -> None:
    """The output plan (facemark.outputs): no output on an input or on another output, before any work."""
    from facemark.outputs import OutputPlan
    from facemark.runtime.serving.protocol import CROPS_MODEL

    plan = OutputPlan().read(checkpoint, "the checkpoint").read_data(calib_data, "--calib-data")
    if target is not None:
        from facemark.export.exporter import report_path

        plan.write(target, "--output").write(report_path(target), "the parity report")
    if repo is not None:
        plan.write_folder(repo, "--triton-repo").replace_folder(repo / CROPS_MODEL, "--triton-repo")
    plan.check()


def _write_repo(model: Path, repo: Path, max_batch: int, kind: str, tensorrt: bool) -> None:
    from facemark.export.triton_repo import RepoOptions, write_triton_repository

    options = RepoOptions(max_batch=max_batch, instance_kind=f"KIND_{kind.upper()}", tensorrt=tensorrt)
    folder = write_triton_repository(model, repo, options)
    console.print(f"Triton model repository: {folder} (tritonserver --model-repository {repo})")


def print_report(report: dict) -> None:
    """The parity table (one row per input set), the gates and the summary line."""
    if not report.get("checked"):
        console.print(f"[yellow]{report['summary']}[/yellow]")
        return
    size = report["crop_size"]
    table = Table(title=f"{report['precision']} ONNX vs eager PyTorch fp32: abs error in normalised units, "
                        f"px of the {size} px crop", box=box.SIMPLE_HEAD, pad_edge=False)
    columns = ("set", "N", "max", "mean", "p99", "max rel", "max px", "p99 px", "NaN")
    for column in columns:
        table.add_column(column, justify="left" if column == "set" else "right", overflow="fold")
    for s in report["sets"]:  # median and p99 rel are in the JSON report
        st = s["landmarks"]
        errors = (figure(st[k], ".2g") for k in ("max_abs", "mean_abs", "p99_abs", "max_rel"))
        pixels = (figure(st["px"][k], ".3g") for k in ("max_abs", "p99_abs"))
        ties = f" ({s['tied_points']} of {s['points']} points tied, left out)" if s.get("tied_points") else ""
        table.add_row(s["source"] + ties, str(s["batch"]), *errors, *pixels, str(st["nan"] + st["inf"]))
    console.print(table)
    gates = Table(title="gates", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("gate", "value", "limit", "unit", "result"):
        gates.add_column(column)
    for g in report["gates"]:
        verdict = ("[green]pass[/green]" if g["passed"] else "[red]FAIL[/red]") if g.get("gated", True) else \
            "[yellow]not gated[/yellow]"
        gates.add_row(g["name"], figure(g["value"], ".4g"), figure(g["limit"], ".4g"), g["unit"], verdict)
    console.print(gates)
    console.print(report["summary"], style="green" if report["passed"] else "red", highlight=False)
