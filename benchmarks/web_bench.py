"""The browser row of `facemark bench --model`: milliseconds per face in headless Chromium (ONNX Runtime Web,
WebAssembly, 1 and 2 threads) beside Python's ONNX Runtime on the same machine, in one run.

    python -m facemark.benchmarks.web_bench [--model M.onnx] [--image PHOTO] [--repeat 30] [--json F]

For each precision (the model's own and, for an int8 QDQ file, its fp32 twin for speed only: the same graph with
the weights dequantized and the activations' quantize / dequantize pairs removed, so the two differ only in their
arithmetic; its points are not the model's, because the int8 file's activations saturate at their calibrated
ranges, so it is timed, never shipped: `facemark export` makes a real fp32 file from a checkpoint) a
`facemark web` folder is served on 127.0.0.1 with the COOP/COEP headers, and index.html?image=PHOTO&repeat=N
&threads=T times the landmark stage (crop, network, decoding) on the photo's faces, all of them in one batch as
the Python runtime batches them, N times after a warm-up (median per face). Python's figure is
facemark.inference.predict_faces on the same boxes with the same thread count. The page reports over HTTP on
real time (Chromium's --virtual-time-budget would virtualise its clock). Without Chromium or the npm packages
the section is {"skipped": why}.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from facemark import metadata
from facemark.errors import FacemarkError
from facemark.imageio import read_gray
from facemark.inference import predict_faces
from facemark.runtime.landmarker import DEFAULT_MODEL_PATH, FaceLandmarker
from facemark.runtime.session import LandmarkModel

SAMPLES = Path(DEFAULT_MODEL_PATH).parent / "samples"
DEFAULT_IMAGE = SAMPLES / "2008_004176.jpg"  # seven faces of the shipped samples
THREADS = (1, 2)
DEFAULT_REPEAT = 30
QUICK_REPEAT = 5


def dequantized_copy(model_path: Path, out_path: Path) -> Path:
    """The fp32 speed twin of an int8 QDQ model (module docstring): each quantized initializer dequantized into a
    float one, each activation's QuantizeLinear -> DequantizeLinear pair removed; metadata kept, precision fp32."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    renamed: dict[str, str] = {}
    dropped, floats = [], []
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = node.input[0]
        if source in initializers:  # a weight or bias: w = (q - zero_point) * scale, per axis
            q = numpy_helper.to_array(initializers[source]).astype(np.float64)
            scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
            zero = (numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64) if len(node.input) > 2
                    else np.zeros_like(scale))
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if scale.ndim:
                shape[axis] = -1
            value = (q - zero.reshape(shape)) * scale.reshape(shape)
            floats.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
            dropped.append(node)
        elif source in producer and producer[source].op_type == "QuantizeLinear":
            renamed[node.output[0]] = producer[source].input[0]
            dropped += [node, producer[source]]
    for node in dropped:
        if node in graph.node:
            graph.node.remove(node)
    def original(name: str) -> str:  # through chains (a requantized activation: DQ -> Q -> DQ)
        while name in renamed:
            name = renamed[name]
        return name

    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = original(name)
    for output in graph.output:
        output.name = original(output.name)
    graph.initializer.extend(floats)
    used = {name for node in graph.node for name in node.input}
    for initializer in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(initializer)
    for prop in model.metadata_props:
        if prop.key == metadata.PRECISION:
            prop.value = "fp32"
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return out_path


def python_ms_per_face(model_path: Path, gray: np.ndarray, boxes: list, threads: int, repeat: int) -> float:
    """Median ms per face of predict_faces (crop, network, decoding) on the boxes, in one batch."""
    model = LandmarkModel(model_path, provider="cpu", threads=threads)
    faces = [(gray, box) for box in boxes]
    predict_faces(model, faces)  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        predict_faces(model, faces)
        times.append((time.perf_counter() - start) * 1e3 / len(faces))
    return float(np.median(times))


def web_benchmark(model: Path | None = None, image: Path = DEFAULT_IMAGE, repeat: int = DEFAULT_REPEAT,
                  fp32_twin: bool = True) -> dict:
    """The rows (module docstring), or {"skipped": why}. fp32_twin: also time an int8 model's fp32 twin (needs
    onnx, the train extra; left out with a note without it)."""
    from facemark.web.build import build_web_folder, find_node_modules, pinned_versions
    from facemark.web.serve import find_chromium, run_until_report, serve_folder

    chromium = find_chromium()
    if chromium is None:
        return {"skipped": "Chromium is not installed (make web-deps)"}
    try:
        find_node_modules()
    except FacemarkError as exc:
        return {"skipped": str(exc)}
    model_path = Path(model or DEFAULT_MODEL_PATH)
    landmarker = FaceLandmarker(model_path, device="cpu", threads=1)
    gray = read_gray(image)
    # every detection, calibrated, before the presence threshold: the boxes the page times (index.html)
    boxes = [landmarker.calibration.apply(d.box) for d in landmarker.find(gray, color="gray").detections]
    if not boxes:
        return {"skipped": f"{image}: no face found"}
    chromium_version = _chromium_version(chromium)
    rows = []
    with tempfile.TemporaryDirectory(prefix="facemark-web-bench-") as tmp:
        variants, notes = {landmarker.info.precision: model_path}, []
        if fp32_twin and landmarker.info.precision == "int8":
            try:
                variants["fp32"] = dequantized_copy(model_path, Path(tmp) / f"{model_path.stem}.fp32.onnx")
            except ModuleNotFoundError as exc:
                notes.append(f"no fp32 twin: {exc}")
        for precision, path in variants.items():
            folder = build_web_folder(Path(tmp) / f"site-{precision}", path).path
            shutil.copyfile(image, folder / image.name)
            with serve_folder(folder) as served:
                for threads in THREADS:
                    url = f"{served.url}index.html?image={image.name}&threads={threads}&repeat={repeat}&report=/report"
                    report = run_until_report(chromium, url, served.reports)
                    if report["entry"].get("error"):
                        return {"skipped": f"the page failed: {report['entry']['error']}"}
                    timing = report["timing"]
                    rows.append({"precision": precision, "threads": threads,
                                 "browser_ms_per_face": timing["model"]["median"],
                                 "python_ms_per_face": python_ms_per_face(path, gray, boxes, threads, repeat),
                                 "faces": len(boxes), "browser_faces": len(report["entry"]["faces"]),
                                 "cross_origin_isolated": timing["cross_origin_isolated"]})
    return {"image": image.name, "faces": len(boxes), "repeat": repeat, "chromium": chromium_version,
            "runtimes": pinned_versions(), "rows": rows, "notes": notes}


def _chromium_version(chromium: str) -> str:
    import subprocess

    done = subprocess.run([chromium, "--version"], capture_output=True, text=True, check=False, timeout=30)
    return done.stdout.strip() or "?"


def main(model: Path = typer.Option(None, "--model", help="Model (default: the shipped one)."),
         image: Path = typer.Option(DEFAULT_IMAGE, "--image", help="The photo whose faces are timed."),
         repeat: int = typer.Option(DEFAULT_REPEAT, "--repeat", min=1, help="Timed runs per configuration."),
         json_path: Path = typer.Option(None, "--json", help="Also write the result here.")) -> None:
    from facemark.benchmarks.throughput import print_json

    print_json(web_benchmark(model, image, repeat), json_path)


if __name__ == "__main__":
    typer.run(main)
