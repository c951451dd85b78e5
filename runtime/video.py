"""Video: per-frame landmarks with tracking between detections and optional One-Euro smoothing.

Tracking: between detections each face is followed from its previous landmarks: the next crop box is
`box_from_landmarks(previous landmarks)`, which is exactly the training box convention, so no calibration is
involved. Haar runs on the first frame, every `detect_every` frames, whenever no face is tracked, and at once
(on the same frame) when a track is lost. Only every `full_scan_every`-th of the periodic detections scans the
whole frame (new faces); the others search just around the tracked faces (HaarDetector.detect_near, well
under a millisecond against tens for a whole frame), which re-anchors the tracks at a fraction of the cost.
A track counts as lost when its new landmark box is implausible next to the previous one (IoU <
`min_track_iou`, or a size change beyond `max_scale_change`), which is what a regressor does
when the face has left its crop, or when less than half of that box lies inside the frame.

Smoothing: a One-Euro filter (Casiez et al., CHI 2012) per track on the 68 points, in units of the face size
so that the same settings suit near and far faces: strong smoothing of a still face (jitter) and little lag
when it moves (the cutoff rises with speed). The tracking boxes use the raw points; smoothing only changes
what is reported.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from facemark.contract import Box, box_from_landmarks, box_iou
from facemark.drawing import DrawMode, draw_face
from facemark.errors import ImageError, WriteError
from facemark.fileio import atomic_path
from facemark.imageio import JPEG_HEADER_BYTES, probe_size, sniff_format
from facemark.runtime.defaults import DEFAULT_FULL_SCAN_EVERY
from facemark.runtime.landmarker import Face, FaceLandmarker


class OneEuroFilter:
    """One-Euro filter over arrays of any fixed shape; `t` in seconds."""

    def __init__(self, min_cutoff: float = 1.0, beta: float = 1.0, d_cutoff: float = 1.0) -> None:
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t: float | None = None

    @staticmethod
    def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self._x is None or self._t is None or t <= self._t:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = t - self._t
        dx = (x - self._x) / dt
        a_d = self._alpha(self.d_cutoff, dt)
        self._dx = a_d * dx + (1 - a_d) * self._dx
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        a = self._alpha(cutoff, dt)
        self._x = a * x + (1 - a) * self._x
        self._t = t
        return self._x.copy()


@dataclass
class SmoothingOptions:
    # In face-size units per second (the face's box side = 1). Measured with the shipped model on the moving-face
    # clip of facemark.benchmarks.video_bench (640x480, 150 frames) and on its first frame held still with
    # sensor noise: (1.0, 2.0) cut the still jitter from 0.35 to 0.10 % of the face size but lagged the moving
    # face, NME 7.89 % against 3.41 % unsmoothed; (0.5, 30) keeps the jitter at 0.13 % for NME 3.60 %.
    min_cutoff: float = 0.5
    beta: float = 30.0
    d_cutoff: float = 1.0


@dataclass
class Track:
    landmarks: np.ndarray  # raw (unsmoothed) points of the last frame
    face_size: float
    filter: OneEuroFilter | None
    score: float | None = None  # face presence of the last frame (models with a presence head)
    landmark_scores: np.ndarray | None = None


@dataclass
class FrameResult:
    index: int
    time: float
    faces: list[Face]
    detected: bool  # True when Haar ran on this frame, False when the faces were tracked

    def to_json(self) -> dict:
        return {"frame": self.index, "time": round(self.time, 4), "detected": self.detected,
                "faces": [f.to_json() for f in self.faces]}


class FaceTracker:
    """Per-frame landmarks for a stream of frames (see the module docstring for the policy)."""

    def __init__(
        self,
        landmarker: FaceLandmarker,
        detect_every: int = 10,
        smooth: bool = True,
        smoothing: SmoothingOptions | None = None,
        min_track_iou: float = 0.4,
        max_scale_change: float = 1.5,
        full_scan_every: int = DEFAULT_FULL_SCAN_EVERY,
    ) -> None:
        if detect_every < 1:
            raise ValueError(f"detect_every must be >= 1 (got {detect_every})")
        if full_scan_every < 1:
            raise ValueError(f"full_scan_every must be >= 1 (got {full_scan_every})")
        self.full_scan_every = full_scan_every
        self.landmarker = landmarker
        self.detect_every = detect_every
        self.smooth = smooth
        self.smoothing = smoothing or SmoothingOptions()
        self.min_track_iou = min_track_iou
        self.max_scale_change = max_scale_change
        self.tracks: list[Track] = []
        self._since_detection = 0
        self.detections = 0  # frames on which Haar ran
        self.full_scans = 0  # of those, the frames Haar scanned whole (the others: around the tracked faces)
        self._near_scans = 0  # region-of-interest detections since the last full scan
        self.losses = 0  # tracks that ended: lost while followed, or not found again by a detection
        self._counted: set[int] = set()  # tracks already counted as lost on this frame

    def process(self, frame: np.ndarray, index: int, t: float) -> FrameResult:
        due = not self.tracks or self._since_detection >= self.detect_every
        tracked = None if due else self._follow(frame)
        if tracked is None:
            # A lost track (tracked is None although not due) may have moved anywhere: scan the whole frame.
            full = not due or not self.tracks or self._near_scans + 1 >= self.full_scan_every
            self._redetect(frame, full)
            self._since_detection = 1
            detected = True
        else:
            self.tracks = tracked
            self._since_detection += 1
            detected = False
        faces = [self._report(track, t) for track in self.tracks]
        return FrameResult(index, t, faces, detected)

    def _follow(self, frame: np.ndarray) -> list[Track] | None:
        """Each track's new points from the box of its previous points; None when any track is lost."""
        boxes = [box_from_landmarks(track.landmarks) for track in self.tracks]
        faces = self.landmarker.landmarks_for_boxes(frame, boxes)
        height, width = frame.shape[:2]
        followed = []
        threshold = self.landmarker.min_score
        for track, previous, face in zip(self.tracks, boxes, faces, strict=True):
            gone = threshold is not None and (face.score is None or face.score < threshold)
            if gone or self._lost(previous, box_from_landmarks(face.landmarks), width, height):
                self.losses += 1  # no face there any more (scene cut, occlusion): detect again on this frame
                self._counted.add(id(track))
                return None
            followed.append(Track(face.landmarks, track.face_size, track.filter, face.score, face.landmark_scores))
        return followed

    def _lost(self, previous: Box, current: Box, width: int, height: int) -> bool:
        if box_iou(previous, current) < self.min_track_iou:
            return True
        ratio = max(current[2], current[3], 1e-6) / max(previous[2], previous[3], 1e-6)
        if not 1 / self.max_scale_change <= ratio <= self.max_scale_change:
            return True
        return _inside_fraction(current, width, height) < 0.5

    def _redetect(self, frame: np.ndarray, full: bool) -> None:
        """Run the detector on the whole frame (`full`) or around the tracks; keep the filter of a track the
        new face overlaps, so smoothing is continuous."""
        self.detections += 1
        faces = None
        if not full:
            self._near_scans += 1
            found = self.landmarker.find(frame, near=[box_from_landmarks(t.landmarks) for t in self.tracks])
            # Fewer boxes than tracks: no model pass on them, the whole frame is scanned next anyway.
            if len(found.detections) >= len(self.tracks):
                faces = self.landmarker.landmarks_for_found([found])[0].faces
            if faces is not None and len(faces) < len(self.tracks):
                faces = None  # a tracked face was not found near its track: it may be anywhere, scan the frame
        if faces is None:
            self.full_scans += 1
            self._near_scans = 0
            faces = self.landmarker.detect(frame)
        new_boxes = [box_from_landmarks(f.landmarks) for f in faces]
        # A track no new face overlaps has ended (the face left, or a cut): it counts as lost.
        self.losses += sum(1 for tr in self.tracks if id(tr) not in self._counted
                           and all(box_iou(box_from_landmarks(tr.landmarks), b) < 0.3 for b in new_boxes))
        self._counted.clear()
        new_tracks = []
        for face in faces:
            box = box_from_landmarks(face.landmarks)
            previous = max(self.tracks, key=lambda tr: box_iou(box_from_landmarks(tr.landmarks), box), default=None)
            keep = previous is not None and box_iou(box_from_landmarks(previous.landmarks), box) >= 0.3
            size = max(box[2], box[3], 1.0)
            filt = previous.filter if keep else self._new_filter()
            new_tracks.append(Track(face.landmarks, previous.face_size if keep else size, filt, face.score,
                                    face.landmark_scores))
        self.tracks = new_tracks

    def _new_filter(self) -> OneEuroFilter | None:
        if not self.smooth:
            return None
        o = self.smoothing
        return OneEuroFilter(o.min_cutoff, o.beta, o.d_cutoff)

    def _report(self, track: Track, t: float) -> Face:
        points = track.landmarks
        if track.filter is not None:
            points = track.filter(points / track.face_size, t) * track.face_size
        points = points.astype(np.float32)
        return Face(box=box_from_landmarks(points), landmarks=points, score=track.score,
                    landmark_scores=track.landmark_scores)


