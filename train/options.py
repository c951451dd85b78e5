"""The training choices, in one torch-free place: the CLI shows and checks them before torch loads; the model,
heads and loop validate against the same tuples."""

from __future__ import annotations

from facemark.choices import choice_enum
from facemark.train.heads import HEAD_MODULES

LOSSES = ("l1", "mse", "wing")
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("onecycle", "cosine", "constant")
HEADS = tuple(HEAD_MODULES)  # facemark.train.heads: one module per head
DEVICES = ("auto", "cpu", "cuda")
PIP_STRIDES = (16, 32)


Loss = choice_enum("Loss", LOSSES)
Optimizer = choice_enum("Optimizer", OPTIMIZERS)
Schedule = choice_enum("Schedule", SCHEDULES)
Head = choice_enum("Head", HEADS)
Device = choice_enum("Device", DEVICES)
