"""The precisions `facemark export` writes, in one table: what each is and the parity gate it must pass
(docs/DESIGN.md section 4). Light (no onnx, no torch): the CLI lists the choices from here; the parity check
(facemark.export.parity) applies the gates, the exporter (facemark.export.exporter) makes the variants.

Pixel limits are stated for a 224 px crop and scale with the crop size (they are fractions of the crop), so a
64 px test model and a 224 px trained one are held to the same geometry. Measured figures behind each limit:
fp16 0.20 px on random 224 px weights, 0.05 px on a 96 px 300-W model; int8 4.4 px on random 224 px weights,
1.95 px at 96 px on the 300-W model (only a broken quantization exceeds 8). Noise inputs are gated for fp32
only: fp16/int8 errors on them are reported but not gated, since noise drives activations far outside what a
face produces (int8 is calibrated on faces). NaN/Inf fail every precision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from facemark.errors import FacemarkError

REAL, RANDOM = "real", "random"  # the parity check's input sets: face crops, seeded uniform noise
PIXEL_GATE_CROP = 224  # pixel limits are stated for this crop size


@dataclass(frozen=True)
class Gate:
    stat: str  # key of the error statistics
    limit: float
    unit: str  # "normalised" | "px" (pixels of a 224 px crop, scaled to the model's crop size)
    sources: tuple[str, ...]  # input sets the gate applies to
    nme_increase: float | None = None  # allowed NME increase over fp32 ONNX (a fraction: 0.002 = 0.2 points)
    # ... or this share of the fp32 NME where that is more: the same allowance as nme_increase for a trained model
    # (about 4 % NME), proportionally more for an undertrained one, whose NME moves by points under any rounding.
    nme_relative: float = 0.0

    def nme_allowance(self, fp32_nme: float) -> float:
        """The allowed NME increase over the fp32 ONNX model's `fp32_nme`."""
        return max(self.nme_increase or 0.0, self.nme_relative * fp32_nme)

    def limit_at(self, size: int) -> float:
        """The limit for a model of `size` px crops, in the gate's unit (pixels of that crop, or normalised)."""
        return self.limit * size / PIXEL_GATE_CROP if self.unit == "px" else self.limit

    def normalised_limit(self) -> float:
        """The limit as a fraction of the crop (what a consumer's output is compared in)."""
        return self.limit / PIXEL_GATE_CROP if self.unit == "px" else self.limit


@dataclass(frozen=True)
class Precision:
    name: str
    help: str
    gate: Gate


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "the traced graph", Gate("max_abs", 1e-4, "normalised", (REAL, RANDOM))),
    Precision("fp16", "fp16 weights and math, fp32 input/output",
              Gate("max_abs", 0.5, "px", (REAL,), nme_increase=0.0005, nme_relative=0.0125)),
    Precision("fp16w", "fp16 weights, fp32 math: half the size at fp32 speed on CPUs",
              Gate("max_abs", 0.5, "px", (REAL,), nme_increase=0.0005, nme_relative=0.0125)),
    Precision("int8", "static QDQ: per-channel int8 weights, calibrated activations",
              Gate("p99_abs", 8.0, "px", (REAL,), nme_increase=0.002, nme_relative=0.05)),
)}


# --- file names ----------------------------------------------------------------------------------------------
MODEL_SUFFIX = ".onnx"


def default_output(checkpoint: Path, precision: str) -> Path:
    """The model's name when none is given, saying its precision: `runs/x/best.pt` -> `runs/x/best.fp32.onnx`,
    `best.fp16.onnx`, `best.int8.onnx` (its parity report: `best.int8.parity.json`)."""
    return checkpoint.with_name(f"{checkpoint.stem}.{precision}{MODEL_SUFFIX}")


def check_output_name(output: Path, precision: str) -> None:
    """Refuse, in one line, a model name that misleads about its content: a suffix other than .onnx (`model.pt`
    would be taken for a checkpoint), or a precision word (best.int8.onnx) other than the model's precision."""
    if output.suffix.lower() != MODEL_SUFFIX:
        raise FacemarkError(f"{output}: an exported model is an ONNX file, its name must end in {MODEL_SUFFIX} "
                            f"(e.g. {_renamed(output, precision)})")
    said = [word.lower() for _sep, word in _PRECISION_WORD.findall(output.stem) if word.lower() != precision]
    if said:
        raise FacemarkError(f"{output}: the name says {said[0]} but the model is {precision}; name it "
                            f"{_renamed(output, precision)}, or export {said[0]}")


# A precision word in a file name: a whole part between `.`, `_` or `-` (best.int8, best_fp16w; not int8u7).
_PRECISION_WORD = re.compile(rf"(^|[._-])({'|'.join(sorted(PRECISIONS, key=len, reverse=True))})(?=$|[._-])",
                             re.IGNORECASE)


def _renamed(output: Path, precision: str) -> Path:
    """`output` with its precision words and suffix replaced by the right ones: model.pt -> model.fp32.onnx."""
    stem = _PRECISION_WORD.sub("", output.stem).strip("._-") or "model"
    return output.with_name(f"{stem}.{precision}{MODEL_SUFFIX}")
