"""ONNX `metadata_props` keys (docs/DESIGN.md section 4): written by export, read by the runtime. One place for all.

ONNX stores every value as a string. Each key has one declared kind (KINDS): TEXT keys hold the text itself,
every other key holds one JSON value (compact, key-sorted: `dumps`). `decode` is the one reader that turns a
file's strings into real types (numbers, lists, objects; data paths normalised), for files of every export
version: a value that does not parse reads as absent, never as an error.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from facemark.contract import BoxCalibration, CropContract
from facemark.errors import ModelError

PREFIX = "facemark."
MODEL_FORMAT = "facemark-onnx/1"
CHECKPOINT_FORMAT = "facemark-checkpoint/1"

FORMAT = PREFIX + "format"
CONTRACT = PREFIX + "contract"  # JSON of CropContract
POINTS = PREFIX + "points"  # "ibug68"
ARCH = PREFIX + "arch"
HEAD = PREFIX + "head"  # regression | pip
PRECISION = PREFIX + "precision"  # fp32 | fp16 | fp16w | int8
TRAIN_DATA = PREFIX + "train_data"
TRAIN_SPLIT = PREFIX + "train_split"  # JSON {"val_fraction", "split_seed"}: the run's validation split
VAL_NME = PREFIX + "val_nme"
SOURCE_SHA256 = PREFIX + "source_sha256"
VERSIONS = PREFIX + "versions"  # JSON
EXPORTED_AT = PREFIX + "exported_at"
PARITY = PREFIX + "parity"  # JSON summary
DETECTOR_CALIBRATION = PREFIX + "detector_calibration"  # JSON of BoxCalibration
CONSUMERS = PREFIX + "consumers"  # JSON: which runtimes load the file and how closely they agree
# JSON: how the face_score separates faces from face-free crops ({"auc", "faces_kept", "trusted", ...}); the
# runtime applies its presence threshold only where "trusted" (see presence_trusted). Files exported before it
# was recorded have none: the runtime applies the threshold, as it always did.
PRESENCE = PREFIX + "presence"
# A presence score is trusted when it ranks faces above face-free crops almost always and keeps nearly every face
# at the runtime's default threshold (a trained model: AUC 0.9999, every validation face but two kept; a model
# trained for two epochs: AUC 0.91, no face above 0.99).
PRESENCE_TRUST = {"auc": 0.95, "faces_kept": 0.9}

# How each key's string is read: TEXT as it is; NUMBER, LIST, OBJECT one JSON value of that type; PATHS a JSON
# list of data paths (export records them absolute, resolved against the training run's folder; `decode`
# normalises the separators and dots of older files' relative ones).
TEXT, NUMBER, LIST, OBJECT, PATHS = "text", "number", "list", "object", "paths"
KINDS = {FORMAT: TEXT, CONTRACT: OBJECT, POINTS: TEXT, ARCH: TEXT, HEAD: TEXT, PRECISION: TEXT, TRAIN_DATA: PATHS,
         TRAIN_SPLIT: OBJECT, VAL_NME: NUMBER, SOURCE_SHA256: TEXT, VERSIONS: OBJECT, EXPORTED_AT: TEXT,
         PARITY: OBJECT, DETECTOR_CALIBRATION: OBJECT, CONSUMERS: OBJECT, PRESENCE: OBJECT}

ALL_KEYS = (FORMAT, CONTRACT, POINTS, ARCH, HEAD, PRECISION, TRAIN_DATA, TRAIN_SPLIT, VAL_NME, SOURCE_SHA256, VERSIONS,
            EXPORTED_AT, PARITY, DETECTOR_CALIBRATION,
            CONSUMERS, PRESENCE)

INPUT_NAME = "image"
OUTPUT_NAME = "landmarks"  # always the first output, [N, 68, 2]
LANDMARK_SCORES = "landmark_scores"  # optional, [N, 68] in [0, 1]: per-point confidence (pip head)
FACE_SCORE = "face_score"  # optional, [N] in [0, 1]: face presence


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs from a model's metadata, parsed and checked."""

    contract: CropContract
    calibration: BoxCalibration | None
    precision: str
    points: str
    raw: Mapping[str, str] = field(repr=False)

    @property
    def values(self) -> dict[str, object]:
        """Every facemark key in its real type, by short name (`decode`)."""
        return decode(self.raw)

    @property
    def train_data(self) -> list[str]:
        """The data paths the model was trained on, normalised (empty when not recorded or unreadable)."""
        return decode_value(TRAIN_DATA, self.raw.get(TRAIN_DATA)) or []

    @property
    def verified(self) -> bool:
        """False for a file exported with --no-verify (its parity with the checkpoint was never checked)."""
        parity = decode_value(PARITY, self.raw.get(PARITY))
        return not (parity is not None and parity.get("verified") is False)

    @property
    def presence(self) -> dict | None:
        """The recorded presence separation (export's measurement), or None for files from before it."""
        return decode_value(PRESENCE, self.raw.get(PRESENCE))

    @property
    def presence_trusted(self) -> bool:
        """Whether the runtime applies its presence threshold to this model (True where nothing was recorded)."""
        return self.presence is None or presence_trusted(self.presence)

    def notices(self) -> list[str]:
        """One line for each thing a user of this file should know before trusting its output."""
        lines = []
        if not self.verified:
            lines.append("exported with --no-verify: its parity with the checkpoint was never checked")
        if not self.presence_trusted:
            p = self.presence or {}
            auc = p.get("auc")
            lines.append(f"its presence score is not trustworthy (ROC AUC {'n/a' if auc is None else f'{auc:.3f}'}, "
                         f"{100 * (p.get('faces_kept') or 0):.0f} % of validation faces above the threshold): the "
                         "presence threshold is not applied, every detected face is kept")
        return lines

    @property
    def train_split(self) -> dict | None:
        """{"val_fraction", "split_seed"} of its training run, when recorded."""
        return decode_value(TRAIN_SPLIT, self.raw.get(TRAIN_SPLIT))

    def summary(self) -> dict:
        """The small JSON-able description used in reports and the runtime's JSON output (the model block of
        `facemark schema predict`): real types, e.g. "val_nme": 0.0381, "train_data": ["/data/300w"]."""
        values = self.values
        summary = {name: values[name] for name in SUMMARY_KEYS if name in values}
        # "parity": "verified" | "unverified" (--no-verify); "presence": "applied" | "not trusted" (not applied)
        summary["parity"] = "verified" if self.verified else "unverified"
        if self.presence is not None:
            summary["presence"] = "applied" if self.presence_trusted else "not trusted"
        return summary


