"""Every fixed set of CLI choices, in one torch-free place, as tuples (checked by the library) and str Enums
(typer lists them in --help and rejects anything else before a command does any work)."""

from __future__ import annotations

from enum import Enum

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")  # ONNX Runtime execution providers (facemark.runtime.session)
DRAW_MODES = ("points", "contours", "none")  # facemark.drawing
TTA_MODES = ("none", "flip")  # facemark.inference
ALIGN_TEMPLATES = ("arcface", "eyes")  # facemark.geometry
INT8_ACTIVATIONS = ("int8", "uint8", "uint8-7bit")  # facemark.export.variants.to_int8
EVAL_SPLITS = ("val", "train", "all")
EVAL_BOXES = ("gt", "haar", "pipeline")


def choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum for typer: choices listed in --help and checked before the command runs."""
    return Enum(name, {v: v for v in values}, type=str)


Provider = choice_enum("Provider", PROVIDERS)
DrawChoice = choice_enum("DrawChoice", DRAW_MODES)
Tta = choice_enum("Tta", TTA_MODES)
AlignTemplate = choice_enum("AlignTemplate", ALIGN_TEMPLATES)
Int8Activations = choice_enum("Int8Activations", INT8_ACTIVATIONS)
EvalSplit = choice_enum("EvalSplit", EVAL_SPLITS)
EvalBoxes = choice_enum("EvalBoxes", EVAL_BOXES)


def value(choice: Enum | str) -> str:
    """The plain string of an Enum member (or a string passed through, for library callers)."""
    return choice.value if isinstance(choice, Enum) else choice
