"""Video rows: `runtime video`'s tracker on a composed clip of a real face that moves, per tracking policy.

The clip: the largest sample face (a real photo, with its annotated landmarks) drifts over a blurred real
background on a smooth path (one loop in 5 s) while its size breathes by +-10 %, written as an mp4 (OpenCV's
mp4v) at 30 fps. The ground truth of every frame is the annotation carried through the same placement, so
each policy's accuracy (NME over the frames) is measured along with its speed (frames per second including
decoding, and the per-frame time's median and p99: the frames with a whole-frame Haar scan are the slow ones).

    python -m facemark.benchmarks.video_bench [--model M.onnx] [--frames 150]
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import typer

from facemark.benchmarks.pipeline import background_canvas, face_tile, largest_sample_faces
from facemark.contract import box_from_landmarks
from facemark.metrics import nme_per_face

CLIP_FPS = 30.0
PATH_SECONDS = 5.0  # the face's path repeats every 5 s: about 0.7 face widths per second at its fastest
TILE_MARGIN = 2.0  # the face tile is this many landmark boxes wide (pipeline.face_tile's default)
# (name, detect_every, full_scan_every): every frame scanned whole = the photo pipeline per frame; tracking with a
# whole-frame scan at every re-detection = the previous video default; tracking with the region-of-interest pass.
POLICIES = (("detect every frame", 1, 1), ("tracking, whole-frame re-detection", 10, 1),
            ("tracking + ROI re-detection (default)", 10, 3))
DEFAULT_CLIPS = ((640, 480), (1920, 1080))


@dataclass(frozen=True)
class Clip:
    name: str
    path: Path
    width: int
    height: int
    truth: np.ndarray  # (frames, 68, 2) landmarks of the face in each frame


def compose_clip(width: int, height: int, frames: int, out_dir: Path) -> Clip:
    """A clip of one real face moving over a blurred real background, with its per-frame ground truth."""
    record = largest_sample_faces(1)[0]
    base_side = int(height * 0.5)
    tile = face_tile(record, base_side, TILE_MARGIN)
    # the tile's landmarks: face_tile maps a square of TILE_MARGIN landmark boxes around the face onto the tile
    x, y, w, h = box_from_landmarks(record.landmarks)
    half = TILE_MARGIN * max(w, h) / 2
    scale = base_side / (2 * half)
    tile_points = (record.landmarks - [x + w / 2 - half, y + h / 2 - half]) * scale
    background = background_canvas(width, height)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{width}x{height}-moving-face.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), CLIP_FPS, (width, height))
    truth = []
    try:
        for i in range(frames):
            t = i / (CLIP_FPS * PATH_SECONDS) * 2 * math.pi
            side = int(base_side * (1 + 0.1 * math.sin(2 * t)))
            cx = width / 2 + 0.25 * (width - side) * math.sin(t)
            cy = height / 2 + 0.25 * (height - side) * math.sin(2 * t + 1)
            px, py = int(cx - side / 2), int(cy - side / 2)
            canvas = background.copy()
            canvas[py : py + side, px : px + side] = cv2.resize(tile, (side, side), interpolation=cv2.INTER_AREA)
            writer.write(canvas)
            truth.append(tile_points * (side / base_side) + [px, py])
    finally:
        writer.release()
    return Clip(path.stem, path, width, height, np.asarray(truth, dtype=np.float64))


def time_video(landmarker, clip: Clip, detect_every: int, full_scan_every: int) -> dict:
    """One pass of runtime.video.run_video over the clip (no outputs written): speed, Haar use and accuracy."""
    from facemark.runtime.video import run_video

    stamps, found = [time.perf_counter()], {}

    def on_frame(result) -> None:
        stamps.append(time.perf_counter())
        if result.faces:
            found[result.index] = result.faces[0].landmarks

    summary = run_video(str(clip.path), landmarker, detect_every=detect_every, full_scan_every=full_scan_every,
                        on_frame=on_frame)
    frame_ms = np.diff(stamps) * 1000.0
    frames = sorted(found)
    errors = nme_per_face(np.asarray([found[i] for i in frames]), clip.truth[frames]) if frames else np.array([])
    return {"clip": clip.name, "width": clip.width, "height": clip.height, "detect_every": detect_every,
            "full_scan_every": full_scan_every, "frames": summary.frames, "fps": summary.fps,
            "median_frame_ms": float(np.median(frame_ms)), "p99_frame_ms": float(np.percentile(frame_ms, 99)),
            "haar_frames": summary.detections, "whole_frame_scans": summary.full_scans,
            "frames_with_face": len(frames), "nme": float(errors.mean()) if len(errors) else None}


def video_rows(landmarker, out_dir: Path, frames: int = 150, rounds: int = 2,
               clips: tuple[tuple[int, int], ...] = DEFAULT_CLIPS) -> list[dict]:
    """Every policy on every clip, the policies alternating `rounds` times per clip (best fps kept)."""
    rows = []
    for width, height in clips:
        clip = compose_clip(width, height, frames, out_dir)
        best: dict[str, dict] = {}
        for _ in range(rounds):
            for name, every, full in POLICIES:
                row = {"policy": name, **time_video(landmarker, clip, every, full)}
                if name not in best or row["fps"] > best[name]["fps"]:
                    best[name] = row
        rows += [best[name] for name, _, _ in POLICIES]
    return rows


def bench_video_rows(landmarker, out_dir: Path, quick: bool) -> list[dict]:
    """The "Video" section of `facemark bench`: both clips, 150 frames, 2 rounds; --quick: 640x480 only, 30 frames,
    one round."""
    if quick:
        return video_rows(landmarker, out_dir, frames=30, rounds=1, clips=DEFAULT_CLIPS[:1])
    return video_rows(landmarker, out_dir)


def main(model: Path | None = typer.Option(None, "--model", help="Default: the shipped model."),
         frames: int = typer.Option(150, "--frames", min=10),
         json_out: Path | None = typer.Option(None, "--json")) -> None:
    from facemark.runtime.landmarker import FaceLandmarker

    landmarker = FaceLandmarker(model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        rows = video_rows(landmarker, Path(tmp), frames)
    for row in rows:
        nme = "n/a" if row["nme"] is None else f"{100 * row['nme']:.2f} %"
        print(f"{row['clip']:28s} {row['policy']:40s} {row['fps']:6.1f} fps  median {row['median_frame_ms']:5.1f} ms  "
              f"p99 {row['p99_frame_ms']:6.1f} ms  Haar {row['haar_frames']:3d} ({row['whole_frame_scans']} whole)  "
              f"face {row['frames_with_face']}/{row['frames']}  NME {nme}")
    if json_out:
        json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    typer.run(main)
