"""Video: per-frame landmarks with tracking between detections and optional One-Euro smoothing (docs/DESIGN.md
section 7: `runtime video`; the Python API is `FaceLandmarker.track`, built on FaceTracker).

Sources: a file, a camera index, or a network stream (rtsp://, rtsps://, http(s)://) that OpenCV's FFmpeg
backend opens with a timeout; a stream ends at its first failed read (it does not resync) and says so in one
line. Outputs (`run_video`) are predict's, per frame and reusing predict's writers: the annotated video, JSON
lines, one JSON document (schema "video-document"), CSV with frame and time, aligned chips. The files are
written through temporary files renamed into place when the run ends (complete or absent), each chip atomically
as it is made.

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

import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import cv2
import numpy as np

from facemark.contract import Box, box_from_landmarks, box_iou
from facemark.drawing import DrawMode, draw_face
from facemark.errors import ImageError, WriteError
from facemark.fileio import atomic_path, is_stdout, is_stream, write_error, write_output_chunks
from facemark.imageio import IMAGE_SUFFIXES, JPEG_HEADER_BYTES, probe_size, sniff_format, write_image
from facemark.outputs import path_bytes, utf8_text
from facemark.runtime.defaults import DEFAULT_FULL_SCAN_EVERY
from facemark.runtime.landmarker import Face, FaceLandmarker
from facemark.runtime.predict.writers import (
    ChipOptions,
    OutputFolder,
    chip_name,
    claim_output_stems,
    face_csv_cells,
    face_csv_columns,
)

# Network streams OpenCV's FFmpeg backend reads: no file to check, a timeout instead of a hang.
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
STREAM_TIMEOUT_MS = 15_000
DEFAULT_FPS = 30.0  # a camera's, and a source's that declares none
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
                  ".ts", ".mts", ".m2ts", ".ogv")
# ISO media brands of still images (HEIF/AVIF share the container with MP4): not videos.
_IMAGE_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"avif")


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
    """The faces of one frame, usable as the list FaceLandmarker.detect returns (len, iteration, [i])."""

    index: int  # the frame's position in the source (skipped frames count too)
    time: float  # seconds from the start of the source
    faces: list[Face]
    detected: bool  # True when Haar ran on this frame, False when the faces were tracked

    def __len__(self) -> int:
        return len(self.faces)

    def __iter__(self) -> Iterator[Face]:
        return iter(self.faces)

    def __getitem__(self, item):  # an int gives a Face, a slice a list of them
        return self.faces[item]

    def to_json(self, pose: bool = False) -> dict:
        return {"frame": self.index, "time": round(self.time, 4), "detected": self.detected,
                "faces": [f.to_json(pose) for f in self.faces]}


class FaceTracker:
    """Per-frame landmarks for frames handed in one at a time, in order (see the module docstring for the
    policy); `FaceLandmarker.track` runs one over a whole source. `process(frame)` returns the frame's
    FrameResult."""

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
        self._next_index = 0

    def process(self, frame: np.ndarray, index: int | None = None, t: float | None = None) -> FrameResult:
        """The faces of the next frame (BGR, as OpenCV reads it). `index` defaults to the count of frames
        processed so far, `t` (seconds; smoothing uses it) to index / DEFAULT_FPS."""
        index = self._next_index if index is None else index
        t = index / DEFAULT_FPS if t is None else t
        self._next_index = index + 1
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
        size = (frame.shape[1], frame.shape[0])
        faces = [self._report(track, t, size) for track in self.tracks]
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

    def _report(self, track: Track, t: float, image_size: tuple[int, int]) -> Face:
        points = track.landmarks
        if track.filter is not None:
            points = track.filter(points / track.face_size, t) * track.face_size
        points = points.astype(np.float32)
        return Face(box=box_from_landmarks(points), landmarks=points, score=track.score,
                    landmark_scores=track.landmark_scores, image_size=image_size)


def _inside_fraction(box: Box, width: int, height: int) -> float:
    x, y, w, h = box
    ix = max(0.0, min(x + w, width) - max(x, 0.0))
    iy = max(0.0, min(y + h, height) - max(y, 0.0))
    return ix * iy / max(w * h, 1e-6)


def is_camera_source(source: str | int) -> bool:
    return isinstance(source, int) or (isinstance(source, str) and source.isdigit())


def is_stream_url(source: str | int | os.PathLike) -> bool:
    return isinstance(source, str) and source.lower().startswith(STREAM_SCHEMES)


def looks_like_video(path: str | os.PathLike) -> bool:
    """A video file, by its name (VIDEO_SUFFIXES) or, when the name is not an image's, by its container's first
    bytes (MP4/MOV, AVI, Matroska/WebM, MPEG, FLV, Ogg, ASF): `runtime predict` points such a file to video."""
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return True
    if suffix in IMAGE_SUFFIXES or not Path(path).is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False  # reading it says why, as for any input
    if head[4:8] == b"ftyp":
        return head[8:12] not in _IMAGE_BRANDS
    return (head[:4] == b"RIFF" and head[8:12] == b"AVI ") or head.startswith(
        (b"\x1a\x45\xdf\xa3", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"FLV", b"OggS",
         b"\x30\x26\xb2\x75"))


@dataclass(frozen=True)
class VideoInfo:
    """What an opened source declares."""

    source: str
    kind: str  # "file", "camera" or "stream" (a network URL)
    fps: float  # the source's, else DEFAULT_FPS
    frames: int | None  # the frame count a file or stream declares; None for a camera or a live stream
    width: int
    height: int

    def to_json(self) -> dict:
        return {"path": utf8_text(self.source), "kind": self.kind, "fps": round(self.fps, 3), "frames": self.frames,
                "width": self.width or None, "height": self.height or None}


def quiet_opencv() -> None:
    """OpenCV's warnings off (errors stay): a command reports a source's problems in its own one line."""
    cv2.setLogLevel(2)  # cv2's LOG_LEVEL_ERROR


def open_capture(source: str | int) -> tuple[cv2.VideoCapture, VideoInfo]:
    """A cv2.VideoCapture for a file, a camera index ("0" counts as camera 0) or a network stream (rtsp://,
    http(s)://, through FFmpeg), and what it declares; one line (ImageError) when it cannot be opened."""
    kind = "camera" if is_camera_source(source) else "stream" if is_stream_url(source) else "file"
    if kind == "file" and not Path(source).is_file():
        raise ImageError(f"{source}: no such video file")
    if kind == "camera":
        capture = cv2.VideoCapture(int(source))
    elif kind == "stream":
        capture = cv2.VideoCapture(str(source), cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                                                                cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS])
    else:
        capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        capture.release()
        if kind == "stream":
            raise ImageError(f"{source}: cannot open the stream (no answer within {STREAM_TIMEOUT_MS // 1000} s, "
                             "refused, not found, or not a video FFmpeg reads)")
        raise ImageError(f"{source}: cannot open {'camera' if kind == 'camera' else 'video'} (unsupported or corrupt)")
    declared = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if kind != "camera" else 0
    fps = capture.get(cv2.CAP_PROP_FPS) if kind != "camera" else 0.0
    info = VideoInfo(str(source), kind, fps if fps and 0 < fps < 1000 else DEFAULT_FPS,
                     declared if declared > 0 else None, int(capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0),
                     int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0))
    return capture, info


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
                on_damaged: Callable[[int, str], None] | None = None,
                on_open: Callable[[VideoInfo], None] | None = None,
                on_end: Callable[[str, bool], None] | None = None) -> Iterator[tuple[int, float, np.ndarray]]:
    """(index, time in seconds, BGR frame) for each frame of a file, camera or network stream.

    A frame that cannot be decoded is skipped (`on_skip(index)`) and reading goes on: a file until its frame
    count, a camera until `max_bad_in_a_row` failures in a row. A frame whose size is not the stream's (its
    packet's or its own) is damaged: skipped too, `on_damaged(index, why)`. Indices count skipped frames too,
    so they stay the positions in the file. A network stream ends at its first failed read (it does not resync):
    `on_end(line, short)`, `short` when it declared more frames (it dropped). `on_open(info)` once it is open."""
    capture, info = open_capture(source)
    if on_open:
        on_open(info)
    is_camera, is_stream = info.kind == "camera", info.kind == "stream"
    total = info.frames or 0
    stream = (info.width, info.height)
    # the packets' own sizes come from a second reader of the file: not for a camera or a network stream
    packets = _packet_sizes(str(source)) if info.kind == "file" else None
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
                if is_stream:
                    if on_end and (not total or index < total):
                        on_end(_stream_end_line(source, index, total), index < total)
                    break
                more = is_camera or index < total - 1
                if not more or bad_run + 1 >= max_bad_in_a_row:
                    break
                bad_run += 1
                if on_skip:
                    on_skip(index)
                index += 1
                continue
            bad_run = 0
            yield index, (time.monotonic() - start) if is_camera else index / info.fps, frame
            index += 1
    finally:
        capture.release()
        if packets is not None:
            packets.close()


