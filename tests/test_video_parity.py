"""`runtime video` as complete as `runtime predict` (issue 40): a progress line on a terminal, --json / --csv /
--pose / --aligned, network streams (a local HTTP server; rtsp without one), `runtime predict clip.mp4` pointing
to `runtime video`, and the Python API `FaceLandmarker.track`.

The shipped model on short clips of a real sample face (tests/test_runtime_video.py's clips), one thread.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
from rich.console import Console
from test_runtime_video import CLIP_SIZE, still_face_frames, write_clip

from facemark.cli import run
from facemark.runtime import cli as runtime_cli
from facemark.runtime.landmarker import FaceLandmarker
from facemark.runtime.predict.writers import csv_header
from facemark.runtime.schema import schema
from facemark.runtime.video import FaceTracker, run_video

FRAMES = 6
CPU = ["--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("video-parity") / "clip.mp4", still_face_frames(FRAMES))


@pytest.fixture(scope="module")
def landmarker() -> FaceLandmarker:
    return FaceLandmarker(device="cpu", threads=1)


def serve(handler) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


# --- progress ---------------------------------------------------------------------------------------------------

def test_progress_line_on_a_terminal_and_none_elsewhere(clip, tmp_path, monkeypatch, capsys):
    terminal = io.StringIO()
    monkeypatch.setattr(runtime_cli, "console", Console(file=terminal, force_terminal=True, width=120))
    assert run(["runtime", "video", str(clip), *CPU, "--jsonl", str(tmp_path / "a.jsonl")]) == 0
    drawn = terminal.getvalue()
    assert f"{FRAMES}/{FRAMES}" in drawn and "fps" in drawn and f"{FRAMES} faces" in drawn
    monkeypatch.undo()
    assert run(["runtime", "video", str(clip), *CPU, "--jsonl", str(tmp_path / "b.jsonl")]) == 0
    err = capsys.readouterr().err
    assert f"{FRAMES}/{FRAMES}" not in err and f"{FRAMES} frames" in err  # the summary only: no progress in a log


# --- --json / --csv / --pose / --aligned ------------------------------------------------------------------------

def test_json_csv_pose_and_aligned_as_in_predict(clip, tmp_path, landmarker):
    out = tmp_path / "out"
    code = run(["runtime", "video", str(clip), *CPU, "--json", str(out / "v.json"), "--csv", str(out / "v.csv"),
                "--jsonl", str(out / "v.jsonl"), "--pose", "--aligned", str(out / "chips"), "--aligned-size", "64"])
    assert code == 0
    document = json.loads((out / "v.json").read_text())
    jsonschema.Draft202012Validator(schema("video-document")).validate(document)
    assert document["model"] == landmarker.describe()["model"]  # predict's model block
    assert document["source"]["frames"] == FRAMES and document["complete"] is True
    assert [f["frame"] for f in document["frames"]] == list(range(FRAMES))
    assert document["summary"]["frames"] == FRAMES
    faces = [face for frame in document["frames"] for face in frame["faces"]]
    assert faces and all(set(face["pose"]) == {"yaw", "pitch", "roll"} for face in faces)
    lines = [json.loads(line) for line in (out / "v.jsonl").read_text().splitlines()]
    assert lines == document["frames"]  # one frame, one form: the --jsonl line is the document's entry
    rows = list(csv.reader((out / "v.csv").read_text().splitlines()))
    predict_columns = csv_header(pose=True)
    assert rows[0] == ["path", "frame", "time", *predict_columns[1:]]
    assert len(rows) - 1 == len(faces) and rows[1][:4] == [str(clip), "0", "0.0", "0"]
    chips = sorted(p.name for p in (out / "chips").glob("*.png"))
    assert chips[0] == "clip-frame000000-face0.png" and len(chips) == len(faces)
    assert cv2.imread(str(out / "chips" / chips[0])).shape == (64, 64, 3)
    assert sorted(p.name for p in out.iterdir()) == ["chips", "v.csv", "v.json", "v.jsonl"]  # no temporary left


def test_the_json_document_on_stdout_is_the_files(clip, tmp_path, capsys):
    """The document is written piece by piece (its frames wait on disk, not in memory): on stdout as in a file."""
    assert run(["runtime", "video", str(clip), *CPU, "--json", str(tmp_path / "v.json")]) == 0
    capsys.readouterr()
    assert run(["runtime", "video", str(clip), *CPU, "--json", "-"]) == 0
    printed, written = json.loads(capsys.readouterr().out), json.loads((tmp_path / "v.json").read_text())
    for document in (printed, written):
        jsonschema.Draft202012Validator(schema("video-document")).validate(document)
        document["summary"].pop("seconds"), document["summary"].pop("fps")
    assert printed == written and len(printed["frames"]) == FRAMES


def test_aligned_chips_never_replace_a_file_facemark_did_not_write(clip, tmp_path):
    chips = tmp_path / "chips"
    chips.mkdir()
    foreign = chips / "clip-frame000001-face0.png"  # someone's file, named as this video's chip would be
    foreign.write_bytes(b"not ours")
    assert run(["runtime", "video", str(clip), *CPU, "--aligned", str(chips), "--max-frames", "2"]) == 0
    assert foreign.read_bytes() == b"not ours"
    assert (chips / "clip-1-frame000001-face0.png").is_file()
    assert run(["runtime", "video", str(clip), *CPU, "--aligned", str(chips), "--max-frames", "2"]) == 0
    assert not (chips / "clip-2-frame000000-face0.png").exists()  # a rerun replaces its own chips


def test_outputs_are_checked_against_the_video_and_each_other_before_any_work(clip, tmp_path, capsys):
    same = tmp_path / "same.json"
    assert run(["runtime", "video", str(clip), *CPU, "--json", str(same), "--csv", str(same)]) == 2
    assert "name the same file" in capsys.readouterr().err and not same.exists()
    before = clip.read_bytes()
    assert run(["runtime", "video", str(clip), *CPU, "--json", str(clip)]) == 2
    assert "would write over" in capsys.readouterr().err and clip.read_bytes() == before


def test_pose_in_the_json_lines_on_stdout(clip, capsys):
    assert run(["runtime", "video", str(clip), *CPU, "--pose", "--max-frames", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all("pose" in face for line in lines for face in line["faces"])


def test_the_video_document_schema_is_printed(capsys):
    assert run(["schema", "video-document"]) == 0
    assert json.loads(capsys.readouterr().out)["$id"] == "urn:facemark:schema:video-document"


# --- network streams --------------------------------------------------------------------------------------------

def test_an_http_url_is_read_as_a_stream(clip, tmp_path):
    for base in serve(functools.partial(QuietFiles, directory=str(clip.parent))):
        jsonl = tmp_path / "frames.jsonl"
        assert run(["runtime", "video", f"{base}/{clip.name}", *CPU, "--jsonl", str(jsonl)]) == 0
        assert len(jsonl.read_text().splitlines()) == FRAMES


def test_an_unreachable_stream_is_one_clear_line(tmp_path, capsys):
    jsonl = tmp_path / "frames.jsonl"
    url = "rtsp://127.0.0.1:9/live"  # the discard port: nothing listens, the connection is refused at once
    assert run(["runtime", "video", url, *CPU, "--jsonl", str(jsonl)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {url}: cannot open the stream (no answer within 15 s, refused, not found, or not a " \
                  "video FFmpeg reads)"
    assert not jsonl.exists()


def test_a_stream_that_drops_midway_keeps_what_was_read(tmp_path, capsys):
    avi = tmp_path / "clip.avi"  # MJPG in AVI: its header first, so FFmpeg reads it as it comes
    writer = cv2.VideoWriter(str(avi), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, CLIP_SIZE)
    for frame in still_face_frames(20):
        writer.write(frame)
    writer.release()
    data = avi.read_bytes()

    class HalfThenGone(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # declares the whole file, sends half, closes: a connection lost mid-way
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True

    for base in serve(HalfThenGone):
        jsonl, document = tmp_path / "frames.jsonl", tmp_path / "video.json"
        code = run(["runtime", "video", f"{base}/clip.avi", *CPU, "--jsonl", str(jsonl), "--json", str(document)])
        err = capsys.readouterr().err
    read = len(jsonl.read_text().splitlines())
    assert code == 1 and 0 < read < 20
    assert f"{base}/clip.avi: the stream dropped after {read} of its 20 frames; the frames read are kept" in err
    assert json.loads(document.read_text())["complete"] is False


# --- predict given a video --------------------------------------------------------------------------------------

def test_predict_points_a_video_to_runtime_video_and_goes_on(clip, tmp_path, capsys):
    photo = tmp_path / "face.png"
    cv2.imwrite(str(photo), still_face_frames(1, noise=0.0)[0])
    unnamed = tmp_path / "recording"  # no extension: known by its content
    unnamed.write_bytes(clip.read_bytes())
    document = tmp_path / "predict.json"
    code = run(["runtime", "predict", str(clip), str(unnamed), str(photo), *CPU, "--json", str(document)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{clip}: a video: use `facemark runtime video {clip}`" in err
    assert f"{unnamed}: a video: use `facemark runtime video {unnamed}`" in err
    assert "not a readable image" not in err
    images = {Path(image["path"]).name: image for image in json.loads(document.read_text())["images"]}
    assert images["face.png"]["error"] is None and images["face.png"]["faces"]


# --- Python -----------------------------------------------------------------------------------------------------

def test_track_yields_one_sequence_of_faces_per_frame_from_a_path_or_frames(clip, landmarker):
    from_file = list(landmarker.track(clip, smooth=False))
    assert [frame.index for frame in from_file] == list(range(FRAMES))
    first = from_file[0]
    assert len(first) == len(first.faces) >= 1 and list(first) == first.faces and first[0] is first.faces[0]
    assert first.time == 0.0 and first.detected
    seen = []
    run_video(str(clip), landmarker, smooth=False, on_frame=seen.append)
    for mine, cli in zip(from_file, seen, strict=True):  # what `runtime video` finds
        np.testing.assert_array_equal(mine[0].landmarks, cli[0].landmarks)
    decoded = []
    capture = cv2.VideoCapture(str(clip))
    while (frame := capture.read()[1]) is not None:
        decoded.append(frame)
    capture.release()
    from_frames = list(landmarker.track(decoded, smooth=False, fps=25.0, max_frames=3))
    assert [f.index for f in from_frames] == [0, 1, 2] and from_frames[1].time == pytest.approx(0.04)
    np.testing.assert_array_equal(from_frames[2][0].landmarks, from_file[2][0].landmarks)
    assert from_frames[0][0].pose.yaw == pytest.approx(from_file[0][0].pose.yaw)  # pose works on tracked faces
    with pytest.raises(TypeError, match="detect"):
        next(iter(landmarker.track(decoded[0])))


def test_face_tracker_numbers_frames_itself(landmarker):
    tracker = FaceTracker(landmarker, smooth=False)
    results = [tracker.process(frame) for frame in still_face_frames(3)]
    assert [(r.index, r.time) for r in results] == [(0, 0.0), (1, 1 / 30), (2, 2 / 30)]
