"""The runtime's options, declared once (docs/DESIGN.md section 7).

`DetectorOptions` (which face detector and its knobs) and `PipelineOptions` (landmark passes, test-time flip,
presence threshold, face count) are frozen dataclasses. `FaceLandmarker(options=RuntimeOptions(...))` takes
them, `facemark serve`'s config holds them, and the CLI makes its flags from their fields (each field's
`metadata["cli"]`: flag, help, bounds; facemark.runtime.cli_options), so `runtime predict`, `runtime video`,
`evaluate` and `serve` share one declaration of every option. Adding an option is one field here.

Light (numpy-free at import apart from the detector registry's names): the CLI builds its help from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from facemark.choices import TTA_MODES
from facemark.runtime import detector as haar
from facemark.runtime.defaults import DEFAULT_MIN_SCORE, DEFAULT_REFINE
from facemark.runtime.detectors import DETECTOR_NAMES, HAAR


def flag(decls: str, help: str, **bounds: Any) -> dict:
    """A field's command-line declaration: `decls` ("--name" or "--on/--off"), help text, typer bounds
    (min, max) or `choices` (a tuple of strings)."""
    return {"cli": {"decls": decls, "help": help, **bounds}}


@dataclass(frozen=True)
class DetectorOptions:
    """Which detector finds the faces, and Haar's knobs (None: the default for the model, which depends on
    whether it scores face presence: runtime/detector.py)."""

    detector: str = field(default=HAAR, metadata=flag(
        "--detector", "Face detector: haar (OpenCV's cascade, the default) or a CNN detector fetched once with "
        "`facemark detectors fetch NAME` (docs/DETECTORS.md).", choices=DETECTOR_NAMES))
    min_face: float = field(default=haar.DEFAULT_MIN_FACE_FRACTION, metadata=flag(
        "--min-face", "Smallest face, as a fraction of the shorter side (the speed knob)."))
    max_side: int = field(default=haar.DEFAULT_MAX_SIDE, metadata=flag(
        "--max-side", "Detect on a copy downscaled to this longer side at most (0 = off).", min=0))
    min_face_windows: float | None = field(default=None, metadata=flag(
        "--min-face-windows", "Detect on a copy downscaled until the smallest face wanted spans this many cascade "
        f"windows (0 = off; the speed knob that keeps --min-face); default {haar.PRESENCE_MIN_FACE_WINDOWS} with "
        f"a presence model, else {haar.DEFAULT_MIN_FACE_WINDOWS}.", min=0.0))
    scale_factor: float | None = field(default=None, metadata=flag(
        "--scale-factor", f"Haar pyramid step (bigger = faster, fewer faces); default {haar.PRESENCE_SCALE_FACTOR} "
        f"with a presence model, else {haar.DEFAULT_SCALE_FACTOR}."))
    min_neighbors: int | None = field(default=None, metadata=flag(
        "--min-neighbors", f"Haar neighbours (bigger = fewer false boxes; 0 keeps a face hit once); default "
        f"{haar.PRESENCE_MIN_NEIGHBORS} with a presence model (it rejects false boxes), else "
        f"{haar.DEFAULT_MIN_NEIGHBORS}.", min=0))
    cascade: str | None = field(default=None, metadata=flag(
        "--cascade", f"Cascade file or OpenCV cascade name (default {haar.DEFAULT_CASCADE}; the tutorial's: "
        f"{haar.TUTORIAL_CASCADE})."))
    octaves: bool = field(default=haar.DEFAULT_OCTAVES, metadata=flag(
        "--octaves/--no-octaves", "Haar: one halved copy per octave of face sizes instead of OpenCV's single "
        "pyramid: about half the time, about 9 points fewer faces found (docs/MODEL.md)."))
    min_detector_score: float | None = field(default=None, metadata=flag(
        "--min-detector-score", "Drop detections below this detector score (Haar: its level weight; a CNN "
        "detector: its probability; default: the detector's own)."))

    detector_input_side: int | None = field(default=None, metadata=flag(
        "--detector-input-side", "A CNN detector's input: the photo's longer side is scaled to this many pixels "
        "(bigger finds smaller faces, slower; default: the detector's, docs/DETECTORS.md).", min=32))

    HAAR_ONLY = ("min_face", "max_side", "min_face_windows", "scale_factor", "min_neighbors", "cascade", "octaves")

    def __post_init__(self) -> None:
        if self.detector == HAAR and self.detector_input_side is not None:
            raise ValueError("--detector-input-side: an option of the CNN detectors, not of haar")

    def detector_kwargs(self) -> dict:
        """The chosen detector's options over its defaults (runtime.detectors.create_detector): Haar's knobs
        that are set; for a CNN detector its score threshold and input side."""
        if self.detector != HAAR:
            chosen = {"min_score": self.min_detector_score, "input_side": self.detector_input_side}
            return {k: v for k, v in chosen.items() if v is not None}
        options = {"min_face_fraction": self.min_face, "max_side": self.max_side or None,
                   "min_score": self.min_detector_score, "cascade": self.cascade, "scale_factor": self.scale_factor,
                   "min_neighbors": self.min_neighbors, "min_face_windows": self.min_face_windows,
                   "octaves": self.octaves}
        chosen = {k: v for k, v in options.items() if v is not None or k == "max_side"}
        if self.min_face_windows == 0.0:  # 0 = no such downscale
            chosen["min_face_windows"] = None
        return chosen


# Named trade-offs of PipelineOptions (docs/MODEL.md, the frontier of the shipped model): fast = one landmark
# pass (pinned; the runtime's default passes too since the one-pass model); default = the runtime's defaults;
# accurate = two passes with test-time flip (four model runs per face, about 3x the default's landmark time): as
# accurate as four passes with flip on the validation split at about half their cost.
PRESETS: dict[str, dict[str, Any]] = {"fast": {"refine": 0, "tta": "none"}, "default": {},
                                      "accurate": {"refine": 1, "tta": "flip"}}


@dataclass(frozen=True)
class PipelineOptions:
    """What the landmark stage does with each detected face."""

    refine: int = field(default=DEFAULT_REFINE, metadata=flag(
        "--refine", "Extra passes re-cropped on the previous pass's landmarks (the training box); default "
        "measured in docs/MODEL.md.", min=0))
    tta: str = field(default="none", metadata=flag(
        "--tta", "Test-time augmentation: none | flip (mirror each crop and average; about 2x the model time).",
        choices=TTA_MODES))
    min_score: float = field(default=DEFAULT_MIN_SCORE, metadata=flag(
        "--min-score", "Drop faces whose presence score (0-1, models with a presence head) is below this; "
        "0 keeps all.", min=0.0, max=1.0))
    max_faces: int | None = field(default=None, metadata=flag(
        "--max-faces", "Keep the N most confident faces.", min=1))

    def __post_init__(self) -> None:
        if self.refine < 0:
            raise ValueError(f"refine must be >= 0 (got {self.refine})")
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta {self.tta!r}: choose one of {', '.join(TTA_MODES)}")

    @classmethod
    def preset(cls, name: str, **changes: Any) -> PipelineOptions:
        """The named trade-off (PRESETS) with `changes` on top."""
        if name not in PRESETS:
            raise ValueError(f"preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **changes})

    def with_preset(self, name: str | None, keep: set[str] = frozenset()) -> PipelineOptions:
        """These options with the preset's values, except the fields in `keep` (given explicitly)."""
        if name is None:
            return self
        if name not in PRESETS:
            raise ValueError(f"preset {name!r}: choose one of {', '.join(PRESETS)}")
        return replace(self, **{k: v for k, v in PRESETS[name].items() if k not in keep})

    def landmarker_kwargs(self) -> dict:
        return {"refine": self.refine, "flip": self.tta == "flip", "min_score": self.min_score or None,
                "max_faces": self.max_faces}


@dataclass(frozen=True)
class RuntimeOptions:
    """Everything `FaceLandmarker` does beyond the model and where it runs."""

    detection: DetectorOptions = DetectorOptions()
    pipeline: PipelineOptions = PipelineOptions()

    def landmarker_kwargs(self) -> dict:
        """FaceLandmarker's keyword arguments for these options."""
        return {**self.pipeline.landmarker_kwargs(), "detector": self.detection.detector,
                "detector_options": self.detection.detector_kwargs()}
