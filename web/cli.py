"""`facemark web OUT`: the static browser folder (web/build.py). Light at import: typer only."""

from __future__ import annotations

from pathlib import Path

import typer

from facemark.runtime.detectors import DetectorChoice


def web_command(
    out: Path = typer.Argument(..., help="The folder to write (new, empty, or an earlier facemark web folder)."),
    model: Path = typer.Option(None, "--model", "-m", help="A model exported with `facemark export` "
                               "(default: the shipped int8 model, the fastest in WebAssembly: docs/WEB.md)."),
    detector: DetectorChoice = typer.Option("haar", "--detector", help="Face detector of the page: haar "
                                            "(OpenCV.js, the Python runtime's cascade and settings) or a CNN "
                                            "detector fetched with `facemark detectors fetch NAME` (its file is "
                                            "copied into the folder)."),
    node_modules: Path = typer.Option(None, "--node-modules", help="A node_modules folder with the pinned "
                                      "onnxruntime-web and @techstark/opencv-js (default: $FACEMARK_WEB_MODULES, "
                                      "else web/node_modules: `make web-deps`)."),
) -> None:
    """Write a static folder that finds faces and their 68 points in the browser. It holds the model, ONNX Runtime
    Web, OpenCV.js, the cascade, facemark.js and a demo index.html (host it with the COOP/COEP headers of
    docs/WEB.md for WebAssembly threads)."""
    from facemark.web.build import build_web_folder

    built = build_web_folder(out, model, detector.value, node_modules)
    print(f"{built.path}: {built.model_file} ({built.precision}), detector {built.detector}, "
          f"{built.total_bytes / 1e6:.1f} MB; serve it and open index.html (docs/WEB.md)")