def _stream_end_line(source: str | int, frames: int, declared: int) -> str:
    if declared:
        return f"{source}: the stream dropped after {frames} of its {declared} frames; the frames read are kept"
    return f"{source}: the stream ended after {frames} frames (closed by its server, or dropped)"


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
    ended: str | None = None  # a network stream that ended early or without a declared length: the one line
    dropped: bool = False  # ... and it declared more frames than it gave (a connection lost mid-way)
    outputs: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {"frames": self.frames, "faces": self.faces, "detections": self.detections,
                "full_scans": self.full_scans, "losses": self.losses, "skipped": self.skipped,
                "damaged": self.damaged, "seconds": round(self.seconds, 3), "fps": round(self.fps, 2),
                "interrupted": self.interrupted, "ended": self.ended}


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
    json_path: str | os.PathLike | None = None,
    csv_path: str | os.PathLike | None = None,
    chips: ChipOptions | None = None,
    pose: bool = False,
    on_open: Callable[[VideoInfo], None] | None = None,
    on_end: Callable[[str], None] | None = None,
) -> VideoSummary:
    """Landmarks for every frame of a file, camera or network stream; each output written atomically: the
    annotated video (`out`, mp4v), JSON lines (`jsonl`), one JSON document (`json_path`: the model block as
    predict's, the source, the frames, the summary; schema "video-document"), CSV (`csv_path`: predict's
    columns plus frame and time), aligned chips (`chips`: STEM-frameNNNNNN-faceI.png); `pose` adds the head
    pose to the JSON, JSONL and CSV.

    Undecodable frames are skipped and counted (`on_skip(index)`), and so are damaged ones, of another size
    than the stream's (`on_damaged(index, why)`): not drawn, not tracked, no line. When `stop_requested()`
    turns true (the CLI's SIGINT/SIGTERM) or on KeyboardInterrupt, the frames so far are finalised into a
    playable video and a complete JSONL, and the summary says `interrupted`. A network stream that drops keeps
    what was read (`on_end(line)`, summary.ended). `on_open(info)` once the source is open."""
    tracker = FaceTracker(landmarker, detect_every=detect_every, smooth=smooth, full_scan_every=full_scan_every)
    summary = VideoSummary()
    opened: list[VideoInfo] = []

    def skipped(index: int) -> None:
        summary.skipped += 1
        if on_skip:
            on_skip(index)

    def damaged(index: int, why: str) -> None:
        summary.damaged += 1
        if on_damaged:
            on_damaged(index, why)

    def ended(line: str, short: bool) -> None:
        summary.ended, summary.dropped = line, short
        if on_end:
            on_end(line)

    def started(info: VideoInfo) -> None:
        opened.append(info)
        if on_open:
            on_open(info)

    with ExitStack() as stack:
        sinks = _FrameSinks(stack, source, out, jsonl, csv_path, chips, pose, draw, keep=json_path is not None,
                            spool_dir=_spool_folder(json_path))
        start = time.perf_counter()
        try:  # Ctrl-C ends a camera session like the end of a file: the outputs so far are kept
            for index, t, frame in read_frames(source, max_frames, skipped, on_damaged=damaged, on_open=started,
                                               on_end=ended):
                if stop_requested():
                    summary.interrupted = True
                    break
                result = tracker.process(frame, index, t)
                summary.frames += 1
                summary.faces += len(result.faces)
                sinks.write(result, frame, opened[0].fps)
                if on_frame:
                    on_frame(result)
        except KeyboardInterrupt:
            summary.interrupted = True
        summary.seconds = time.perf_counter() - start
        summary.detections, summary.losses = tracker.detections, tracker.losses
        summary.full_scans = tracker.full_scans
        sinks.finish_video(summary.frames)
        if summary.frames == 0:
            raise ImageError(f"{source}: no frames could be read")
        if json_path is not None:
            settings = {"detect_every": detect_every, "full_scan_every": full_scan_every, "smooth": smooth,
                        "pose": pose}
            write_output_chunks(json_path, video_document(landmarker, opened[0], settings, sinks.frame_lines(),
                                                          summary))
    summary.outputs = [str(p) for p in (out, jsonl, json_path, csv_path) if p is not None]
    if chips is not None:
        summary.outputs.append(str(chips.folder))
    return summary


