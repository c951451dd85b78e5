"""JSON Schema (draft 2020-12) of what `facemark runtime predict` and `runtime video` write: the one source of
truth for the output format (`facemark schema` prints it; tests validate real outputs against it).

- "predict": the JSON document of `runtime predict` (--json, or stdout);
- "image": one `images[]` entry = one line of `runtime predict --jsonl`;
- "video": one line of `runtime video --jsonl` (one frame);
- "video-document": the JSON document of `runtime video --json`.
Coordinates are 0-based image pixels (pixel centres at integers); JSON never holds NaN.
"""

from __future__ import annotations

import json

from facemark.scheme import NUM_POINTS

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_NAMES = ("predict", "image", "video", "video-document")

_NUMBER = {"type": "number"}
_BOX = {"type": "array", "items": _NUMBER, "minItems": 4, "maxItems": 4,
        "description": "x, y, width, height in image pixels"}
_UNIT = {"type": "number", "minimum": 0, "maximum": 1}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


FACE = {
    "type": "object",
    "required": ["box", "landmarks", "score", "detector_score", "detector_box", "landmark_scores"],
    "additionalProperties": False,
    "properties": {
        "box": {**_BOX, "description": "the box the last crop was made from (calibrated detector box, refined)"},
        "landmarks": {"type": "array", "minItems": NUM_POINTS, "maxItems": NUM_POINTS,
                      "items": {"type": "array", "items": _NUMBER, "minItems": 2, "maxItems": 2},
                      "description": "the iBUG 68 points, (x, y) in image pixels"},
        "score": {**_nullable(_UNIT), "description": "face presence in [0, 1] (models with a presence head)"},
        "detector_score": {**_nullable(_NUMBER), "description": "the Haar cascade's level weight"},
        "detector_box": {**_nullable(_BOX), "description": "the raw Haar box, before calibration"},
        "landmark_scores": {**_nullable({"type": "array", "items": _UNIT, "minItems": NUM_POINTS,
                                         "maxItems": NUM_POINTS}),
                            "description": "per-point confidence (pip head)"},
        "pose": {"type": "object", "required": ["yaw", "pitch", "roll"], "additionalProperties": False,
                 "properties": {k: _NUMBER for k in ("yaw", "pitch", "roll")},
                 "description": "head pose in degrees (--pose): facemark.geometry.head_pose"},
    },
}

PIPELINE = {
    "type": "object", "required": ["refine", "tta", "min_score"], "additionalProperties": False,
    "properties": {"refine": {"type": "integer", "minimum": 0, "description": "landmark passes after the first"},
                   "tta": {"enum": ["none", "flip"], "description": "test-time augmentation"},
                   "min_score": _nullable(_UNIT)},
    "description": "the landmark settings that change results (FaceLandmarker.describe)",
}

IMAGE = {
    "type": "object",
    "required": ["path", "width", "height", "faces", "error"],
    "additionalProperties": False,
    "properties": {
        "path": {"type": "string", "description": "the input's name as UTF-8 text; a name that is not valid "
                 "UTF-8 has each undecodable byte as U+FFFD here and its exact bytes in path_bytes"},
        "path_bytes": {"type": "string", "contentEncoding": "base64", "description": "only for a name that is "
                       "not valid UTF-8: its exact bytes (base64)"},
        "width": _nullable({"type": "integer", "minimum": 1}),
        "height": _nullable({"type": "integer", "minimum": 1}),
        "faces": {"type": "array", "items": {"$ref": "#/$defs/face"}},
        "error": {**_nullable({"type": "string"}), "description": "one line naming the file and the problem"},
        "pipeline": {**PIPELINE, "description": "--jsonl lines only: " + PIPELINE["description"]},
        "run": {"type": "object", "required": ["model_sha256", "detector"],
                "description": "--jsonl lines only: the model's sha256 and the settings that change results "
                               "(--resume refuses lines of other ones)"},
    },
}

# The metadata keys of the model block (facemark.metadata.SUMMARY_KEYS), in their real types; each is absent
# where the file does not record it.
MODEL_METADATA = {
    "arch": {"type": "string"},
    "head": {"type": "string", "description": "pip | regression"},
    "precision": {"type": "string", "description": "fp32 | fp16 | fp16w | int8"},
    "points": {"type": "string", "description": "the point scheme: ibug68"},
    "val_nme": {**_nullable(_NUMBER), "description": "the checkpoint's validation NME (a fraction of the "
                "inter-ocular distance: 0.038 = 3.8 %)"},
    "source_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "of the checkpoint"},
    "exported_at": {"type": "string", "description": "ISO 8601, UTC"},
    "train_data": {"type": "array", "items": {"type": "string"},
                   "description": "the data paths the model was trained on, normalised (absolute where "
                                  "export knew the folder training ran in)"},
}

