"""Benchmark reports: report.md (the table a person reads first), report.json (every figure), chart.png.

The JSON document: {"environment": {...}, "rows": [{"variant", "provider", "batch", "ms_per_face", "p90_ms",
"threads", "speedup", "size_mb", "max_abs_err", "nme", ...}], "pipeline": [...], "peer": {"rows": [one per dlib
protocol]} | {"skipped": why} | null, "limit": {...}, "targets": [...], "notes": [...], "self_check": {...}}.
Times are milliseconds per face (a batch's time divided by its size), each row at its own thread budget.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from facemark.benchmarks.isolated import self_check_line
from facemark.errors import FacemarkError
from facemark.fileio import write_text_atomic
from facemark.plots import plot_latency

ROW_KEYS = ("variant", "provider", "batch", "threads", "ms_per_face", "p90_ms", "speedup", "size_mb", "max_abs_err",
            "nme")


def _num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def _cell(text: object) -> str:
    """A Markdown table cell: pipes escaped, no line breaks (they would end the row)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _nme_cell(row: dict) -> str:
    return _num(100 * row["nme"], 2, " %") if row.get("nme") is not None else row.get("nme_note", "n/a")


def _gate_cell(row: dict) -> str:
    if row.get("gated") is None:
        return "unverified" if row["variant"].startswith("ort-") else "-"
    return "pass" if row["gated"] else "FAIL"


def model_table(rows: list[dict], claims: bool = True) -> str:
    """The model rows; without `claims` (a quick or random-weight run) the speed-up column shows "-"."""
    header = ["Variant", "Provider", "Batch", "Threads", "ms/face (median)", "p90 ms", "p99 ms", "faces/s",
              "Speed-up vs eager fp32", "Size MB", "Max abs err", "NME", "Gate"]
    body = [[r["variant"], r["provider"], r["batch"], r.get("threads", "?"), _num(r["ms_per_face"]), _num(r["p90_ms"]),
             _num(r["p99_ms"]), _num(r["throughput"], 1), _num(r["speedup"], 2, "x") if claims else "-",
             _num(r["size_mb"], 1),
             _num(r["max_abs_err"], 5) if r["max_abs_err"] is not None else
             ("ref" if r["variant"] == "torch-fp32" else "-"), _nme_cell(r), _gate_cell(r)]
            for r in rows]
    return markdown_table(header, body)


def peer_table(rows: list[dict], claims: bool = True) -> str:
    body = []
    for p in rows:
        if p.get("skipped"):
            body.append([p["protocol"], "skipped: " + p["skipped"], "", "", "", "", "", ""])
            continue
        body.append([p["protocol"], p["unit"], p["threads"], _num(p["ms"]), _num(p["p90_ms"]),
                     _num(100 * p["nme"], 2, " %") if p.get("nme") is not None else "n/a (no data)",
                     f"{p['nme_faces']}" + (f" ({100 * p['found']:.1f} % found)" if p.get("found") is not None else ""),
                     f"{p['compared_with']} {_num(p['compared_ms'])} ms = {_num(p['ratio_vs_best'], 2, 'x time')}"
                     if claims and p.get("ratio_vs_best") is not None else "-"])
    return markdown_table(["Protocol", "Unit", "Threads", "ms (median)", "p90 ms", "NME", "Faces",
                           "Ours vs dlib (1 thread)"], body)


def presets_of(refine: int, tta: str) -> str:
    """The `--preset` names (runtime.options.PRESETS) that are these landmark passes with the runtime's other
    defaults (the frontier's setting), "-" if none."""
    from facemark.runtime.options import PRESETS, PipelineOptions, RuntimeOptions

    row = RuntimeOptions(pipeline=PipelineOptions(refine=refine, tta=tta))
    names = [n for n in PRESETS if RuntimeOptions.from_settings(preset=n) == row]
    return ", ".join(f"`{n}`" for n in names) or "-"