def video_document(landmarker: FaceLandmarker, info: VideoInfo, tracking: dict, frame_lines: Iterable[str],
                   summary: VideoSummary) -> Iterator[str]:
    """`runtime video --json`, piece by piece: predict's header (model, detector, pipeline), the source, the
    tracking settings, `complete` (false when interrupted or a stream dropped), every frame as its --jsonl line
    (`frame_lines`, read back from disk: a long stream's frames are never all in memory), the summary."""
    head = {**landmarker.describe(), "source": info.to_json(), "tracking": tracking,
            "complete": not (summary.interrupted or summary.dropped)}
    yield json.dumps(head, allow_nan=False)[:-1] + ', "frames": ['
    for i, line in enumerate(frame_lines):
        yield ("" if i == 0 else ", ") + line.rstrip("\n")
    yield '], "summary": ' + json.dumps(summary.to_json(), allow_nan=False) + "}\n"


def video_csv_header(pose: bool) -> list[str]:
    """`runtime video --csv`: predict's columns with the frame's index and time (seconds) after the path."""
    return ["path", "frame", "time", "face", *face_csv_columns(pose), "path_bytes"]


def _open_text(stack: ExitStack, path: str | os.PathLike | None) -> TextIO | None:
    """A text output: `-` is stdout, a pipe or device is written as it is, a file through a temporary file
    renamed into place when the stack closes without an error."""
    if path is None:
        return None
    if is_stdout(path):
        return sys.stdout
    target = path if is_stream(path) else stack.enter_context(atomic_path(path))
    try:
        return stack.enter_context(open(target, "w", encoding="utf-8", newline=""))
    except OSError as exc:
        raise write_error(path, exc) from None


