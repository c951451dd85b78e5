"""Writes the static folder of `facemark web` (docs/WEB.md).

Every setting the page needs comes from the Python runtime itself: the detector's configuration and the
pipeline settings from a `FaceLandmarker` on the model (FaceLandmarker.describe), the metadata keys and the ONNX
input / output names from facemark.metadata. The page reads the crop contract and the detector calibration from
the model's own metadata, as the Python runtime does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import cv2

from facemark import metadata
from facemark.errors import FacemarkError
from facemark.fileio import check_writable_folder, file_sha256, write_error
from facemark.runtime.detectors import HAAR

CONFIG_FILE = "facemark-web.json"  # read by facemark.js (its CONFIG_FILE)
CONFIG_FORMAT = "facemark-web/1"
MODULES_ENV = "FACEMARK_WEB_MODULES"  # a node_modules folder holding the pinned packages
STATIC_FILES = ("facemark.js", "index.html", "LICENSES.md")
# What the folder takes from node_modules: (package, file in the package, path in the folder). ONNX Runtime
# Web ships no LICENSE file: its MIT notice is in each file's header (static/LICENSES.md).
ORT_WEB = "onnxruntime-web"
OPENCV_JS = "@techstark/opencv-js"
RUNTIME_FILES = (
    (ORT_WEB, "dist/ort.wasm.min.mjs", "ort/ort.wasm.min.mjs"),
    (ORT_WEB, "dist/ort-wasm-simd-threaded.mjs", "ort/ort-wasm-simd-threaded.mjs"),
    (ORT_WEB, "dist/ort-wasm-simd-threaded.wasm", "ort/ort-wasm-simd-threaded.wasm"),
    (OPENCV_JS, "dist/opencv.js", "opencv/opencv.js"),
    (OPENCV_JS, "LICENSE", "licenses/opencv-js.LICENSE.txt"),
)
# Static hosts that read a _headers file (Netlify, Cloudflare Pages) send these: WebAssembly threads need a
# cross-origin isolated page (docs/WEB.md).
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
INSTALL_HINT = "run `make web-deps` (npm ci in the repository's web/ folder) or pass --node-modules DIR"


def web_folder() -> Path:
    """The package folder (facemark.web): web/ of the repository in an editable install."""
    return Path(str(resources.files("facemark.web")))


def pinned_versions() -> dict[str, str]:
    """The versions web/package.json pins (the one place they are stated)."""
    package = json.loads((web_folder() / "package.json").read_text(encoding="utf-8"))
    return dict(package["dependencies"])


def find_node_modules(given: str | os.PathLike | None = None) -> Path:
    """The node_modules folder holding the pinned ONNX Runtime Web and OpenCV.js, at their pinned versions."""
    candidates = ([Path(given)] if given is not None
                  else [Path(p) for p in [os.environ.get(MODULES_ENV)] if p] + [web_folder() / "node_modules"])
    pins = pinned_versions()
    for folder in candidates:
        if not all((folder / package / "package.json").is_file() for package in (ORT_WEB, OPENCV_JS)):
            continue
        for package in (ORT_WEB, OPENCV_JS):
            found = json.loads((folder / package / "package.json").read_text(encoding="utf-8"))["version"]
            if found != pins[package]:
                raise FacemarkError(f"{folder / package}: version {found}, facemark web pins {pins[package]}; "
                                    f"{INSTALL_HINT}")
        return folder
    where = ", ".join(str(c) for c in candidates)
    raise FacemarkError(f"{where}: ONNX Runtime Web and OpenCV.js not found; {INSTALL_HINT}")


@dataclass(frozen=True)
class WebFolder:
    path: Path
    model_file: str
    precision: str
    detector: str
    total_bytes: int


def haar_detector(landmarker) -> tuple[dict, dict[str, bytes]]:
    """The config entry and the file (the cascade) of the runtime's Haar detector."""
    haar = landmarker.detector
    if haar.octaves:
        raise FacemarkError("the octave Haar search is not available in the browser")
    settings = haar.config()
    name = settings.pop("name")
    window = int(cv2.CascadeClassifier(str(haar.cascade_path)).getOriginalWindowSize()[0])  # not in OpenCV.js
    entry = {"kind": "haar", "name": name, "cascade_file": haar.cascade_path.name,
             "settings": {**settings, "window": window}, "calibration": None}
    return entry, {haar.cascade_path.name: haar.cascade_path.read_bytes()}


