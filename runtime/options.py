"""The runtime's options, declared once (docs/DESIGN.md section 7).

`DetectorOptions` (which face detector and its knobs) and `PipelineOptions` (landmark passes, test-time flip,
presence threshold, face count) are frozen dataclasses. `FaceLandmarker(options=RuntimeOptions(...))` takes
them, `facemark serve`'s config holds them, and the CLI makes its flags from their fields (each field's
`metadata["cli"]`: flag, help, bounds; facemark.runtime.cli_options), so `runtime predict`, `runtime video`,
`evaluate` and `serve` share one declaration of every option. `FaceLandmarker(preset=..., min_face=..., tta=...)`
takes the same fields as keywords (the flags' names with `_`: SETTING_NAMES, built by
`RuntimeOptions.from_settings`, which checks the flags' bounds too). Adding an option is one field here.

Light (numpy-free at import apart from the detector registry's names): the CLI builds its help from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from facemark.choices import TTA_MODES
from facemark.errors import SettingError, setting
from facemark.runtime import detector as haar
from facemark.runtime.defaults import DEFAULT_MIN_SCORE, DEFAULT_REFINE
from facemark.runtime.detectors import DETECTOR_NAMES, HAAR


def flag(decls: str, help: str, **bounds: Any) -> dict:
    """A field's command-line declaration: `decls` ("--name" or "--on/--off"), help text, typer bounds
    (min, max) or `choices` (a tuple of strings)."""
    return {"cli": {"decls": decls, "help": help, **bounds}}


# Named trade-offs over fields of DetectorOptions and PipelineOptions (docs/MODEL.md; a field given explicitly,
# as a flag or a keyword, wins over its preset's value). fast: Haar searches faces from 12 % of the shorter side
# instead of 8 % (the cheapest search that keeps the validation faces: 1.4x the photos per second, faces below
# that size missed); default: the runtime's defaults; accurate: two landmark passes with test-time flip (four
# model runs per face, about 3x the default's landmark time), as accurate as four passes with flip at about half
# their cost.
FAST_MIN_FACE = 0.12
PRESETS: dict[str, dict[str, Any]] = {"fast": {"min_face": FAST_MIN_FACE}, "default": {},
                                      "accurate": {"refine": 1, "tta": "flip"}}
PRESET_HELP = (f"A named trade-off (options given explicitly win): fast = faces from {FAST_MIN_FACE:g} of the "
               "shorter side (--min-face; about 1.4x faster, smaller faces missed); default; accurate = two landmark "
               "passes with flip (--refine 1 --tta flip; about 3x the landmark time); docs/MODEL.md.")


def preset_values(name: str) -> dict[str, Any]:
    """The fields a preset sets; SettingError for an unknown name."""
    if name not in PRESETS:
        raise SettingError.worded(lambda cli: f"{setting('preset', name, cli=cli)}: choose one of "
                                  f"{', '.join(PRESETS)}")
    return PRESETS[name]


class _Settings:
    """What both option classes share: their flags' bounds checked in Python too, and presets."""

    def _check_bounds(self) -> None:
        for f in fields(self):
            spec, value = f.metadata.get("cli", {}), getattr(self, f.name)
            low, high = spec.get("min"), spec.get("max")
            if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
                bounds = " and ".join(t for t in (f">= {low}" if low is not None else "",
                                                  f"<= {high}" if high is not None else "") if t)
                raise SettingError.worded(lambda cli, f=f, value=value, bounds=bounds:
                                          f"{setting(f.name, value, cli=cli)}: must be {bounds}")

    def with_preset(self, name: str | None, keep: set[str] = frozenset()):
        """These options with the preset's values for their own fields, except those in `keep` (given
        explicitly)."""
        if name is None:
            return self
        mine = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in preset_values(name).items() if k in mine and k not in keep})


