"""The training choices, in one torch-free place: the CLI shows and checks them before torch loads; the model,
codecs and loop validate against the same tuples."""

from __future__ import annotations

from enum import Enum

LOSSES = ("l1", "mse", "wing")
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("onecycle", "cosine", "constant")
HEADS = ("pip", "regression")
DEVICES = ("auto", "cpu", "cuda")
PIP_STRIDES = (16, 32)


def choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum for typer: choices listed in --help and checked before the command runs."""
    return Enum(name, {v: v for v in values}, type=str)


Loss = choice_enum("Loss", LOSSES)
Optimizer = choice_enum("Optimizer", OPTIMIZERS)
Schedule = choice_enum("Schedule", SCHEDULES)
Head = choice_enum("Head", HEADS)
Device = choice_enum("Device", DEVICES)