def frontier_table(rows: list[dict]) -> str:
    threads = sorted({int(k.split("@")[1]) for r in rows for k in r if k.startswith("fps@")})
    header = ["Input", "Precision", "Passes", "TTA", "Preset", "NME end to end", "Found",
              *(f"ms/face, {t} thr" for t in threads), *(f"640x480 fps, {t} thr" for t in threads)]
    body = [[f"{r['input']} px", r["precision"], r["passes"], r["tta"], presets_of(r["refine"], r["tta"]),
             _num(100 * r["nme"], 2, " %") if r.get("nme") is not None else "n/a (no --data)",
             f"{100 * r['detection_rate']:.1f} %" if r.get("detection_rate") is not None else "-",
             *(_num(r[f"ms_per_face@{t}"]) for t in threads), *(_num(r[f"fps@{t}"], 1) for t in threads)]
            for r in rows]
    return markdown_table(header, body)


def detector_table(rows: list[dict]) -> str:
    def pct(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{100 * value:.{digits}f} %"

    header = ["Detector", "ms 640x480, 1 / 2 threads (CPU ms)", "recall, faces at 8 / 12 / 21 %",
              "recall (validation)", "false boxes / face-free crop", "photo fps, refine 0 / 1 (CPU ms)",
              "NME end to end", "detection rate"]
    body = []
    for r in rows:
        small = r.get("small_face_recall") or {}
        body.append([r["detector"], f"{_num(r.get('ms_1t'), 1)} / {_num(r.get('ms_2t'), 1)} "
                     f"({_num(r.get('cpu_ms_1t'), 1)} / {_num(r.get('cpu_ms_2t'), 1)})",
                     " / ".join(pct(v) for v in small.values()) or "-", pct(r.get("recall")),
                     _num(r.get("false_boxes_per_crop"), 3),
                     f"{_num(r.get('fps_refine0'), 1)} / {_num(r.get('fps_refine1'), 1)} "
                     f"({_num(r.get('cpu_ms_refine0'), 1)} / {_num(r.get('cpu_ms_refine1'), 1)})",
                     pct(r.get("nme"), 2), pct(r.get("detection_rate"))])
    return markdown_table(header, body)


def _calibration_text(peer: dict) -> str:
    try:
        c = json.loads(peer.get("calibration") or "{}")
        return f"dx {c['dx']:+.3f}, dy {c['dy']:+.3f}, sw {c['sw']:.3f}, sh {c['sh']:.3f} from {c['samples']} faces"
    except (ValueError, KeyError, TypeError):
        return "identity"


def pipeline_table(pipeline: list[dict]) -> str:
    header = ["Image", "Faces found / placed", "decode ms", "detect ms", "landmarks ms (all passes)",
              "total ms (median)", "p90 ms", "fps", "CPU ms, all threads (decode / detect / landmarks)",
              "fps bound (cores x 1000 / CPU ms)"]
    body = [[p["scene"], f"{p['faces_found']} / {p['faces_placed']}", _num(p["decode_ms"]), _num(p["detect_ms"]),
             _num(p["landmarks_ms"]), _num(p["total_ms"]),
             _num(p["p90_total_ms"]), _num(p["fps"], 1), _cpu_cell(p),
             f"{_num(p.get('fps_bound'), 1)} ({p['cores']} cores)" if "fps_bound" in p else "-"] for p in pipeline]
    return markdown_table(header, body)


def _cpu_cell(row: dict) -> str:
    """CPU ms of a pipeline row, then per stage where the row has them (older reports have neither)."""
    stages = [row.get(f"{stage}_cpu_ms") for stage in ("decode", "detect", "landmarks")]
    split = f" ({' / '.join(_num(v, 1) for v in stages)})" if all(v is not None for v in stages) else ""
    return _num(row.get("cpu_ms")) + split


def video_table(video: list[dict]) -> str:
    header = ["Clip", "Policy", "fps", "median frame ms", "p99 frame ms", "Haar frames (whole)", "frames with the face",
              "NME"]
    body = [[v["clip"], v["policy"], _num(v["fps"], 1), _num(v["median_frame_ms"]), _num(v["p99_frame_ms"]),
             f"{v['haar_frames']} ({v['whole_frame_scans']})", f"{v['frames_with_face']} / {v['frames']}",
             "n/a" if v["nme"] is None else f"{100 * v['nme']:.2f} %"] for v in video]
    return markdown_table(header, body)


def throughput_table(throughput: dict, claims: bool = True) -> str:
    header = ["Runner", "Workers", "Images", "Images/s", "x previous", "Faces", "Errors"]
    body = [[r["config"], r["workers"], r["images"], _num(r["images_per_s"], 1),
             _num(r["speedup_vs_previous"]) if claims else "-", r["faces"], r["errors"]] for r in throughput["rows"]]
    return markdown_table(header, body)


def serve_table(serve: dict) -> str:
    loads = [("photos", serve)]
    if serve.get("damaged"):
        hostile, requests = serve["damaged"], serve["requests"]
        mixed = [f"1 {what} per {requests // hostile[key]}" for key, what in
                 (("damaged", "damaged upload"), ("oversized", "oversized JSON request (413)")) if hostile.get(key)]
        loads.append((", ".join(mixed) or "photos again", hostile))
    return markdown_table(["Load", "Clients", "Requests", "Requests/s", "p50 ms", "p90 ms", "p99 ms", "Errors",
                           "Server peak RSS MB"],
                          [[name, load["clients"], load["requests"], _num(load["requests_per_s"], 1),
                            _num(load["p50_ms"]), _num(load["p90_ms"]), _num(load["p99_ms"]), load["errors"],
                            _num(load.get("peak_rss_mb"), 0)] for name, load in loads])


def ray_section(ray: dict) -> list[str]:
    """The Ray Data rows of `facemark bench --ray` (facemark.benchmarks.ray_bench), or why they were skipped."""
    title = ["## Ray Data (`runtime predict --ray local` against the local runner, same run)", ""]
    if ray.get("skipped"):
        return [*title, f"Skipped: {ray['skipped']}", ""]
    table = markdown_table(
        ["Runner", "Images", "Seconds", "Images/s", "Steady images/s", "Fixed s", "Faces", "Errors"],
        [[r["config"], r["images"], _num(r["seconds"], 1), _num(r["images_per_s"], 1),
          _num(r.get("steady_images_per_s"), 1), _num(r.get("fixed_s"), 1), r["faces"], r["errors"]]
         for r in ray["rows"]])
    local, job = ray["rows"]
    return [*title, table, "",
            f"local = the pipelined runner ({local['workers']} workers) after a warm-up; ray = a fresh local cluster "
            f"and {job['actors']} actors x {job['threads']} thread, from ray.init to shutdown. Steady and fixed: "
            f"from a second Ray job on {job['small_job_images']} of the photos ({_num(job['small_job_s'], 1)} s), "
            f"the slope and intercept of the two (cluster start {_num(job['cluster_start_s'], 1)} s, first rows after "
            f"{_num(job['first_rows_s'], 1)} s). Ray vs "
            f"local: largest landmark difference {_num(ray['max_landmark_diff_px'], 3)} px, "
            f"{ray['face_count_mismatches']} face-count mismatches.", ""]


def web_section(web: dict) -> list[str]:
    """The browser rows of facemark.benchmarks.web_bench, or why they were skipped."""
    title = ["## Browser (`facemark web` in headless Chromium, WebAssembly, beside Python's ONNX Runtime)", ""]
    if web.get("skipped"):
        return [*title, f"Skipped: {web['skipped']}", ""]
    table = markdown_table(["Model", "Threads", "Browser ms per face", "Python ms per face", "Browser / Python"],
                           [[r["precision"], r["threads"], _num(r["browser_ms_per_face"]),
                             _num(r["python_ms_per_face"]), _num(r["browser_ms_per_face"] / r["python_ms_per_face"])]
                            for r in web["rows"]])
    runtimes = ", ".join(f"{k} {v}" for k, v in web["runtimes"].items())
    return [*title, table, "",
            f"The landmark stage (crop, network, decoding) on the {web['faces']} detections of {web['image']} in one "
            f"batch, median of {web['repeat']} runs; {web['chromium']}, {runtimes}. fp32 = the int8 file's speed "
            "twin (docs/WEB.md).", *(f"{n}." for n in web.get("notes", [])), ""]


def render_markdown(report: dict) -> str:
    env = report["environment"]
    cpu = env.get("cpu", {})
    gpu = ", ".join(env.get("gpu") or []) or "none"
    check = report.get("self_check")
    failed = bool(check) and not check["agrees"]
    out = ["# facemark benchmark" + (" -- SELF-CHECK FAILED (see the self-check line)" if failed else ""), ""]
    claims = report.get("verdict", True)
    if not claims:
        out += ["**Harness check only** (--quick or random weights): the figures show that every stage ran; they "
                "are not a performance verdict, so no speed-up or target is claimed.", ""]
    out += [self_check_line(check), ""]
    out += [f"Command: `{report.get('command', 'facemark bench')}`  ",
            f"Machine: {cpu.get('model', '?')}, {cpu.get('logical_cores', '?')} logical cores, "
            f"{env.get('threads', '?')} threads used; GPU: {gpu}  ",
            f"Model: {report.get('model_label', '?')}; NME on {report.get('nme_source', 'n/a')}", ""]
    out += ["## Model only (network time per face; each variant in its own worker process, blocks alternating)", "",
            model_table(report["rows"], claims), ""]
    peer = report.get("peer")
    if peer:
        out += ["## Peer: dlib 68-point shape predictor (one thread, its own worker process)", ""]
        if peer.get("skipped"):
            out += [f"Skipped: {peer['skipped']}", ""]
        else:
            out += [peer_table(peer["rows"], claims), "",
                    "Landmark boxes: dlib starts from the same ground-truth landmark boxes as our model, mapped onto "
                    "its HOG detector's box convention by a calibration fitted on faces outside the validation split "
                    f"({_calibration_text(peer)}); compared per face with our fastest ONNX CPU variant at the same "
                    "thread count (1). HOG detector: dlib as users run it, its own detector on each photo and the "
                    "predictor on the face it finds (NME over the faces found).", ""]
    if report.get("frontier"):
        out += ["## Frontier: accuracy per millisecond (one model, its landmark settings; composed 640x480 one-face "
                "photo)", "", frontier_table(report["frontier"]), "",
                "NME end to end on the validation faces found (detection rate beside it), the runtime's defaults "
                "otherwise; ms per face = the landmark stage (every pass and flip) for the one face; fps = the whole "
                "photo: decoding, Haar, landmarks.", ""]
    mediapipe = report.get("mediapipe")
    if mediapipe:
        out += ["## Peer: MediaPipe Face Mesh (468 points, its own environment and worker process, one core)", ""]
        if mediapipe.get("skipped"):
            out += [f"Skipped: {mediapipe['skipped']}", ""]
        else:
            rows = mediapipe["rows"]
            out += [peer_table(rows, claims=False), "",
                    f"MediaPipe {rows[0]['version']}, the same validation faces. NME: {rows[0]['nme_note']}. Face "
                    "regions: Face Mesh on a region of twice each face's landmark box (its detector needs context). "
                    "Own detector: BlazeFace + Face Mesh on each whole photo (NME over the faces found).", ""]
    if report.get("detectors"):
        out += ["## Detectors (Haar and the fetched CNN detectors, each at its defaults)", "",
                detector_table(report["detectors"]), "",
                "ms: detection alone on the composed 640x480 one-face photo; photo fps: decode + detection + "
                "landmarks there (the model's default presence threshold); both with the detectors alternating "
                "round by round. Recall: IoU >= 0.3 with the landmark box, on validation faces shrunk into a "
                "640x480 frame and on the validation photos; false boxes: raw detector boxes on their face-free "
                "strips (the presence score removes most). NME and detection rate: the whole pipeline at the runtime's "
                f"default passes (refine {report['detectors'][0].get('nme_refine', 1)}).",
                ""]
    if report.get("pipeline"):
        out += ["## End to end (decode + Haar detection + crops + inference + decoding, per image)", "",
                pipeline_table(report["pipeline"]), ""]
    if report.get("video"):
        out += ["## Video (`runtime video` on a composed clip of a real face moving over a real background)", "",
                video_table(report["video"]), "",
                "fps over the whole clip including decoding; NME of the reported (smoothed) points against the "
                "face's placed annotation, over the frames where it was found; best of the alternating rounds.", ""]
    throughput = report.get("throughput")
    if throughput:
        out += ["## Folder throughput (`runtime predict` on a folder, same run)", "",
                throughput_table(throughput, claims), "",
                f"{throughput['rows'][0]['images']} images of {throughput['model']}'s benchmark folder; best of "
                f"{throughput['rounds']} alternating round(s). previous = one image after another with the detector "
                "before copy sizing; pipelined = today's default runner. Largest landmark difference pipelined vs "
                f"one-by-one (same settings): {_num(throughput['max_landmark_diff_px'], 3)} px.", ""]
    serve = report.get("serve")
    if serve:
        out += ["## Serving (`facemark serve` on loopback, same run)", "", serve_table(serve), "",
                f"{serve['requests']} requests of one photo each ({serve['photos']} photos in turn) from "
                f"{serve['clients']} concurrent HTTP clients against `{serve['server']}`. The server's faces vs "
                f"local predict on every photo: largest landmark difference {_num(serve['max_landmark_diff_px'], 3)} "
                f"px, {serve['face_count_mismatches']} face-count mismatches. Server exits during the loads: "
                f"{serve.get('server_exits')} (peak RSS: the server's whole process tree).", ""]
    if report.get("ray"):
        out += ray_section(report["ray"])
    if report.get("web"):
        out += web_section(report["web"])
    limit = report.get("limit") or {}
    if limit:
        out += ["## Limit", "",
                f"{_num(limit.get('gflops_per_face'), 2)} GFLOP per face (torch FlopCounterMode, "
                f"{limit.get('image_size')} px); fastest variant {limit.get('fastest', '?')} at "
                f"{_num(limit.get('ms_per_face'))} ms/face = {_num(limit.get('achieved_gflops'), 1)} GFLOP/s "
                "(for int8 read it as GOP/s).", ""]
    if report.get("targets"):
        out += ["## Targets", "", markdown_table(["Target", "Measured", "Met"],
                                                 [[t["target"], t["measured"], t["met"]] for t in report["targets"]]),
                ""]
    out += ["## Environment", "", markdown_table(["Item", "Value"], _environment_rows(env)), ""]
    if report.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(out)


def _environment_rows(env: dict) -> list[list[str]]:
    cpu = env.get("cpu", {})
    rows = [["CPU", cpu.get("model", "?")], ["CPU flags", " ".join(cpu.get("flags", [])) or "-"],
            ["Logical cores / threads used", f"{cpu.get('logical_cores', '?')} / {env.get('threads', '?')}"],
            ["GPU", ", ".join(env.get("gpu") or []) or "none"], ["OS", env.get("os", "?")]]
    rows += [[f"{name} version", v] for name, v in env.get("versions", {}).items()]
    rows.append(["ONNX Runtime providers", ", ".join(env.get("onnxruntime_providers", []))])
    rows += [[f"sha256 {name}", f"`{digest[:16]}`"] for name, digest in env.get("model_sha256", {}).items()]
    return rows


def draw_chart(report: dict, path: str | os.PathLike) -> None:
    """Median ms per face of every row (and the peer), p90 as a whisker (facemark.plots)."""
    bars = [(f"{r['variant']} {r['provider']} b{r['batch']} {r.get('threads', '?')}t", r["ms_per_face"], r["p90_ms"],
             r["variant"].split("-")[0]) for r in report["rows"]]
    for p in (report.get("peer") or {}).get("rows", []):
        if p.get("ms") is not None:
            bars.append((f"dlib {p['protocol']} 1t", p["ms"], p["p90_ms"], "dlib"))
    plot_latency(bars, path, "Latency per face (lower is better)")


def _json_safe(value):
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_reports(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """report.md, report.json and chart.png in `out_dir`, each written atomically; returns their paths."""
    out = Path(out_dir)
    paths = {"markdown": out / "report.md", "json": out / "report.json", "chart": out / "chart.png"}
    write_text_atomic(paths["json"], json.dumps(_json_safe(report), indent=2) + "\n")
    write_text_atomic(paths["markdown"], render_markdown(report))
    try:
        draw_chart(report, paths["chart"])
    except FacemarkError:  # matplotlib absent (a runtime-only install): the tables are the report
        del paths["chart"]
    return paths
