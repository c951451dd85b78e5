"""The wire format between `facemark serve` (runtime/serving/server.py) and its client
(runtime/serving/client.py): model and tensor names, and faces packed into / unpacked from Triton tensors.
Numpy only, so both sides and the tests share it without Triton installed.

Model `facemark` (the whole pipeline), per image of a request (the batch dimension is the request's images):
  input  image            BYTES  [1]        the encoded file (JPEG, PNG, ...)
  output face_count       INT32  [1]        F, the faces found
         boxes            FP64   [F', 4]    x, y, w, h of the box the last crop was made from
         detector_boxes   FP64   [F', 4]    the raw Haar boxes
         scores           FP64   [F']       face presence in [0, 1] (NaN: the model has no presence head)
         detector_scores  FP64   [F']       the cascade's level weight
         landmarks        FP32   [F', 68, 2] image pixels
         landmark_scores  FP32   [F', 68]   per-point confidence
         present          UINT8  [F', 4]    1 where score, detector_score, detector_box, landmark_scores (in that
                                            order) has a value; 0: none (e.g. a model without a presence head)
         error            BYTES  [1]        "" or the problem (the client prefixes the file name)
F' is the largest F of the request's images (at least 1: PyTriton cannot ship an empty tensor); rows past an
image's own F, and values `present` marks absent, are 0: no response holds NaN (JSON-encoded outputs stay valid
JSON). Boxes and scores travel as float64, so the client rounds exactly the numbers local predict rounds.
Model `facemark_crops`: the landmark model alone, as exported (image [N, 1, S, S] -> landmarks [N, 68, 2] and
the model's other outputs). Model `facemark_info`: any `request` -> `info`, the JSON header of predict's
document (model summary, providers, detector settings) so a client writes the same document as local predict.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence

import numpy as np

from facemark.errors import FacemarkError
from facemark.runtime.landmarker import Detections, Face
from facemark.scheme import NUM_POINTS

PIPELINE_MODEL = "facemark"
CROPS_MODEL = "facemark_crops"
INFO_MODEL = "facemark_info"

IMAGE_INPUT = "image"
INFO_INPUT = "request"
INFO_OUTPUT = "info"
# name -> (dtype, per-face shape); face_count and error are per image.
FACE_OUTPUTS: dict[str, tuple[type, tuple[int, ...]]] = {
    "boxes": (np.float64, (4,)),
    "detector_boxes": (np.float64, (4,)),
    "scores": (np.float64, ()),
    "detector_scores": (np.float64, ()),
    "landmarks": (np.float32, (NUM_POINTS, 2)),
    "landmark_scores": (np.float32, (NUM_POINTS,)),
}
FACE_COUNT = "face_count"
PRESENT = "present"
# face field -> its output; `present` has one column per field, in this order
OPTIONAL_FIELDS = {"score": "scores", "detector_score": "detector_scores", "detector_box": "detector_boxes",
                   "landmark_scores": "landmark_scores"}
ERROR = "error"


def pack_detections(images: Sequence[Detections | str]) -> dict[str, np.ndarray]:
    """One request's response: each image's Detections, or the error text of an image that failed."""
    faces = [[] if isinstance(d, str) else d.faces for d in images]
    width = max(1, *(len(f) for f in faces))  # never 0 wide: PyTriton cannot ship an empty tensor
    packed = {name: np.zeros((len(images), width, *shape), dtype=dtype)
              for name, (dtype, shape) in FACE_OUTPUTS.items()}
    packed[PRESENT] = np.zeros((len(images), width, len(OPTIONAL_FIELDS)), dtype=np.uint8)
    for i, image_faces in enumerate(faces):
        for j, face in enumerate(image_faces):
            packed["boxes"][i, j] = face.box
            packed["landmarks"][i, j] = face.landmarks
            for column, (field_name, output) in enumerate(OPTIONAL_FIELDS.items()):
                value = getattr(face, field_name)
                if value is not None:
                    packed[output][i, j] = value
                    packed[PRESENT][i, j, column] = 1
    packed[FACE_COUNT] = np.array([[len(f)] for f in faces], dtype=np.int32)
    errors = [d if isinstance(d, str) else "; ".join(d.problems) for d in images]
    packed[ERROR] = np.array([[e.encode()] for e in errors], dtype=np.object_)
    return packed


def unpack_image(outputs: dict[str, np.ndarray], index: int, image_size: tuple[int, int]) -> tuple[list[Face], str]:
    """Faces of image `index` of a response (as FaceLandmarker returns them) and its error text ("" if none)."""
    count = int(outputs[FACE_COUNT][index].reshape(-1)[0])
    faces = []
    for j in range(count):
        present = dict(zip(OPTIONAL_FIELDS, outputs[PRESENT][index, j].astype(bool), strict=True))
        scores = outputs["landmark_scores"][index, j]
        faces.append(Face(
            box=tuple(float(v) for v in outputs["boxes"][index, j]),  # type: ignore[arg-type]
            landmarks=outputs["landmarks"][index, j].astype(np.float32),
            score=float(outputs["scores"][index, j]) if present["score"] else None,
            detector_score=float(outputs["detector_scores"][index, j]) if present["detector_score"] else None,
            detector_box=(tuple(float(v) for v in outputs["detector_boxes"][index, j])  # type: ignore[arg-type]
                          if present["detector_box"] else None),
            landmark_scores=scores.astype(np.float32) if present["landmark_scores"] else None,
            image_size=image_size,
        ))
    error = outputs[ERROR][index].reshape(-1)[0]
    return faces, error.decode() if isinstance(error, bytes) else str(error)


def info_json(header: dict) -> np.ndarray:
    return np.array([json.dumps(header).encode()], dtype=np.object_)


class ServeUnavailable(FacemarkError):
    """The serve extra (PyTriton, tritonclient) is not installed."""


def serve_extra(module: str, needed_by: str):
    """Import a module of the serve extra, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ServeUnavailable(f"{needed_by} needs {module} ({exc}): pip install 'facemark[serve]'") from None
