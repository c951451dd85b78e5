"""The benchmark harness on a tiny model: rows present, ratios from the same run, reports well formed.

Speed itself is never asserted (it is what the benchmark measures, not a property of the code).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from facemark.benchmarks.report import ROW_KEYS, markdown_table, render_markdown, write_reports  # noqa: E402
from facemark.benchmarks.timing import TimingStats  # noqa: E402

SAMPLES_XML = Path(__file__).resolve().parents[1] / "facemark" / "assets" / "samples" / "landmarks.xml"
BATCHES = (1, 2)
EXPECTED_VARIANTS = {("torch-fp32", "torch-cpu"), ("torch-bf16", "torch-cpu"), ("ort-fp32", "cpu"),
                     ("ort-fp16", "cpu"), ("ort-int8", "cpu")}


@pytest.fixture(scope="module")
def bench(tiny_checkpoint, tmp_path_factory) -> tuple[dict, Path]:
    from facemark.benchmarks.harness import BenchConfig, run_benchmark

    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(out=out, checkpoint=tiny_checkpoint, data=[SAMPLES_XML], batch_sizes=BATCHES, quick=True,
                      threads=1, providers=["cpu"], repeats=3, scenes=((640, 480, 1),), pipeline_repeats=1,
                      command="facemark bench --test")
    report = run_benchmark(cfg)
    write_reports(report, out)
    return report, out


def test_every_variant_has_a_row_per_batch_size(bench):
    report, _ = bench
    present = {(r["variant"], r["provider"], r["batch"]) for r in report["rows"]}
    assert present == {(v, p, b) for v, p in EXPECTED_VARIANTS for b in BATCHES}


def test_speedups_are_ratios_of_medians_from_the_same_run(bench):
    report, _ = bench
    for batch in BATCHES:
        rows = [r for r in report["rows"] if r["batch"] == batch]
        reference = next(r for r in rows if r["variant"] == "torch-fp32")
        assert reference["speedup"] == pytest.approx(1.0)
        assert reference["max_abs_err"] is None  # the reference itself
        for row in rows:
            assert row["ms_per_face"] == pytest.approx(row["batch_median_ms"] / batch)
            assert row["speedup"] == pytest.approx(reference["batch_median_ms"] / row["batch_median_ms"])
            assert row["p90_ms"] >= row["ms_per_face"] > 0
            assert row["throughput"] == pytest.approx(1000.0 / row["ms_per_face"])


def test_parity_size_and_accuracy_are_filled(bench):
    report, _ = bench
    by_variant = {r["variant"]: r for r in report["rows"] if r["batch"] == 1}
    assert by_variant["ort-fp32"]["max_abs_err"] < 1e-4  # same network, same inputs
    assert by_variant["ort-int8"]["size_mb"] < by_variant["ort-fp32"]["size_mb"] / 2
    for row in report["rows"]:
        assert row["nme"] is not None and 0 < row["nme"] < 10  # random weights: large but finite
    ort = [r for r in report["rows"] if r["variant"].startswith("ort-")]
    assert all(r["gated"] is None for r in ort)  # --quick exports without verification...
    assert "| unverified |" in render_markdown(report)  # ...and the table says so


def test_json_report_schema(bench):
    _, out = bench

    def refuse_nan(token: str):
        raise AssertionError(f"non-standard JSON constant {token}")

    doc = json.loads((out / "report.json").read_text(), parse_constant=refuse_nan)
    assert {"environment", "rows", "pipeline", "peer", "limit", "targets"} <= doc.keys()
    env = doc["environment"]
    assert {"cpu", "gpu", "threads", "versions", "onnxruntime_providers", "model_sha256"} <= env.keys()
    assert {"torch", "onnxruntime", "opencv"} <= env["versions"].keys()
    assert len(env["model_sha256"]) == 4  # checkpoint + three ONNX models
    for row in doc["rows"]:
        assert set(ROW_KEYS) <= row.keys()
        assert isinstance(row["batch"], int) and isinstance(row["ms_per_face"], float)
    assert doc["limit"]["flops_per_face"] > 1e8  # ResNet18 at 64 px: ~0.28 GFLOP
    assert math.isclose(doc["limit"]["achieved_gflops"],
                        doc["limit"]["gflops_per_face"] / (doc["limit"]["ms_per_face"] / 1000), rel_tol=1e-9)


def test_folder_throughput_rows_compare_runners_on_identical_landmarks(bench):
    report, out = bench
    throughput = report["throughput"]
    assert [r["config"] for r in throughput["rows"]] == ["previous", "one-by-one", "pipelined"]
    for row in throughput["rows"]:
        assert row["images"] == 12 and row["errors"] == 0 and row["images_per_s"] > 0 and row["faces"] > 0
    assert throughput["rows"][-1]["workers"] >= 1
    assert throughput["max_landmark_diff_px"] <= 0.05
    previous = throughput["previous_detector"]
    assert previous["min_face_windows"] is None and previous["scale_factor"] == 1.1 and previous["min_neighbors"] == 1
    assert "## Folder throughput" in (out / "report.md").read_text()


def test_quick_run_is_a_harness_check_that_claims_nothing(bench):
    report, out = bench
    assert report["verdict"] is False and report["targets"] == []
    assert all(row["threads"] == 1 for row in report["rows"]), "every row states its thread count"
    markdown = (out / "report.md").read_text()
    assert "Harness check only" in markdown.splitlines()[2]
    model_rows = _tables(markdown)[0][2:]
    speedup = _tables(markdown)[0][0].split("|").index(" Speed-up vs eager fp32 ")
    assert all(row.split("|")[speedup].strip() == "-" for row in model_rows)
    assert "target met" not in markdown.lower() and "x time" not in markdown


def test_pipeline_rows_find_the_composed_faces(bench):
    report, out = bench
    (row,) = report["pipeline"]
    assert row["scene"] == "640x480-1face" and row["faces_found"] == row["faces_placed"] == 1
    stages = ("decode_ms", "detect_ms", "landmarks_ms")
    assert sum(row[s] for s in stages) <= row["total_ms"] * 1.05 + 0.5
    assert row["fps"] == pytest.approx(1000.0 / row["total_ms"])
    # CPU time summed over threads: more than nothing, never more than every core busy for the whole wall time
    assert 0 < row["cpu_ms"] <= row["cores"] * row["total_ms"] * 1.1 + 1.0
    assert row["fps_bound"] == pytest.approx(row["cores"] * 1000.0 / row["cpu_ms"])
    # one timed run: the stages' CPU times add up to the whole, and detection is never free
    parts = [row[f"{s}_cpu_ms"] for s in ("decode", "detect", "landmarks")]
    assert sum(parts) == pytest.approx(row["cpu_ms"], rel=0.02) and row["detect_cpu_ms"] > 0
    assert f"({row['cores']} cores)" in (out / "report.md").read_text()


def test_peer_rows_or_reason(bench):
    report, _ = bench
    peer = report["peer"]
    if peer.get("skipped"):
        assert "dlib" in peer["skipped"] or "face_recognition_models" in peer["skipped"]
        return
    by_protocol = {p["protocol"]: p for p in peer["rows"]}
    assert set(by_protocol) == {"landmark boxes", "HOG detector"}
    boxes = by_protocol["landmark boxes"]
    assert boxes["threads"] == 1 and boxes["ms"] > 0 and boxes["nme_faces"] > 0
    best = next(r for r in report["rows"] if r["variant"] == boxes["compared_with"] and r["batch"] == 1
                and r["threads"] == 1)  # equal threads: dlib is single-threaded
    assert boxes["ratio_vs_best"] == pytest.approx(best["ms_per_face"] / boxes["ms"])
    assert by_protocol["HOG detector"]["ms"] > 0


def test_each_variant_is_timed_in_a_worker_process_of_its_own(bench):
    import os

    report, _ = bench
    batch1 = [r for r in report["rows"] if r["batch"] == 1]
    pids = [r["worker_pid"] for r in batch1]
    assert all(isinstance(p, int) and p != os.getpid() for p in pids)
    assert len(set(pids)) == len(batch1)  # one process per variant (and thread budget)
    for row in report["rows"]:
        assert row["repeats"] >= 3 * 5 and row["min_ms"] <= row["ms_per_face"] <= row["p90_ms"]


def test_report_has_a_self_check_line(bench):
    report, out = bench
    check = report["self_check"]
    assert check["harness_ms"] > 0 and check["plain_ms"] > 0 and check["plain_calls"] == 50
    assert check["agrees"] == (abs(check["diff"]) <= 0.10)
    line = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("Self-check:"))
    assert check["variant"] in line and ("agrees within 10 %" in line) == check["agrees"]


def test_a_failed_self_check_is_the_reports_first_line():
    report = {"environment": {}, "rows": [], "pipeline": [], "peer": None, "notes": [], "verdict": False,
              "self_check": {"variant": "ort-int8", "threads": 2, "harness_ms": 4.5, "plain_ms": 2.1,
                             "plain_calls": 300, "diff": 4.5 / 2.1 - 1, "agrees": False}}
    first = render_markdown(report).splitlines()[0]
    assert first.startswith("# facemark benchmark") and "SELF-CHECK FAILED" in first


def _tables(markdown: str) -> list[list[str]]:
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def _columns(line: str) -> int:
    assert line.startswith("|") and line.endswith("|"), line
    return len(line.replace("\\|", "").split("|")) - 2


def test_markdown_tables_are_well_formed(bench):
    report, out = bench
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# facemark benchmark")
    tables = _tables(markdown)
    # model, pipeline, video, throughput, environment, the dlib table when dlib (extra `peer`) is installed and the
    # MediaPipe table when its environment exists (`make bench`); a quick run has no targets table (no claims)
    peers = [doc for doc in (report["peer"], report["mediapipe"]) if not doc.get("skipped")]
    assert len(tables) == 5 + len(peers)
    for table in tables:
        width = _columns(table[0])
        assert all(_columns(line) == width for line in table), table
        assert set(table[1].replace("|", "")) <= {"-", ":"}
    model_table = tables[0]
    assert len(model_table) == 2 + len(EXPECTED_VARIANTS) * len(BATCHES)


def test_markdown_cells_escape_pipes_and_newlines():
    table = markdown_table(["a", "b"], [["x|y", "two\nlines"]])
    assert table.splitlines()[2] == "| x\\|y | two lines |"
    assert all(_columns(line) == 2 for line in table.splitlines())


def test_chart_is_a_png_with_a_bar_per_row(bench):
    from PIL import Image

    report, out = bench
    with Image.open(out / "chart.png") as img:
        assert img.format == "PNG"
        bars = len(report["rows"]) + (0 if report["peer"].get("skipped") else len(report["peer"]["rows"]))
        assert img.height >= 22 * bars


def test_timing_stats_percentiles():
    stats = TimingStats.from_samples(list(range(1, 101)))
    assert stats.median_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.min_ms == 1 and stats.repeats == 100
    with pytest.raises(ValueError):
        TimingStats.from_samples([])


def test_targets_are_read_not_asserted():
    from facemark.benchmarks.harness import read_targets

    rows = [{"variant": "ort-int8", "provider": "cpu", "batch": 1, "threads": 2, "gated": True, "speedup": 5.0,
             "ms_per_face": 9.0},
            {"variant": "ort-fp32", "provider": "cpu", "batch": 1, "threads": 2, "gated": True, "speedup": 2.0,
             "ms_per_face": 20.0}]
    pipeline = [{"width": 640, "faces_placed": 1, "fps": 12.0, "total_ms": 83.3, "cpu_ms": 160.0, "cores": 2,
                 "fps_bound": 12.5}]
    peer = {"rows": [{"protocol": "landmark boxes", "ms": 3.0, "ratio_vs_best": 3.0, "compared_with": "ort-int8",
                      "compared_ms": 9.0}]}
    targets = read_targets(rows, pipeline, peer)
    assert [t["met"] for t in targets] == ["yes", "no", "no"]
    assert "ort-int8" in targets[0]["measured"]
    assert "at most 12.5 fps on 2 cores" in targets[2]["measured"]
    rows[0]["gated"] = False  # a failed gate never counts; unverified rows count only when nothing was verified
    assert "ort-fp32:" in read_targets(rows, [], None)[0]["measured"]
    for row in rows:
        row["gated"] = None
    assert "ort-int8 (unverified)" in read_targets(rows, [], None)[0]["measured"]


def test_report_renders_without_optional_sections():
    report = {"environment": {}, "rows": [], "pipeline": [], "peer": {"skipped": "dlib not installed"},
              "limit": {}, "targets": [], "notes": ["n"]}
    text = render_markdown(report)
    assert "Skipped: dlib not installed" in text and "## End to end" not in text


def test_cli_rejects_bad_batch_sizes(tmp_path, capsys):
    from facemark.cli import run

    assert run(["bench", "--batch-size", "1,zero", "--out-dir", str(tmp_path)]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_train_throughput_measures_fp32_and_reports_data_wait(tmp_path):
    from facemark.benchmarks.train_throughput import main

    out = tmp_path / "throughput.json"
    assert main(["--data", str(SAMPLES_XML), "--image-size", "32", "--batch-size", "4", "--steps", "2",
                 "--warmup", "1", "--threads", "1", "--device", "cpu", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results[0]["mode"] == "fp32" and results[0]["steps"] == 2
    for r in results:
        assert r["images_per_s"] > 0 and 0 <= r["data_wait_share"] < 1


def test_bench_model_runs_without_a_checkpoint_and_without_torch(tiny_checkpoint, tmp_path):
    """`facemark bench --model FILE.onnx --threads 1,2` in a process where torch cannot be imported."""
    import subprocess
    import sys

    from test_runtime import export_tiny_onnx

    model = export_tiny_onnx(tiny_checkpoint, tmp_path / "tiny.onnx")
    out = tmp_path / "bench"
    code = ("import sys; sys.modules['torch'] = None\n"
            "from facemark.cli import run\n"
            f"sys.exit(run(['bench', '--model', {str(model)!r}, '--threads', '1,2', '--quick', "
            f"'--out-dir', {str(out)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [row["threads"] for row in report["rows"]] == [1, 2]
    assert all(row["min_ms"] <= row["ms_per_face"] <= row["p90_ms"] <= row["p99_ms"] for row in report["rows"])
    assert report["environment"]["versions"]["torch"] == "not installed"
    assert report["pipeline"] and report["throughput"]["rows"] and report["verdict"] is False
    assert "Harness check only" in (out / "report.md").read_text()
    # The frontier: every setting, timed at each thread count (no NME without --data)
    frontier = report["frontier"]
    assert [(r["passes"], r["tta"]) for r in frontier] == [(1, "none"), (2, "none"), (3, "none"), (1, "flip"),
                                                           (2, "flip"), (4, "flip")]
    assert all(r[f"ms_per_face@{t}"] > 0 and r[f"fps@{t}"] > 0 for r in frontier for t in (1, 2))
    assert all(r.get("nme") is None for r in frontier)
    assert "## Frontier" in (out / "report.md").read_text()
    # The peers of the checkpoint bench, here too: dlib's rows (or why not), MediaPipe's (or why not)
    peer = report["peer"]
    if "skipped" in peer:
        assert "dlib" in peer["skipped"] or "face_recognition_models" in peer["skipped"]
    else:
        assert [p["protocol"] for p in peer["rows"]] == ["landmark boxes", "HOG detector"]
        assert all(p["ms"] > 0 and p["threads"] == 1 for p in peer["rows"])
        assert "## Peer: dlib" in (out / "report.md").read_text()
    assert report["mediapipe"]


def test_video_rows_compare_the_tracking_policies_on_one_clip(bench):
    report, out = bench
    rows = report["video"]
    assert [r["policy"] for r in rows] == ["detect every frame", "tracking, whole-frame re-detection",
                                           "tracking + ROI re-detection (default)"]
    every, whole, roi = rows
    assert {r["clip"] for r in rows} == {"640x480-moving-face"} and all(r["frames"] == 30 for r in rows)
    assert every["haar_frames"] == every["whole_frame_scans"] == 30  # the photo pipeline on each frame
    # the harness's model has random weights, so tracks may be lost on any frame (the shipped model's tracking is
    # tested in test_runtime_video); here: a whole-frame policy never searches regions, the ROI one may
    assert whole["whole_frame_scans"] == whole["haar_frames"] <= 30
    assert 1 <= roi["whole_frame_scans"] <= roi["haar_frames"] <= 30
    assert all(r["median_frame_ms"] <= r["p99_frame_ms"] and r["fps"] > 0 for r in rows)
    assert "## Video" in (out / "report.md").read_text()


@pytest.mark.parametrize("study", ["box_noise", "interference"])
def test_studies_run_as_modules(study):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", f"facemark.benchmarks.studies.{study}", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Usage" in done.stdout, done.stderr[-1000:]