def _inside_fraction(box: Box, width: int, height: int) -> float:
    x, y, w, h = box
    ix = max(0.0, min(x + w, width) - max(x, 0.0))
    iy = max(0.0, min(y + h, height) - max(y, 0.0))
    return ix * iy / max(w * h, 1e-6)


def is_camera_source(source: str | int) -> bool:
    return isinstance(source, int) or (isinstance(source, str) and source.isdigit())


def open_capture(source: str | int) -> tuple[cv2.VideoCapture, bool]:
    """A cv2.VideoCapture for a file or a camera index ("0" counts as camera 0); (capture, is_camera)."""
    is_camera = is_camera_source(source)
    if not is_camera and not Path(source).is_file():
        raise ImageError(f"{source}: no such video file")
    capture = cv2.VideoCapture(int(source) if is_camera else str(source))
    if not capture.isOpened():
        capture.release()
        raise ImageError(f"{source}: cannot open {'camera' if is_camera else 'video'} (unsupported or corrupt)")
    return capture, is_camera


# A run of this many unreadable frames in a row ends the stream (a broken file, an unplugged camera).
MAX_BAD_FRAMES_IN_A_ROW = 25


def _packet_sizes(source: str) -> Iterator[tuple[int, int] | None]:
    """The size each frame's encoded packet declares, for a stream of whole images (MJPEG: every frame a JPEG),
    read from the packets' headers without decoding them; None where a packet says nothing (other codecs, whose
    packets are not images: the reading stops at the first). OpenCV's decoder hands every frame out at the
    stream's size, so a frame of another size comes out stale or garbled: only its packet tells."""
    capture = cv2.VideoCapture(str(source))
    try:
        if not capture.isOpened() or not capture.set(cv2.CAP_PROP_FORMAT, -1):
            return
        while True:
            ok, packet = capture.read()
            if not ok or packet is None:
                return
            data = packet.tobytes()
            if sniff_format(data[:16]) == "other":
                return
            try:
                yield probe_size(io.BytesIO(data[:JPEG_HEADER_BYTES]))
            except ImageError:
                yield None
    finally:
        capture.release()