@dataclass(frozen=True)
class DetectorOptions(_Settings):
    """Which detector finds the faces, and Haar's knobs (None: the default for the model, which depends on
    whether it scores face presence: runtime/detector.py)."""

    detector: str = field(default=HAAR, metadata=flag(
        "--detector", "Face detector: haar (OpenCV's cascade, the default) or a CNN detector fetched once with "
        "`facemark detectors fetch NAME` (docs/DETECTORS.md).", choices=DETECTOR_NAMES))
    min_face: float = field(default=haar.DEFAULT_MIN_FACE_FRACTION, metadata=flag(
        "--min-face", "Smallest face, as a fraction of the shorter side, 0 to below 1 (the speed knob)."))
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
        self._check_bounds()
        if self.detector not in DETECTOR_NAMES:
            raise SettingError.worded(lambda cli: f"{setting('detector', self.detector, cli=cli)}: choose one of "
                                      f"{', '.join(DETECTOR_NAMES)}")
        if self.detector == HAAR and self.detector_input_side is not None:
            raise SettingError.worded(lambda cli: f"{setting('detector_input_side', cli=cli)}: an option of the CNN "
                                      "detectors, not of haar")
        self._check_haar_values()

    def _check_haar_values(self) -> None:
        """The Haar detector's own limits (runtime.detector.HaarDetector), refused here in the caller's words."""
        limits = (("min_face", self.min_face, not 0.0 <= self.min_face < 1.0, ">= 0 and < 1"),
                  ("scale_factor", self.scale_factor, self.scale_factor is not None and self.scale_factor <= 1.0,
                   "> 1"),
                  ("max_side", self.max_side, 0 < self.max_side < haar.SMALLEST_MAX_SIDE,
                   f"0 (off) or >= {haar.SMALLEST_MAX_SIDE}"),
                  ("min_face_windows", self.min_face_windows,
                   self.min_face_windows is not None and 0.0 < self.min_face_windows < 1.0, "0 (off) or >= 1"))
        for name, value, wrong, allowed in limits:
            if wrong:
                raise SettingError.worded(lambda cli, name=name, value=value, allowed=allowed:
                                          f"{setting(name, value, cli=cli)}: must be {allowed}")

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


@dataclass(frozen=True)
class PipelineOptions(_Settings):
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
        "--max-faces", "Keep the first N faces in the face order: presence score as the JSON shows it, then the "
        "detector's order (docs/CLI.md).", min=1))

    def __post_init__(self) -> None:
        self._check_bounds()
        if self.tta not in TTA_MODES:
            raise SettingError.worded(lambda cli: f"{setting('tta', self.tta, cli=cli)}: choose one of "
                                      f"{', '.join(TTA_MODES)}")

    @classmethod
    def preset(cls, name: str, **changes: Any) -> PipelineOptions:
        """The named trade-off's landmark settings (PRESETS) with `changes` on top."""
        return cls(**changes).with_preset(name, keep=set(changes))

    def landmarker_kwargs(self) -> dict:
        return {"refine": self.refine, "flip": self.tta == "flip", "min_score": self.min_score or None,
                "max_faces": self.max_faces}


@dataclass(frozen=True)
class RuntimeOptions:
    """Everything `FaceLandmarker` does beyond the model and where it runs."""

    detection: DetectorOptions = DetectorOptions()
    pipeline: PipelineOptions = PipelineOptions()

    def landmarker_kwargs(self) -> dict:
        """The landmark stage's settings (refine, flip, min_score, max_faces), the detector's name and its
        runtime.detectors.create_detector options."""
        return {**self.pipeline.landmarker_kwargs(), "detector": self.detection.detector,
                "detector_options": self.detection.detector_kwargs()}

    @classmethod
    def from_settings(cls, preset: str | None = None, base: RuntimeOptions | None = None,
                      **settings: Any) -> RuntimeOptions:
        """The options named by `settings` (fields of DetectorOptions and PipelineOptions: SETTING_NAMES) over
        `base` (default: the defaults), with the preset's values for the fields not in `settings`. TypeError for
        a name that is no field, SettingError (a ValueError) for a value out of its flag's bounds."""
        unknown = sorted(set(settings) - set(SETTING_NAMES))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; the options are: {', '.join(SETTING_NAMES)}")
        clash = sorted(set(settings) & set(DetectorOptions.HAAR_ONLY))
        detector = settings.get("detector", (base or cls()).detection.detector)
        if clash and detector != HAAR:  # as the command line refuses them (facemark.runtime.cli_options)
            raise SettingError.worded(lambda cli: f"{', '.join(setting(n, cli=cli) for n in clash)}: Haar options, "
                                      f"not for {setting('detector', detector, cli=cli)}")
        base = base or cls()
        parts = []
        for part in (base.detection, base.pipeline):
            mine = {k: v for k, v in settings.items() if k in field_names(type(part))}
            parts.append(replace(part, **mine).with_preset(preset, keep=set(mine)))
        return cls(*parts)


OPTION_CLASSES = (DetectorOptions, PipelineOptions)


def field_names(cls: type) -> tuple[str, ...]:
    """The option fields of one class (those with a command-line flag)."""
    return tuple(f.name for f in fields(cls) if "cli" in f.metadata)


# Every option by its one name: the CLI's flag without "--" and with "_" (--min-face -> min_face), and
# FaceLandmarker's keyword.
SETTING_NAMES: tuple[str, ...] = tuple(n for cls in OPTION_CLASSES for n in field_names(cls))