def presence_trusted(separation: Mapping) -> bool:
    """The rule of PRESENCE_TRUST on a recorded presence separation."""
    return all((separation.get(key) or 0.0) >= limit for key, limit in PRESENCE_TRUST.items())


def parse_metadata(props: Mapping[str, str], source: str) -> ModelInfo:
    """Check and parse facemark metadata; `source` names the model in error messages."""
    if CONTRACT not in props:
        raise ModelError(f"{source}: not a facemark model (no '{CONTRACT}' in its metadata); export it with "
                         "`facemark export`")
    try:
        contract = CropContract.from_json(props[CONTRACT])
        calibration = (BoxCalibration.from_json(props[DETECTOR_CALIBRATION])
                       if props.get(DETECTOR_CALIBRATION) else None)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{source}: malformed facemark metadata ({exc})") from None
    points = props.get(POINTS, "ibug68")
    if points != "ibug68":
        raise ModelError(f"{source}: point scheme {points!r} is not supported (expected 'ibug68')")
    return ModelInfo(contract, calibration, props.get(PRECISION, "fp32"), points, dict(props))


# The keys of the JSON's model block (ModelInfo.summary), by short name.
SUMMARY_KEYS = tuple(k.removeprefix(PREFIX) for k in (ARCH, HEAD, PRECISION, POINTS, VAL_NME, SOURCE_SHA256,
                                                      EXPORTED_AT, TRAIN_DATA))
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {NUMBER: (int, float), LIST: list, OBJECT: dict, PATHS: list}


def decode_value(key: str, text: str | None):
    """One key's value in its declared kind (KINDS), or None: absent, malformed or of another type (reading a
    file must not fail on a value it does not need). A PATHS value that is not JSON is one path (older files)."""
    kind = KINDS.get(key, TEXT)
    if text is None or kind == TEXT:
        return text
    try:
        value = json.loads(text)
    except ValueError:
        value = text if kind == PATHS and text.strip() else None
    if kind == PATHS:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            return None
        return [normalise_path(p) for p in value]
    if kind == NUMBER and (isinstance(value, bool) or not _finite(value)):
        return None  # JSON's true is an int to Python; NaN / Infinity are no figure
    return value if isinstance(value, _JSON_TYPES[kind]) else None


def decode(props: Mapping[str, str]) -> dict[str, object]:
    """Every facemark key of `props` that reads (decode_value), by short name: {"val_nme": 0.0381, ...}."""
    values = {key.removeprefix(PREFIX): decode_value(key, props.get(key)) for key in ALL_KEYS}
    return {name: value for name, value in values.items() if value is not None}


def normalise_path(path: str) -> str:
    """A recorded data path with forward slashes and no redundant separators or dots ("a//b/./c/" -> "a/b/c")."""
    return posixpath.normpath(path.replace("\\", "/"))


def recorded_paths(paths: list[str] | None, base: str | None) -> list[str]:
    """Data paths as export records them: absolute (a relative one joined to `base`, the folder training was
    started from, when known) and normalised, so the metadata names the same folder wherever it is read."""
    return [normalise_path(str(Path(base) / p) if base and not Path(p).is_absolute() else str(p))
            for p in paths or []]


def _finite(value: object) -> bool:
    return not isinstance(value, float) or value == value and abs(value) != float("inf")


def dumps(value: object) -> str:
    """JSON for metadata values: compact and key-sorted, so equal content gives equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