def read_frames(source: str | int, max_frames: int | None = None,
                on_skip: Callable[[int], None] | None = None,
                max_bad_in_a_row: int = MAX_BAD_FRAMES_IN_A_ROW,
                on_damaged: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, float, np.ndarray]]:
    """(index, time in seconds, BGR frame) for each frame of a file or camera.

    A frame that cannot be decoded is skipped (`on_skip(index)`) and reading goes on: a file until its frame
    count, a camera until `max_bad_in_a_row` failures in a row. A frame whose size is not the stream's (its
    packet's or its own) is damaged: skipped too, `on_damaged(index, why)`. Indices count skipped frames too,
    so they stay the positions in the file."""
    capture, is_camera = open_capture(source)
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if not is_camera else 0
    stream = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0))
    packets = _packet_sizes(str(source)) if not is_camera else None
    start = time.monotonic()
    index, bad_run = 0, 0
    try:
        while max_frames is None or index < max_frames:
            ok, frame = capture.read()
            declared = next(packets, None) if packets is not None else None
            if ok and frame is not None:
                own = (frame.shape[1], frame.shape[0])
                stream = stream if all(stream) else own
                size = declared if declared not in (None, stream) else own
                if size != stream:
                    if on_damaged:
                        on_damaged(index, f"{size[0]}x{size[1]}, not the stream's {stream[0]}x{stream[1]}")
                    index += 1
                    continue
            if not ok or frame is None:
                more = is_camera or index < total - 1
                if not more or bad_run + 1 >= max_bad_in_a_row:
                    break
                bad_run += 1
                if on_skip:
                    on_skip(index)
                index += 1
                continue
            bad_run = 0
            yield index, (time.monotonic() - start) if is_camera else index / fps, frame
            index += 1
    finally:
        capture.release()
        if packets is not None:
            packets.close()


