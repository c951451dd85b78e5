"""Exceptions with messages a user can act on. The CLI turns each into one line; library code never exits."""

from __future__ import annotations


class FacemarkError(Exception):
    """Base class: anything facemark raises on purpose."""


class DataError(FacemarkError):
    """A malformed or unusable annotation file or data set."""


class ImageError(FacemarkError):
    """An image that cannot be read: missing, corrupt, empty, not an image, or too large."""


class ModelError(FacemarkError):
    """A model file that is missing, corrupt, or not a facemark model."""


class ProviderError(FacemarkError):
    """An execution provider that was asked for explicitly but cannot run here."""


class ParityError(FacemarkError):
    """An exported model that fails its numerical parity or accuracy gate."""
