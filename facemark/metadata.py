"""ONNX `metadata_props` keys (docs/DESIGN.md section 4): written by export, read by the runtime. One place for all."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

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
    def train_data(self) -> list[str]:
        """The data paths the model was trained on (empty when not recorded or unreadable)."""
        return _json_value(self.raw.get(TRAIN_DATA), list) or []

    @property
    def verified(self) -> bool:
        """False for a file exported with --no-verify (its parity with the checkpoint was never checked)."""
        parity = _json_value(self.raw.get(PARITY), dict)
        return not (parity is not None and parity.get("verified") is False)

    @property
    def presence(self) -> dict | None:
        """The recorded presence separation (export's measurement), or None for files from before it."""
        return _json_value(self.raw.get(PRESENCE), dict)

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
        return _json_value(self.raw.get(TRAIN_SPLIT), dict)

    def summary(self) -> dict:
        """The small JSON-able description used in reports and the runtime's JSON output."""
        keep = (ARCH, HEAD, PRECISION, POINTS, VAL_NME, SOURCE_SHA256, EXPORTED_AT, TRAIN_DATA)
        summary = {k.removeprefix(PREFIX): self.raw[k] for k in keep if k in self.raw}
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


def _json_value(text: str | None, kind: type):
    """A JSON metadata value of the expected kind, or None (absent or malformed: reading it must not fail)."""
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, kind) else None


def dumps(value: object) -> str:
    """JSON for metadata values: compact and key-sorted, so equal content gives equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
