"""`facemark bench`: parse, call facemark.benchmarks.harness.run_benchmark, write the reports, print.

Light at module level (typer + rich only): torch and onnxruntime are imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from facemark.cli_names import DIR, renamed
from facemark.errors import FacemarkError

console = Console(stderr=True)


def parse_batch_sizes(text: str, option: str = "--batch-size") -> tuple[int, ...]:
    """"1,8" -> (1, 8): comma-separated positive integers (batch sizes, thread counts)."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise FacemarkError(f"{option} {text!r}: expected comma-separated integers such as 1,8") from None
    if not sizes or min(sizes) < 1:
        raise FacemarkError(f"{option} {text!r}: expected positive integers such as 1,8")
    return sizes


# What the bench writes in --out-dir: its reports and log, and folders of models, scenes and clips it fills.
REPORT_FILES = ("report.md", "report.json", "chart.png", "serve.log")
FILLED_FOLDERS = ("models", "scenes", "clips")


def _check_outputs(out: Path, checkpoint: Path | None, model: Path | None, data: list[Path]) -> None:
    """The output plan (facemark.outputs): nothing the bench writes lands on what it reads."""
    from facemark.outputs import OutputPlan

    plan = OutputPlan().read(checkpoint, "--checkpoint").read(model, "--model").read_data(data, "--data")
    plan.write_folder(out, "--out-dir", REPORT_FILES)
    for name in FILLED_FOLDERS:
        plan.replace_folder(out / name, "--out-dir")
    plan.check()


@renamed(batch_sizes="--batch-sizes", out="--out", device="--providers")
def bench_command(
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="best.pt to measure (default: random "
                                           "224 px weights: speeds only, NME n/a)."),
    data: list[Path] = typer.Option([], "--data", help="Annotated faces (dlib XML or .pts folder) for NME on "
                                    "their validation split; default: the checkpoint's own data paths."),
    batch_sizes: str = typer.Option("1,8", "--batch-size", help="Comma-separated batch sizes."),
    out: Path = typer.Option(Path("bench-out"), "--out-dir", metavar=DIR, help="Folder for report.md, report.json, "
                             "chart.png."),
    quick: bool = typer.Option(False, "--quick", help="Few repeats and faces: well under 2 minutes on 2 cores."),
    model: Path | None = typer.Option(None, "--model", help="An exported .onnx model (e.g. the shipped "
                                      "facemark/assets/facemark-68.onnx): its rows at each --threads count, end to "
                                      "end and folder throughput; no checkpoint or torch needed."),
    threads: str | None = typer.Option(None, "--threads", help="Thread budgets, e.g. 1,2: every variant is timed "
                                       "at each (default: 1 and all cores)."),
    device: list[str] = typer.Option([], "--device", help="Hardware to measure: cpu, cuda, tensorrt; repeatable "
                                     "or a comma list (default: every one that loads)."),
    no_pipeline: bool = typer.Option(False, "--no-pipeline", help="Skip the end-to-end rows."),
    no_peer: bool = typer.Option(False, "--no-peer", help="Skip the peer rows (dlib, MediaPipe)."),
    serve: bool = typer.Option(False, "--serve", help="Add a load test of `facemark serve` on loopback (the serve "
                               "extra): requests/s, p50/p99, errors, identity with local predict. Implies --model "
                               "(default: the shipped model)."),
    serve_requests: int = typer.Option(1000, "--serve-requests", min=1, help="Requests of the --serve load test."),
    serve_clients: int = typer.Option(8, "--serve-clients", min=1, help="Concurrent clients of --serve."),
    serve_damaged_every: int = typer.Option(100, "--serve-damaged-every", min=0, help="--serve's second load "
                                            "sends a damaged upload every N requests (0: no second load)."),
    ray: bool = typer.Option(False, "--ray", help="Add the Ray Data job (`runtime predict --ray local`, extra ray) "
                             "against the local runner on the same photos: images/s and fixed start-up cost. "
                             "Implies --model (default: the shipped model)."),
) -> None:
    """Latency and accuracy of every model variant against eager PyTorch, end to end, and against dlib."""
    import os

    from facemark.benchmarks.report import render_markdown, write_reports

    _check_outputs(out, checkpoint, model, data)
    counts = parse_batch_sizes(threads, "--threads") if threads else tuple(dict.fromkeys((1, os.cpu_count() or 1)))
    if (serve or ray) and model is None and checkpoint is None:
        from facemark.runtime.landmarker import DEFAULT_MODEL_PATH

        model = DEFAULT_MODEL_PATH
    if (serve or ray) and model is None:
        raise FacemarkError("--serve and --ray run with --model (an exported model), not --checkpoint")
    if model is not None:
        if checkpoint is not None:
            raise FacemarkError("--model and --checkpoint: pass one (--checkpoint re-exports its own variants)")
        if not model.is_file():
            raise FacemarkError(f"{model}: no such model file")
        from facemark.benchmarks.onnx_bench import run_model_benchmark

        with console.status("benchmarking") as status:
            report = run_model_benchmark(model, out, counts, list(data), quick,
                                         progress=lambda msg: status.update(f"benchmarking: {msg}"),
                                         serve={"requests": serve_requests, "clients": serve_clients,
                                                "damaged_every": serve_damaged_every} if serve
                                         else None, peers=not no_peer, ray=ray)
        paths = write_reports(report, out)
        print(render_markdown(report))
        console.print(f"wrote {', '.join(map(str, paths.values()))}", highlight=False)
        return
    from facemark.benchmarks.harness import BenchConfig, run_benchmark

    keys = [p.strip().lower() for raw in device for p in raw.split(",") if p.strip()]
    cfg = BenchConfig(out=out, checkpoint=checkpoint, data=list(data), batch_sizes=parse_batch_sizes(batch_sizes),
                      quick=quick, threads=counts if threads else None, providers=keys or None,
                      pipeline=not no_pipeline, peer=not no_peer)
    with console.status("benchmarking") as status:
        report = run_benchmark(cfg, progress=lambda msg: status.update(f"benchmarking: {msg}"))
    paths = write_reports(report, out)
    print(render_markdown(report))
    for target in report["targets"]:
        console.print(f"target {'met' if target['met'] == 'yes' else 'NOT met'}: {target['target']} "
                      f"-- {target['measured']}", highlight=False)
    console.print(f"wrote {', '.join(map(str, paths.values()))}", highlight=False)
