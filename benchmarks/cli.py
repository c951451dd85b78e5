"""`facemark bench`: parse, call facemark.benchmarks.harness.run_benchmark, write the reports, print.

Light at module level (typer + rich only): torch and onnxruntime are imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from facemark.errors import FacemarkError

console = Console(stderr=True)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise FacemarkError(f"--batch-sizes {text!r}: expected comma-separated integers such as 1,8") from None
    if not sizes or min(sizes) < 1:
        raise FacemarkError(f"--batch-sizes {text!r}: expected positive integers such as 1,8")
    return sizes


def bench_command(
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="best.pt to measure (default: random "
                                           "224 px weights: speeds only, NME n/a)."),
    data: list[Path] = typer.Option([], "--data", help="Annotated faces (dlib XML or .pts folder) for NME on "
                                    "their validation split; default: the checkpoint's own data paths."),
    batch_sizes: str = typer.Option("1,8", "--batch-sizes", help="Comma-separated batch sizes."),
    out: Path = typer.Option(Path("bench-out"), "--out", help="Folder for report.md, report.json, chart.png."),
    quick: bool = typer.Option(False, "--quick", help="Few repeats and faces: well under 2 minutes on 2 cores."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch and ONNX Runtime "
                                       "(default: all cores)."),
    providers: list[str] = typer.Option([], "--providers", help="ONNX Runtime providers to measure: cpu, "
                                        "cuda, tensorrt; repeatable (default: every one that loads)."),
    no_pipeline: bool = typer.Option(False, "--no-pipeline", help="Skip the end-to-end rows."),
    no_peer: bool = typer.Option(False, "--no-peer", help="Skip the dlib peer row."),
) -> None:
    """Latency and accuracy of every model variant against eager PyTorch, end to end, and against dlib."""
    from facemark.benchmarks.harness import BenchConfig, run_benchmark
    from facemark.benchmarks.report import render_markdown, write_reports

    if threads is not None and threads < 1:
        raise FacemarkError(f"--threads must be >= 1 (got {threads})")
    keys = [p.strip().lower() for raw in providers for p in raw.split(",") if p.strip()]
    cfg = BenchConfig(out=out, checkpoint=checkpoint, data=list(data), batch_sizes=parse_batch_sizes(batch_sizes),
                      quick=quick, threads=threads, providers=keys or None, pipeline=not no_pipeline,
                      peer=not no_peer)
    with console.status("benchmarking") as status:
        report = run_benchmark(cfg, progress=lambda msg: status.update(f"benchmarking: {msg}"))
    paths = write_reports(report, out)
    print(render_markdown(report))
    for target in report["targets"]:
        console.print(f"target {'met' if target['met'] == 'yes' else 'NOT met'}: {target['target']} "
                      f"-- {target['measured']}", highlight=False)
    console.print(f"wrote {paths['markdown']}, {paths['json']}, {paths['chart']}", highlight=False)
