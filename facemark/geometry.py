"""Geometry on 68 landmarks: similarity-aligned face chips and head pose (torch-free).

Alignment (dlib `get_face_chips`, InsightFace `norm_crop`): the least-squares similarity (rotation, uniform
scale, translation; Umeyama) that maps the face's five points (facemark.scheme.five_points) onto a template,
then one warpAffine. Templates, in pixels of a `size` x `size` chip:
- "arcface": InsightFace's five-point ArcFace template (defined at 112 px, scaled to `size`);
- "eyes": the two eye centres only, at (0.35, 0.4) and (0.65, 0.4) of the chip (imutils' FaceAligner layout).

Head pose: `cv2.solvePnP` of six landmarks (nose tip, chin, outer eye corners, mouth corners) against a
generic 3D face in camera axes (x right, y down, z away from the camera; units are arbitrary, about mm).
The camera is a pinhole with focal length = the image's longer side and the principal point at the image
centre. Angles in degrees, for R = Rz(roll) @ Ry(yaw) @ Rx(pitch) (the head's rotation in camera axes; all
zero for a face looking straight into the camera): yaw turns the face about the vertical axis (positive:
towards the image's left edge, the subject's right), pitch nods it (positive: looking down), roll tilts it in
the image plane (positive: clockwise in the image).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import cv2
import numpy as np

from facemark.choices import ALIGN_TEMPLATES
from facemark.scheme import CHIN, MOUTH_CORNERS, NOSE_TIP, OUTER_EYE_CORNERS, five_points

Template = Literal["arcface", "eyes"]
TEMPLATES = ALIGN_TEMPLATES
ARCFACE_SIZE = 112
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
EYES_TEMPLATE = np.array([[0.35, 0.4], [0.65, 0.4]], dtype=np.float64)  # fractions of the chip size

# Generic 3D face for the pose (camera axes: x right, y down, z away from the camera), with its 68-point indices.
POSE_POINTS: tuple[int, ...] = (NOSE_TIP, CHIN, OUTER_EYE_CORNERS[0], OUTER_EYE_CORNERS[1], *MOUTH_CORNERS)
FACE_3D = np.array([[0.0, 0.0, 0.0],  # nose tip
                    [0.0, 330.0, 65.0],  # chin
                    [-225.0, -170.0, 135.0],  # outer corner of the subject's right eye (image left)
                    [225.0, -170.0, 135.0],  # outer corner of the left eye
                    [-150.0, 150.0, 125.0],  # right mouth corner
                    [150.0, 150.0, 125.0]])  # left mouth corner


class Pose(NamedTuple):
    yaw: float
    pitch: float
    roll: float

    def to_json(self) -> dict[str, float]:
        return {k: round(float(v), 2) for k, v in self._asdict().items()}


def template_points(template: Template, size: int) -> np.ndarray:
    """The template's points in pixels of a `size` chip: 5 for "arcface", the 2 eye centres for "eyes"."""
    if template == "arcface":
        return ARCFACE_TEMPLATE * (size / ARCFACE_SIZE)
    if template == "eyes":
        return EYES_TEMPLATE * size
    raise ValueError(f"template must be one of {', '.join(TEMPLATES)} (got {template!r})")


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity mapping `src` (N, 2) onto `dst` (N, 2), N >= 2 (Umeyama 1991)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mean_src, mean_dst = src.mean(0), dst.mean(0)
    a, b = src - mean_src, dst - mean_dst
    cov = b.T @ a / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ d @ vt
    scale = float(np.trace(np.diag(s) @ d) / a.var(0).sum())
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mean_dst - scale * rotation @ mean_src
    return matrix


def alignment_matrix(landmarks: np.ndarray, size: int = ARCFACE_SIZE, template: Template = "arcface") -> np.ndarray:
    """2x3 image -> chip similarity for a face's (68, 2) landmarks."""
    if size < 8:
        raise ValueError(f"size must be >= 8 (got {size})")
    points = five_points(np.asarray(landmarks, np.float64))
    dst = template_points(template, size)
    return similarity(points[: len(dst)], dst)


def aligned_chip(image: np.ndarray, landmarks: np.ndarray, size: int = ARCFACE_SIZE,
                 template: Template = "arcface") -> np.ndarray:
    """The `size` x `size` face chip of `image` (any channels), rotated and scaled onto the template."""
    matrix = alignment_matrix(landmarks, size, template)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def camera_matrix(width: int, height: int) -> np.ndarray:
    focal = float(max(width, height))
    return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


def euler_angles(rotation: np.ndarray) -> Pose:
    """(yaw, pitch, roll) in degrees of R = Rz(roll) @ Ry(yaw) @ Rx(pitch)."""
    yaw = np.degrees(np.arcsin(np.clip(-rotation[2, 0], -1.0, 1.0)))
    pitch = np.degrees(np.arctan2(rotation[2, 1], rotation[2, 2]))
    roll = np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0]))
    return Pose(float(yaw), float(pitch), float(roll))


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """R = Rz(roll) @ Ry(yaw) @ Rx(pitch), angles in degrees (the inverse of `euler_angles`)."""
    y, p, r = np.radians([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def head_pose(landmarks: np.ndarray, image_size: tuple[int, int]) -> Pose:
    """Yaw, pitch, roll (degrees) of a face from its (68, 2) landmarks in an image of (width, height)."""
    points = np.ascontiguousarray(np.asarray(landmarks, np.float64)[list(POSE_POINTS)])
    camera = camera_matrix(*image_size)
    ok, rvec, _tvec = cv2.solvePnP(FACE_3D, points, camera, None, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        raise ValueError("head pose: solvePnP found no solution for these landmarks")
    return euler_angles(cv2.Rodrigues(rvec)[0])