PREDICT = {
    "type": "object",
    "required": ["model", "detector", "pipeline", "complete", "images"],
    "additionalProperties": False,
    "properties": {
        "model": {"type": "object", "required": ["path", "providers", "parity"],
                  "properties": {"path": _nullable({"type": "string"}),
                                 "providers": {"type": "array", "items": {"type": "string"}},
                                 **MODEL_METADATA,
                                 "parity": {"enum": ["verified", "unverified"],
                                            "description": "unverified: exported with --no-verify"},
                                 "presence": {"enum": ["applied", "not trusted"],
                                              "description": "whether the presence threshold is applied (absent "
                                                             "for models exported before it was recorded)"}},
                  "description": "the model's facemark metadata summary, its file and the active providers"},
        "detector": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}},
                     "description": "HaarDetector.config()"},
        "pipeline": PIPELINE,
        "complete": {"type": "boolean", "description": "false when the run was interrupted"},
        "images": {"type": "array", "items": {"$ref": "#/$defs/image"}},
    },
}

VIDEO = {
    "type": "object",
    "required": ["frame", "time", "detected", "faces"],
    "additionalProperties": False,
    "properties": {
        "frame": {"type": "integer", "minimum": 0},
        "time": {"type": "number", "minimum": 0, "description": "seconds from the start of the stream"},
        "detected": {"type": "boolean", "description": "Haar ran on this frame (else the faces were tracked)"},
        "faces": {"type": "array", "items": {"$ref": "#/$defs/face"}},
    },
}

VIDEO_DOCUMENT = {
    "type": "object",
    "required": ["model", "detector", "pipeline", "source", "tracking", "complete", "frames", "summary"],
    "additionalProperties": False,
    "properties": {
        **{key: PREDICT["properties"][key] for key in ("model", "detector", "pipeline")},
        "source": {"type": "object", "required": ["path", "kind", "fps", "frames", "width", "height"],
                   "additionalProperties": False,
                   "properties": {"path": {"type": "string", "description": "the file, camera index or URL"},
                                  "kind": {"enum": ["file", "camera", "stream"]},
                                  "fps": {"type": "number", "exclusiveMinimum": 0},
                                  "frames": {**_nullable({"type": "integer", "minimum": 1}),
                                             "description": "the count it declares (null: a camera, a live "
                                                            "stream)"},
                                  "width": _nullable({"type": "integer", "minimum": 1}),
                                  "height": _nullable({"type": "integer", "minimum": 1})}},
        "tracking": {"type": "object", "required": ["detect_every", "full_scan_every", "smooth", "pose"],
                     "properties": {"detect_every": {"type": "integer", "minimum": 1},
                                    "full_scan_every": {"type": "integer", "minimum": 1},
                                    "smooth": {"type": "boolean"}, "pose": {"type": "boolean"}}},
        "complete": {"type": "boolean", "description": "false when the run was interrupted or the stream dropped"},
        "frames": {"type": "array", "items": {"$ref": "#/$defs/frame"}},
        "summary": {"type": "object",
                    "required": ["frames", "faces", "detections", "full_scans", "losses", "skipped", "damaged",
                                 "seconds", "fps", "interrupted", "ended"],
                    "properties": {**{k: {"type": "integer", "minimum": 0} for k in (
                        "frames", "faces", "detections", "full_scans", "losses", "skipped", "damaged")},
                        "seconds": _NUMBER, "fps": _NUMBER, "interrupted": {"type": "boolean"},
                        "ended": {**_nullable({"type": "string"}),
                                  "description": "a network stream that ended early: the one line"}}},
    },
}

_ROOTS = {"predict": PREDICT, "image": IMAGE, "video": VIDEO, "video-document": VIDEO_DOCUMENT}
_TITLES = {"predict": "facemark runtime predict: JSON document",
           "image": "facemark runtime predict: one images[] entry (a --jsonl line)",
           "video": "facemark runtime video: one frame (a --jsonl line)",
           "video-document": "facemark runtime video: JSON document (--json)"}


def schema(name: str) -> dict:
    """The self-contained JSON Schema of one output: one of SCHEMA_NAMES."""
    if name not in _ROOTS:
        raise ValueError(f"schema {name!r}: choose one of {', '.join(SCHEMA_NAMES)}")
    return {"$schema": SCHEMA_DIALECT, "$id": f"urn:facemark:schema:{name}", "title": _TITLES[name],
            **_ROOTS[name], "$defs": {"face": FACE, "image": IMAGE, "frame": VIDEO}}


def schema_text(name: str) -> str:
    return json.dumps(schema(name), indent=2) + "\n"
