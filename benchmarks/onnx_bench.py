"""`facemark bench --model FILE.onnx`: an exported model (the shipped one has no checkpoint), without torch.

Rows: the model at batch 1 at each thread count of --threads (its own ONNX Runtime session per count, explicit
intra-op threads, no spinning, alternating blocks: facemark.benchmarks.model_speed), NME on the validation split
of --data; end to end on the composed scenes (FaceLandmarker defaults); the frontier of landmark settings (passes,
flip) -> validation NME end to end, ms per face and 640x480 fps at each thread count (facemark.benchmarks.frontier);
the detectors (Haar and every fetched CNN detector: speed, recall, false boxes, fps and NME end to end:
facemark.benchmarks.detector_bench);
video (runtime video's tracking
policies on a composed clip of a moving face: facemark.benchmarks.video_bench); folder throughput (previous runner vs
one-by-one vs pipelined); the peers: dlib's 68-point predictor (facemark.benchmarks.peer) and MediaPipe
Face Mesh (facemark.benchmarks.mediapipe_peer); with --serve, a loopback load test of `facemark serve`
(facemark.benchmarks.serve_load); with --ray, the Ray Data job against the local runner on the same photos
(facemark.benchmarks.ray_bench). The same report format as the checkpoint benchmark (facemark.benchmarks.report).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from facemark.benchmarks import pipeline as pipeline_mod
from facemark.benchmarks.detector_bench import detector_rows
from facemark.benchmarks.environment import describe_environment
from facemark.benchmarks.frontier import frontier_rows
from facemark.benchmarks.isolated import ORT, Payload, WorkerSpec, self_check, time_isolated
from facemark.benchmarks.mediapipe_peer import mediapipe_document
from facemark.benchmarks.model_speed import sample_inputs, time_models
from facemark.benchmarks.peer import make_peer, peer_document, peer_specs
from facemark.benchmarks.throughput import VALIDATION_SPLIT, benchmark_files, folder_throughput
from facemark.benchmarks.video_bench import bench_video_rows
from facemark.data import FaceRecord, load_records, split_records
from facemark.evaluation import evaluate
from facemark.fileio import file_sha256
from facemark.metadata import PARITY
from facemark.runtime.landmarker import FaceLandmarker
from facemark.runtime.session import LandmarkModel


def export_gate(metadata: dict[str, str]) -> bool | None:
    """Whether the model passed its export gates (the parity summary `facemark export` embeds), if recorded."""
    try:
        return json.loads(metadata.get(PARITY, "null") or "null").get("passed")
    except (ValueError, AttributeError):
        return None


def dlib_document(rows: list[dict], training: Sequence[FaceRecord], val: Sequence[FaceRecord], quick: bool,
                  notes: list[str]) -> dict:
    """dlib's predictor beside the model's rows (facemark.benchmarks.peer): its box calibration fitted on the
    training faces (never the validation ones; the bundled samples without --data), timed per face and
    per photo in worker processes of one thread on the bundled sample faces, scored on the validation faces."""
    peer, reason = make_peer(training or pipeline_mod.largest_sample_faces(30), notes)
    if peer is None:
        return {"skipped": reason}
    faces = tuple(pipeline_mod.sample_face_pairs())
    timed = time_isolated(peer_specs(peer), Payload(faces=faces), (1,), rounds=3 if quick else 10,
                          block=5 if quick else 20)
    return peer_document(peer, timed, rows, val)


def run_model_benchmark(model: Path, out: Path, threads: Sequence[int], data: Sequence[Path] = (),
                        quick: bool = False, progress: Callable[[str], None] = lambda _m: None,
                        serve: dict | None = None, peers: bool = True, ray: bool = False) -> dict:
    """The report document for one ONNX model (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    landmark_model = LandmarkModel(model, provider="cpu")
    info = landmark_model.info
    nme, nme_source, training, val = None, "n/a (no --data)", [], []
    if data:
        progress("NME")
        training, val = split_records(load_records(list(data), lambda _m: None), *VALIDATION_SPLIT)
        nme = evaluate(landmark_model, val).summary()["nme"]
        nme_source = f"{len(val)} validation faces of {', '.join(map(str, data))} (val_fraction 0.1, split seed 0)"
    progress("model timing")
    timed = time_models([model], list(threads), rounds=3 if quick else 15, block=5 if quick else 20)
    fastest = min(timed, key=lambda t: t["ms_per_face"])
    progress("self-check")
    check = self_check(WorkerSpec("self-check", ORT, str(model), fastest["threads"]),
                       Payload(crops=sample_inputs(model)), fastest["ms_per_face"], f"ort-{info.precision}",
                       calls=50 if quick else 300)
    size_mb = model.stat().st_size / 1e6
    rows = [{"variant": f"ort-{info.precision}", "provider": "cpu", "batch": 1, "threads": t["threads"],
             "ms_per_face": t["ms_per_face"], "p90_ms": t["p90"], "p99_ms": t["p99"], "min_ms": t["min"],
             "batch_median_ms": t["ms_per_face"], "throughput": 1000.0 / t["ms_per_face"], "speedup": None,
             "size_mb": size_mb, "max_abs_err": None, "nme": nme, "nme_note": None if nme is not None else nme_source,
             "gated": export_gate(info.raw), "repeats": t["samples"]} for t in timed]
    progress("end to end")
    landmarker = FaceLandmarker(model, device="cpu")
    scenes_dir = out / "scenes"  # the composed test photos, kept beside the report (as the checkpoint bench does)
    pipeline_rows = []
    for width, height, faces in pipeline_mod.DEFAULT_SCENES:
        row = pipeline_mod.time_pipeline(landmarker, pipeline_mod.compose_scene(width, height, faces, scenes_dir),
                                         3 if quick else 20)
        pipeline_rows.append({**row, "model": model.name})
    frontier = frontier_rows(model, val, threads, scenes_dir, repeats=3 if quick else 20, progress=progress)
    detectors, detector_notes = detector_rows(model, val, scenes_dir, quick, progress)
    notes += detector_notes
    progress("video")
    video = bench_video_rows(landmarker, out / "clips", quick)
    progress("folder throughput")
    files = benchmark_files([] if quick else val)
    throughput = folder_throughput(model, files[:12] if quick else files, rounds=1 if quick else 2)
    throughput["model"] = model.name
    serve_section = None
    if serve is not None:  # {"requests": N, "clients": C}: the loopback load test of facemark serve
        progress("serve load")
        from facemark.benchmarks.serve_load import serve_benchmark

        if quick:
            serve = {**serve, "requests": min(serve["requests"], 48)}
        serve_section = serve_benchmark(model, files[:12] if quick else files, log=out / "serve.log", **serve)
    peer_doc, mediapipe_doc = None, None
    if peers:
        progress("dlib peer")
        peer_doc = dlib_document(rows, training, val, quick, notes)
        progress("MediaPipe peer")
        mediapipe_doc = mediapipe_document(val, 1, repeats=1 if quick else 3)
    ray_section = None
    if ray:  # the Ray Data job against the local runner (facemark.benchmarks.ray_bench); skipped without the extra
        progress("Ray Data")
        from facemark.benchmarks.ray_bench import ray_benchmark

        ray_section = ray_benchmark(model, files[:12] if quick else files)
    progress("browser")  # headless Chromium beside Python's ONNX Runtime (facemark.benchmarks.web_bench)
    from facemark.benchmarks.web_bench import DEFAULT_REPEAT, QUICK_REPEAT, web_benchmark

    web_section = web_benchmark(model, repeat=QUICK_REPEAT if quick else DEFAULT_REPEAT, fp32_twin=not quick)
    notes.append("ONNX-only benchmark (--model): no eager PyTorch or re-exported rows; pass --checkpoint for those.")
    return {"command": "facemark " + shlex.join(sys.argv[1:]), "quick": quick,
            "model_label": f"{model} ({info.contract.size} px, {info.precision})", "nme_source": nme_source,
            "environment": describe_environment(max(threads), {model.name: file_sha256(model)}),
            "rows": rows, "pipeline": pipeline_rows, "video": video, "throughput": throughput,
            "serve": serve_section, "ray": ray_section, "peer": peer_doc, "mediapipe": mediapipe_doc,
            "frontier": frontier, "detectors": detectors, "web": web_section,
            "limit": {},
            "notes": notes, "verdict": not quick, "targets": [], "self_check": check}