@dataclass
class VideoSummary:
    frames: int = 0
    faces: int = 0  # face instances over all frames
    detections: int = 0  # frames on which Haar ran
    full_scans: int = 0  # of those, frames scanned whole (the others: around the tracked faces)
    losses: int = 0  # tracks dropped: implausible landmark box or presence below the threshold
    skipped: int = 0  # frames that could not be decoded (skipped; the rest went on)
    damaged: int = 0  # frames of another size than the stream's (skipped: OpenCV hands them out stale or garbled)
    seconds: float = 0.0
    interrupted: bool = False
    outputs: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def run_video(
    source: str | int,
    landmarker: FaceLandmarker,
    out: str | os.PathLike | None = None,
    jsonl: str | os.PathLike | None = None,
    detect_every: int = 10,
    smooth: bool = True,
    draw: DrawMode = "points",
    max_frames: int | None = None,
    on_frame: Callable[[FrameResult], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    on_skip: Callable[[int], None] | None = None,
    full_scan_every: int = DEFAULT_FULL_SCAN_EVERY,
    on_damaged: Callable[[int, str], None] | None = None,
) -> VideoSummary:
    """Landmarks for every frame; JSON lines and an annotated video (mp4v), each written atomically.

    Undecodable frames are skipped and counted (`on_skip(index)`), and so are damaged ones, of another size
    than the stream's (`on_damaged(index, why)`): not drawn, not tracked, no line. When `stop_requested()`
    turns true (the CLI's SIGINT/SIGTERM) or on KeyboardInterrupt, the frames so far are finalised into a
    playable video and a complete JSONL, and the summary says `interrupted`."""
    tracker = FaceTracker(landmarker, detect_every=detect_every, smooth=smooth, full_scan_every=full_scan_every)
    summary = VideoSummary()
    capture_fps = 30.0 if is_camera_source(source) else _probe_fps(source)
    with ExitStack() as stack:
        lines = None
        if jsonl is not None:
            lines = stack.enter_context(open(stack.enter_context(atomic_path(jsonl)), "w", encoding="utf-8"))
        writer = None
        tmp_video = stack.enter_context(atomic_path(out)) if out is not None else None
        start = time.perf_counter()
        try:  # Ctrl-C ends a camera session like the end of a file: the outputs so far are kept
            def skipped(index: int) -> None:
                summary.skipped += 1
                if on_skip:
                    on_skip(index)

            def damaged(index: int, why: str) -> None:
                summary.damaged += 1
                if on_damaged:
                    on_damaged(index, why)

            for index, t, frame in read_frames(source, max_frames, skipped, on_damaged=damaged):
                if stop_requested():
                    summary.interrupted = True
                    break
                result = tracker.process(frame, index, t)
                summary.frames += 1
                summary.faces += len(result.faces)
                if lines is not None:
                    lines.write(json.dumps(result.to_json(), allow_nan=False) + "\n")
                if tmp_video is not None:
                    if writer is None:
                        writer = _open_writer(tmp_video, capture_fps, frame.shape[1], frame.shape[0], out)
                    canvas = frame.copy()
                    for face in result.faces:
                        draw_face(canvas, face.landmarks, face.box, draw)
                    writer.write(canvas)
                if on_frame:
                    on_frame(result)
        except KeyboardInterrupt:
            summary.interrupted = True
        summary.seconds = time.perf_counter() - start
        if writer is not None:
            writer.release()
        if summary.frames == 0:
            raise ImageError(f"{source}: no frames could be read")
        if tmp_video is not None:
            _check_frames_written(tmp_video, summary.frames, out)
    summary.detections, summary.losses = tracker.detections, tracker.losses
    summary.full_scans = tracker.full_scans
    summary.outputs = [str(p) for p in (out, jsonl) if p is not None]
    return summary


def _probe_fps(source: str | int) -> float:
    capture, _ = open_capture(source)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return fps if fps and fps > 0 else 30.0


def _check_frames_written(video: Path, expected: int, target: str | os.PathLike) -> None:
    """OpenCV's writer reports no failed write (a full disk gives a short or empty file): count the frames."""
    capture = cv2.VideoCapture(str(video))
    written = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if capture.isOpened() else 0
    capture.release()
    if written != expected:
        raise WriteError(f"{target}: cannot write the video ({written} of {expected} frames written: "
                         "is the disk full?)")


def _open_writer(tmp: Path, fps: float, width: int, height: int, target: str | os.PathLike) -> cv2.VideoWriter:
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise ImageError(f"{target}: cannot write a video there (OpenCV's mp4v writer failed; use a .mp4 name)")
    return writer
