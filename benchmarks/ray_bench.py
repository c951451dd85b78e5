"""Ray Data against the local runner on the same photos: `facemark bench --model M --ray` and

    python -m facemark.benchmarks.ray_bench [--model M.onnx] [--data ../shared/data/300w] [--actors 2] [--json F]

Two rows over the same files (the validation photos of --data, else the bundled samples repeated):
- "local": runtime predict's pipelined runner (predict_files, one worker per core) after a warm-up;
- "ray": a fresh local Ray cluster and the job of `runtime predict --ray` (facemark.runtime.ray.run_landmarks_job,
  `actors` actors of `threads` threads), timed from ray.init to the cluster's shutdown.
The Ray job also runs on the first SMALL_JOB files alone (a fresh cluster again): the two times give its steady
rate (the extra images over the extra seconds) and its fixed cost, the intercept (cluster start, actors importing
and loading the model, the tail, the shutdown).
The faces of both rows are compared: largest landmark difference (px) and face-count mismatches. Torch-free;
without the ray extra the section is {"skipped": why}.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import typer

from facemark.runtime.landmarker import FaceLandmarker, default_workers
from facemark.runtime.predict.runner import predict_files

SMALL_JOB = 8  # files of the second, short Ray job


def largest_difference(ours: Sequence[dict], theirs: Sequence[dict]) -> tuple[float, int]:
    """Largest landmark difference (px) between two runs' `images[]` entries of the same files, over the images
    whose face counts agree, and the number of images whose counts differ."""
    worst, mismatches = 0.0, 0
    for a, b in zip(ours, theirs, strict=True):
        if len(a["faces"]) != len(b["faces"]):
            mismatches += 1
            continue
        for fa, fb in zip(a["faces"], b["faces"], strict=True):
            worst = max(worst, *(abs(x - y) for pa, pb in zip(fa["landmarks"], fb["landmarks"], strict=True)
                                 for x, y in zip(pa, pb, strict=True)))
    return worst, mismatches


def _row(config: str, images: int, seconds: float, entries: Sequence[dict], **extra) -> dict:
    return {"config": config, "images": images, "seconds": seconds, "images_per_s": images / seconds,
            "faces": sum(len(e["faces"]) for e in entries), "errors": sum(1 for e in entries if e["error"]), **extra}


def ray_benchmark(model: Path | None, files: Sequence[Path], actors: int | None = None, threads: int = 1) -> dict:
    """The local and Ray rows (module docstring), or {"skipped": why} without the ray extra."""
    try:
        from facemark.runtime.ray import run_landmarks_job
    except ModuleNotFoundError as exc:  # the message names the extra (facemark.runtime.ray)
        return {"skipped": str(exc)}
    paths = [str(f) for f in files]
    landmarker = FaceLandmarker(model, device="cpu")
    predict_files(landmarker, files[:4])  # warm-up: session, cascades, page cache
    start = time.perf_counter()
    local = [r.to_json() for r in predict_files(landmarker, files)]
    local_row = _row("local", len(files), time.perf_counter() - start, local, workers=default_workers())
    timed = {}
    for count in (SMALL_JOB, len(paths)):  # a fresh cluster each: the fixed cost is the line's intercept
        start = time.perf_counter()
        table, times = run_landmarks_job(paths[:count], "local", actors, threads, model=model, provider="cpu")
        timed[count] = (time.perf_counter() - start, times)
    (small_s, _), (wall, times) = timed[SMALL_JOB], timed[len(paths)]
    entries = table.to_pylist()
    steady = (len(paths) - SMALL_JOB) / (wall - small_s) if wall > small_s else None
    ray_row = _row("ray", len(files), wall, entries, actors=times.actors, threads=threads,
                   steady_images_per_s=steady, small_job_images=SMALL_JOB, small_job_s=small_s,
                   cluster_start_s=times.connect_s, first_rows_s=times.connect_s + times.first_row_s,
                   fixed_s=wall - len(paths) / steady if steady else None)
    worst, mismatches = largest_difference(entries, local)
    return {"rows": [local_row, ray_row], "max_landmark_diff_px": worst, "face_count_mismatches": mismatches,
            "model": Path(model).name if model else "facemark-68.onnx (shipped)"}


def main(model: Path | None = typer.Option(None, "--model"), data: list[Path] = typer.Option([], "--data"),
         limit: int = typer.Option(200, "--limit"), actors: int | None = typer.Option(None, "--actors"),
         threads: int = typer.Option(1, "--threads"), json_path: Path | None = typer.Option(None, "--json")) -> None:
    from facemark.benchmarks.throughput import benchmark_files, print_json, validation_records

    print_json(ray_benchmark(model, benchmark_files(validation_records(data), limit), actors, threads), json_path)


if __name__ == "__main__":
    typer.run(main)