def _spool_folder(json_path: str | os.PathLike | None) -> str | None:
    """Where the --json document's frames wait: beside a file document (the space it will need), else the
    system's temporary folder."""
    if json_path is None or is_stdout(json_path) or is_stream(json_path):
        return None
    return str(Path(json_path).resolve().parent)


def _source_name(source: str | int) -> Path:
    """The name a source's chips take their stem from: the file's, the URL's last part, camera0."""
    if is_camera_source(source):
        return Path(f"camera{source}")
    if is_stream_url(source):
        return Path(Path(urlsplit(str(source)).path).name or urlsplit(str(source)).hostname or "stream")
    return Path(source)


class _FrameSinks:
    """run_video's per-frame outputs, each in a temporary file renamed into place once the run ends well."""

    def __init__(self, stack: ExitStack, source: str | int, out: str | os.PathLike | None,
                 jsonl: str | os.PathLike | None, csv_path: str | os.PathLike | None, chips: ChipOptions | None,
                 pose: bool, draw: DrawMode, keep: bool, spool_dir: str | None = None) -> None:
        self.name, self.name_bytes = utf8_text(str(source)), path_bytes(str(source)) or ""
        self.pose, self.draw, self.chips = pose, draw, chips
        self.lines = _open_text(stack, jsonl)
        csv_file = _open_text(stack, csv_path)
        self.rows = csv.writer(csv_file, lineterminator="\n") if csv_file is not None else None
        if self.rows is not None:
            self.rows.writerow(video_csv_header(pose))
        # The JSON document's frames, one line each, on disk until the end (beside the document: its file system)
        self.frames: TextIO | None = stack.enter_context(
            tempfile.TemporaryFile("w+", encoding="utf-8", dir=spool_dir)) if keep else None
        self.out = out
        self.tmp_video = stack.enter_context(atomic_path(out)) if out is not None else None
        self.writer: cv2.VideoWriter | None = None
        self.stem = ""
        if chips is not None:  # claimed before any frame: never a chip over a file facemark did not write
            name = _source_name(source)
            folder = OutputFolder(Path(chips.folder), "--aligned")
            self.stem = claim_output_stems([name], [folder], per_frame=True)[str(name)]

    def write(self, result: FrameResult, frame: np.ndarray, fps: float) -> None:
        line = json.dumps(result.to_json(self.pose), allow_nan=False) + "\n" \
            if self.lines is not None or self.frames is not None else ""
        if self.lines is not None:
            self.lines.write(line)
        if self.frames is not None:
            self.frames.write(line)
        if self.rows is not None:
            self.rows.writerows([self.name, result.index, round(result.time, 4), i, *face_csv_cells(face, self.pose),
                                 self.name_bytes] for i, face in enumerate(result.faces))
        if self.tmp_video is not None:
            if self.writer is None:
                self.writer = _open_writer(self.tmp_video, fps, frame.shape[1], frame.shape[0], self.out)
            canvas = frame.copy()
            for face in result.faces:
                draw_face(canvas, face.landmarks, face.box, self.draw)
            self.writer.write(canvas)
        if self.chips is not None:
            stem = f"{self.stem}-frame{result.index:06d}"
            for i, face in enumerate(result.faces):
                write_image(Path(self.chips.folder) / chip_name(stem, i),
                            face.aligned(frame, self.chips.size, self.chips.template))

    def frame_lines(self) -> Iterator[str]:
        """The frames written so far, as their JSON lines (none when no --json document was asked for)."""
        if self.frames is None:
            return
        self.frames.flush()
        self.frames.seek(0)
        yield from self.frames

    def finish_video(self, frames: int) -> None:
        if self.writer is not None:
            self.writer.release()
        if self.tmp_video is not None and frames:
            _check_frames_written(self.tmp_video, frames, self.out)


def track(landmarker: FaceLandmarker, source: str | int | os.PathLike | Iterable[np.ndarray], *,
          smooth: bool = True, detect_every: int = 10, full_scan_every: int = DEFAULT_FULL_SCAN_EVERY,
          max_frames: int | None = None, fps: float = DEFAULT_FPS) -> Iterator[FrameResult]:
    """FaceLandmarker.track: one FrameResult per frame of a video file, camera index, network URL or an
    iterable of BGR frames (times index / `fps` for those), tracked and smoothed as `runtime video` does."""
    if isinstance(source, np.ndarray) and source.ndim < 4:
        raise TypeError("track() takes a video or several frames; for one image use detect(image)")
    tracker = FaceTracker(landmarker, detect_every=detect_every, smooth=smooth, full_scan_every=full_scan_every)
    if isinstance(source, str | int | os.PathLike):
        frames: Iterable[tuple[int, float, np.ndarray]] = read_frames(
            os.fspath(source) if isinstance(source, os.PathLike) else source, max_frames)
    else:
        frames = ((index, index / fps, frame) for index, frame in enumerate(islice(source, max_frames)))
    for index, t, frame in frames:
        yield tracker.process(frame, index, t)


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