def cnn_detector(landmarker) -> tuple[dict, dict[str, bytes]]:
    """The config entry and the file of a CNN detector: the file `facemark detectors fetch` cached (hash
    checked), its input made dynamic as the runtime makes it; its settings, decoder and calibration."""
    from facemark.runtime import cnn_detector as cnn
    from facemark.runtime.detector_files import read_detector_file, with_dynamic_input

    detector = landmarker.detector
    spec = detector.spec
    file_name = f"{detector.name}.onnx"
    settings = {"input_name": spec.input_name, "mean": list(spec.mean), "rgb": spec.rgb,
                "input_side": detector.input_side, "min_score": detector.min_score,
                "decoder": spec.decode.__name__.removeprefix("decode_"), "stride_multiple": cnn.STRIDE_MULTIPLE,
                "nms_iou": cnn.NMS_IOU, "max_candidates": cnn.MAX_CANDIDATES, "anchors": cnn.FACEBOXES_ANCHORS,
                "variance": cnn.FACEBOXES_VARIANCE}
    entry = {"kind": "cnn", "name": detector.name, "file": file_name, "sha256": spec.file.sha256,
             "settings": settings, "calibration": asdict(spec.calibration) if spec.calibration else None}
    data = with_dynamic_input(read_detector_file(detector.name, spec.file), spec.input_name)
    return entry, {file_name: data}


def web_config(landmarker, model_file: str, model_sha256: str, detector: dict) -> dict:
    """facemark-web.json: what facemark.js cannot read from the model itself, taken from the runtime."""
    from facemark.runtime.landmarker import DUPLICATE_IOU, SCORE_DIGITS

    described = landmarker.describe()
    return {
        "format": CONFIG_FORMAT,
        "model": {"file": model_file, "sha256": model_sha256, **described["model"], "path": None,
                  "providers": ["wasm"]},
        "metadata_keys": {"contract": metadata.CONTRACT, "detector_calibration": metadata.DETECTOR_CALIBRATION,
                          "precision": metadata.PRECISION},
        "outputs": {"input": metadata.INPUT_NAME, "landmarks": metadata.OUTPUT_NAME,
                    "landmark_scores": metadata.LANDMARK_SCORES, "face_score": metadata.FACE_SCORE},
        "detector": detector,
        # FACE_ORDER: the page orders faces as the runtime does
        "pipeline": {**described["pipeline"], "duplicate_iou": DUPLICATE_IOU,
                     "face_order": "presence" if landmarker.by_presence else "detector", "score_digits": SCORE_DIGITS},
        "runtimes": pinned_versions(),
    }


def build_web_folder(out: str | os.PathLike, model: str | os.PathLike | None = None, detector: str = "haar",
                     node_modules: str | os.PathLike | None = None) -> WebFolder:
    """Write the folder at `out` (built beside it and renamed into place: never half-written). An existing
    `out` is replaced only when it is an earlier facemark web folder (it holds facemark-web.json) or empty."""
    from facemark.runtime.landmarker import FaceLandmarker, resolve_model_path

    target = Path(out)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / CONFIG_FILE).is_file())):
        raise FacemarkError(f"{target}: exists and is not a facemark web folder; name a new or empty folder")
    modules = find_node_modules(node_modules)
    model_path = Path(resolve_model_path(model))
    landmarker = FaceLandmarker(model_path, device="cpu", detector=detector)
    entry, detector_files = (haar_detector if detector == HAAR else cnn_detector)(landmarker)
    config = web_config(landmarker, model_path.name, file_sha256(model_path), entry)
    check_writable_folder(target.parent if target.parent != Path("") else Path("."), "folder for the web build")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise write_error(target, exc) from None
    try:
        static = web_folder() / "static"
        for name in STATIC_FILES:
            shutil.copyfile(static / name, staging / name)
        shutil.copyfile(model_path, staging / model_path.name)
        for name, data in detector_files.items():
            (staging / name).write_bytes(data)
        for package, source, dest in RUNTIME_FILES:
            (staging / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(modules / package / source, staging / dest)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (staging / "_headers").write_text("/*\n" + "".join(f"  {k}: {v}\n" for k, v in ISOLATION_HEADERS.items()),
                                          encoding="utf-8")
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise write_error(target, exc) from None
    total = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return WebFolder(target, model_path.name, landmarker.info.precision, config["detector"]["name"], total)
