"""The iBUG 68-point scheme, in one place: groups, drawing contours, flip permutation, normalising points."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

NUM_POINTS = 68
SCHEME_NAME = "ibug68"

# 0-based index ranges (end exclusive) of the iBUG groups.
GROUPS: MappingProxyType[str, range] = MappingProxyType(
    {
        "jaw": range(0, 17),
        "right_brow": range(17, 22),  # the subject's right, image left
        "left_brow": range(22, 27),
        "nose_bridge": range(27, 31),
        "nose_base": range(31, 36),
        "right_eye": range(36, 42),
        "left_eye": range(42, 48),
        "outer_lips": range(48, 60),
        "inner_lips": range(60, 68),
    }
)

# Polylines for drawing, (indices, closed).
CONTOURS: tuple[tuple[tuple[int, ...], bool], ...] = (
    (tuple(GROUPS["jaw"]), False),
    (tuple(GROUPS["right_brow"]), False),
    (tuple(GROUPS["left_brow"]), False),
    (tuple(GROUPS["nose_bridge"]) + (33,), False),
    (tuple(GROUPS["nose_base"]), False),
    (tuple(GROUPS["right_eye"]), True),
    (tuple(GROUPS["left_eye"]), True),
    (tuple(GROUPS["outer_lips"]), True),
    (tuple(GROUPS["inner_lips"]), True),
)

# Outer eye corners: the inter-ocular distance that normalises NME (300-W convention).
OUTER_EYE_CORNERS: tuple[int, int] = (36, 45)


def _flip_permutation() -> tuple[int, ...]:
    """Index i of a mirrored face takes the point FLIP_PERMUTATION[i] of the original."""
    pairs: list[tuple[int, int]] = []
    pairs += [(i, 16 - i) for i in range(17)]  # jaw
    pairs += [(17 + i, 26 - i) for i in range(5)]  # brows
    pairs += [(31 + i, 35 - i) for i in range(5)]  # nose base
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48 + i, 54 - i) for i in range(7)]  # outer lips, top
    pairs += [(55 + i, 59 - i) for i in range(5)]  # outer lips, bottom
    pairs += [(60 + i, 64 - i) for i in range(5)]  # inner lips, top
    pairs += [(65, 67), (66, 66)]  # inner lips, bottom
    perm = list(range(NUM_POINTS))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return tuple(perm)


FLIP_PERMUTATION: tuple[int, ...] = _flip_permutation()


def interocular_distance(points: np.ndarray) -> np.ndarray:
    """Distance between the outer eye corners of `points` (..., 68, 2)."""
    a, b = OUTER_EYE_CORNERS
    return np.linalg.norm(points[..., a, :] - points[..., b, :], axis=-1)


def five_points(points: np.ndarray) -> np.ndarray:
    """The five points of face-recognition alignment (InsightFace / ArcFace order) from 68 points (..., 68, 2):
    the subject's right eye centre, left eye centre, nose tip, right and left mouth corners (image left first)."""
    right_eye = points[..., GROUPS["right_eye"], :].mean(axis=-2)
    left_eye = points[..., GROUPS["left_eye"], :].mean(axis=-2)
    return np.stack([right_eye, left_eye, points[..., NOSE_TIP, :], points[..., MOUTH_CORNERS[0], :],
                     points[..., MOUTH_CORNERS[1], :]], axis=-2)


NOSE_TIP = 30
CHIN = 8
MOUTH_CORNERS: tuple[int, int] = (48, 54)  # the subject's right (image left), left
