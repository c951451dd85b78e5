"""`facemark serve` (PyTriton), its client (`runtime predict --server`) and `export --triton-repo`.

The server tests start the real tritonserver that PyTriton's wheel carries, on free loopback ports, and compare
the client's output with local predict; `make test` installs the serve extra, so CI runs them. Behind a load
balancer: readiness during start-up, a client started together with the server, the SIGTERM drain, a port in
use, request limits, damaged uploads, a server that dies mid-run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLES

from facemark.benchmarks.serve_load import ServerProcess, damaged_jpeg2000, free_ports, process_tree
from facemark.cli import run as cli_run

SHIPPED = Path(__file__).resolve().parents[1] / "facemark" / "assets" / "facemark-68.onnx"
PHOTO = SAMPLES / "2008_002470.jpg"
# the module's server: small limits the tests can cross cheaply; a short drain
LIMITS = ["--max-images", "4", "--max-megapixels", "8", "--max-request-mb", "2", "--grace", "60"]


def _descendants(pid: int) -> list[int]:
    return process_tree(pid)[1:]


def _kill(pids: list[int], signum: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # gone meanwhile
            os.kill(pid, signum)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install 'facemark[serve]')")
    pytest.importorskip("tritonclient.http", reason="the serve extra is not installed")
    started = ServerProcess(["--max-batch-size", "8", *LIMITS], log=tmp_path_factory.mktemp("serve") / "serve.log")
    yield started
    started.stop()
    _kill(_descendants(started.proc.pid))  # nothing may outlive a failed test


def _predict(tmp: Path, name: str, inputs: list[str], *extra: str) -> tuple[int, dict]:
    out = tmp / name
    code = cli_run(["runtime", "predict", *inputs, "--json", str(out / "doc.json"), "--out-dir", str(out / "pictures"),
                    "--workers", "2", *extra])
    return code, json.loads((out / "doc.json").read_text())


def test_server_matches_local_predict_images_json_and_pictures(server, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    inputs = [str(SAMPLES), str(bad)]
    local_code, local = _predict(tmp_path, "local", inputs)
    remote_code, remote = _predict(tmp_path, "remote", inputs, "--server", server.url)
    assert local_code == remote_code == 1  # the broken file fails on both, the rest go on
    assert remote["model"]["source_sha256"] == local["model"]["source_sha256"]
    assert remote["detector"] == local["detector"]
    assert [i["path"] for i in remote["images"]] == [i["path"] for i in local["images"]]
    faces = 0
    for mine, theirs in zip(remote["images"], local["images"], strict=True):
        assert mine["error"] == theirs["error"]
        assert len(mine["faces"]) == len(theirs["faces"]), mine["path"]
        for a, b in zip(mine["faces"], theirs["faces"], strict=True):
            assert np.abs(np.array(a["landmarks"]) - np.array(b["landmarks"])).max() <= 0.01
            assert a["box"] == b["box"] and a["score"] == b["score"]
            assert a["landmark_scores"] == b["landmark_scores"]
            faces += 1
    assert faces >= 10  # the samples hold real faces; an empty comparison would prove nothing
    for picture in (tmp_path / "local" / "pictures").iterdir():
        assert picture.read_bytes() == (tmp_path / "remote" / "pictures" / picture.name).read_bytes()


def test_crops_model_equals_the_local_landmark_model(server):
    import tritonclient.http as http

    from facemark.runtime.session import LandmarkModel

    local = LandmarkModel(SHIPPED)
    size = local.contract.size
    crops = np.random.default_rng(0).random((5, 1, size, size), dtype=np.float32)
    request = http.InferInput("image", list(crops.shape), "FP32")
    request.set_data_from_numpy(crops)
    answer = http.InferenceServerClient(f"127.0.0.1:{server.http}").infer("facemark_crops", [request])
    expected = local.predict_outputs(crops)
    assert answer.as_numpy("landmarks").shape == (5, 68, 2)
    for name, value in expected.items():
        np.testing.assert_allclose(answer.as_numpy(name).reshape(value.shape), value, atol=1e-5)


def _infer(url: str, files: list[bytes], binary: bool = True) -> dict[str, np.ndarray]:
    """One request of model `facemark` with these encoded files: its outputs."""
    import tritonclient.http as http

    from facemark.runtime.serving.client import OUTPUT_NAMES

    data = np.array([[f] for f in files], dtype=np.object_)
    request = http.InferInput("image", list(data.shape), "BYTES")
    request.set_data_from_numpy(data)
    client = http.InferenceServerClient(url.split("//")[1], network_timeout=60)
    wanted = [http.InferRequestedOutput(name, binary_data=binary) for name in OUTPUT_NAMES]
    answer = client.infer("facemark", [request], outputs=wanted)
    return {name: answer.as_numpy(name) for name in OUTPUT_NAMES}


def _errors(outputs: dict[str, np.ndarray]) -> list[str]:
    return [e.decode() if isinstance(e, bytes) else str(e) for e in outputs["error"].reshape(-1)]


def test_requests_over_the_limits_are_refused_before_decoding_and_the_rest_go_on(server):
    photo = PHOTO.read_bytes()
    assert _errors(_infer(server.url, [photo] * 5)) == ["request refused: 5 images, the limit is 4 per request "
                                                        "(--max-images)"] * 5
    blank = cv2.imencode(".png", np.zeros((3000, 3000), np.uint8))[1].tobytes()  # 9 megapixels in a few KB
    assert _errors(_infer(server.url, [photo, blank])) == ["request refused: 9.2 megapixels decoded, the limit is "
                                                           "8 per request (--max-megapixels)"] * 2
    dogs = (SAMPLES / "dogs.jpg").read_bytes()
    def noise(side: int) -> bytes:  # a PNG of random pixels: side * side * 3 bytes
        return cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8))[1].tobytes()

    # 2.4 MB of images in a body under the HTTP guard's 3 MB: refused by the model, image by image
    assert "the limit is 2 MB per request (--max-request-mb)" in _errors(_infer(server.url, [noise(900)]))[0]
    import tritonclient.http as http

    with pytest.raises(http.InferenceServerException, match=r"\[413\] the body holds 3\d{6} bytes"):
        _infer(server.url, [noise(1000)])  # over the guard's limit: refused from its head
    fine = _infer(server.url, [photo, dogs])
    assert _errors(fine) == ["", ""] and fine["face_count"].reshape(-1)[0] >= 1


def test_no_response_holds_nan_even_as_json(server):
    """Padding rows and absent values travel as 0 with `present` flags: JSON-encoded outputs are valid JSON."""
    photo = PHOTO.read_bytes()
    blank = cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))[1].tobytes()
    for binary in (True, False):
        outputs = _infer(server.url, [photo, blank], binary)
        assert outputs["face_count"].reshape(-1).tolist()[1] == 0
        for name, value in outputs.items():
            if value.dtype.kind == "f":
                assert np.isfinite(value).all(), name


def test_non_finite_crops_are_refused(server):
    import tritonclient.http as http

    from facemark.runtime.session import LandmarkModel

    size = LandmarkModel(SHIPPED).contract.size
    crops = np.zeros((2, 1, size, size), dtype=np.float32)
    crops[1, 0, 5, 5] = np.nan
    request = http.InferInput("image", list(crops.shape), "FP32")
    request.set_data_from_numpy(crops)
    with pytest.raises(http.InferenceServerException, match="NaN or Inf"):
        http.InferenceServerClient(f"127.0.0.1:{server.http}").infer("facemark_crops", [request])


def test_a_damaged_upload_fails_alone_and_the_server_stays_up(server):
    damaged = damaged_jpeg2000()  # OpenCV 4.11's imdecode dies of SIGSEGV on it
    outputs = _infer(server.url, [PHOTO.read_bytes(), damaged])
    errors = _errors(outputs)
    assert errors[0] == "" and outputs["face_count"].reshape(-1)[0] >= 1
    assert errors[1].startswith("image 1 of the request: ")
    assert server.proc.poll() is None
    assert _errors(_infer(server.url, [PHOTO.read_bytes()])) == [""]


def test_serve_prints_one_ready_line_and_no_triton_chatter(server):
    assert len(server.stdout_lines) == 1 and server.ready["ready"] is True
    assert server.ready["models"] == ["facemark", "facemark_crops", "facemark_info"]
    log = server.log.read_text()
    assert not re.search(r"^[IWE]\d{4} ", log, re.MULTILINE), "Triton's own log lines reach stderr"
    assert all(line.startswith(("WARNING ", "ERROR ")) for line in log.splitlines()), log


def test_a_port_in_use_is_one_line_exit_2_before_anything_loads(server):
    http_port, grpc_port = free_ports(2)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "facemark", "serve", "--http-port", str(http_port), "--grpc-port",
                           str(grpc_port), "--metrics-port", str(server.metrics)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{server.metrics} (--metrics-port)" in lines[0], proc.stderr
    assert time.monotonic() - started < 30


def test_readiness_and_metrics_endpoints_answer(server):
    with urllib.request.urlopen(f"{server.url}/v2/health/ready", timeout=10) as reply:
        assert reply.status == 200
    with urllib.request.urlopen(server.ready["metrics"], timeout=10) as reply:
        metrics = reply.read().decode()
    assert 'nv_inference_request_success{model="facemark"' in metrics


def _status(url: str) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:
        return exc.__class__.__name__


def test_sigterm_drains_8_requests_in_flight_then_exits_0_and_leaves_no_process(server):
    """The last test of the module's server: SIGTERM while 8 requests are in flight, more work in all than the 5 s
    Triton was once given to exit."""
    from facemark.runtime.serving.client import TritonLandmarker

    family = _descendants(server.proc.pid)
    assert family, "PyTriton runs tritonserver as a child process"
    big = cv2.resize(cv2.imread(str(PHOTO)), None, fx=3, fy=3)  # 1500x996: each request takes a while
    data, size = cv2.imencode(".jpg", big)[1].tobytes(), (big.shape[1], big.shape[0])
    answers: dict[int, tuple[float, object]] = {}

    def send(slot: int) -> None:
        try:
            found = TritonLandmarker(server.url).detect_encoded([data] * 4, [size] * 4)
            errors = [error for _, error in found if error]
            answers[slot] = (time.monotonic(), errors[0] if errors else min(len(faces) for faces, _ in found))
        except Exception as exc:  # recorded: the assertion below names it
            answers[slot] = (time.monotonic(), repr(exc))

    threads = [threading.Thread(target=send, args=(slot,)) for slot in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.4)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert _status(f"{server.url}/v2/health/ready") != 200  # no new work once draining
    for thread in threads:
        thread.join(90)
    assert server.proc.wait(90) == 0
    assert sorted(answers) == list(range(8))
    assert [value for _, value in answers.values() if not isinstance(value, int) or value < 1] == []
    assert max(when for when, _ in answers.values()) > sent, "no request was still in flight at SIGTERM"
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in family if _alive(pid)]


def test_readiness_waits_for_the_model_and_a_client_started_with_the_server_waits(tmp_path):
    """Server, readiness poller and `predict --server` start together: the poller must never see ready before
    model `facemark` answers; the client waits (one progress line) and succeeds."""
    pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install 'facemark[serve]')")
    import tritonclient.grpc as grpc

    ports = free_ports(3)
    url = f"http://127.0.0.1:{ports[0]}"
    client = subprocess.Popen([sys.executable, "-m", "facemark", "runtime", "predict", str(SAMPLES), "--server", url,
                               "--wait", "120", "--json", str(tmp_path / "doc.json")], stderr=subprocess.PIPE,
                              text=True)
    seen: list[tuple[str, object]] = []

    def poll() -> None:
        rpc = grpc.InferenceServerClient(f"127.0.0.1:{ports[1]}")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            http_ready = _status(f"{url}/v2/health/ready") == 200
            try:
                grpc_ready = rpc.is_server_ready()
            except Exception:
                grpc_ready = False
            if http_ready or grpc_ready:
                try:  # the moment readiness says yes, the model must answer on that protocol
                    outputs = _infer(url, [PHOTO.read_bytes()]) if http_ready else _infer_grpc(rpc)
                    seen.append(("answer", _errors(outputs)[0] or int(outputs["face_count"].reshape(-1)[0])))
                except Exception as exc:
                    seen.append(("answer", repr(exc)))
                return
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    server = ServerProcess(["--grace", "5"], log=tmp_path / "serve.log", ports=ports)
    try:
        poller.join(60)
        assert seen and isinstance(seen[0][1], int) and seen[0][1] >= 1, seen
        assert client.wait(120) == 0
        progress = [line for line in client.stderr.read().splitlines() if "waiting up to" in line]
        assert len(progress) == 1 and "waiting up to 120 s for the facemark server" in progress[0]
        assert len(json.loads((tmp_path / "doc.json").read_text())["images"]) == 6
    finally:
        client.kill()
        assert server.stop() == 0


def _infer_grpc(rpc) -> dict[str, np.ndarray]:
    """One request of model `facemark` with PHOTO over gRPC: its outputs."""
    import tritonclient.grpc as grpc

    data = np.array([[PHOTO.read_bytes()]], dtype=np.object_)
    request = grpc.InferInput("image", list(data.shape), "BYTES")
    request.set_data_from_numpy(data)
    answer = rpc.infer("facemark", [request])
    return {name: answer.as_numpy(name) for name in ("error", "face_count")}


@pytest.mark.parametrize("fate", ["killed", "hung"])
def test_a_server_that_dies_or_hangs_mid_run_ends_it_in_one_line_with_the_rest_failed(fate, tmp_path):
    pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install 'facemark[serve]')")
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(60):
        (photos / f"{index:02d}.jpg").write_bytes(PHOTO.read_bytes())
    server = ServerProcess(["--grace", "5"], log=tmp_path / "serve.log")
    jsonl = tmp_path / "out.jsonl"
    try:
        client = subprocess.Popen([sys.executable, "-m", "facemark", "runtime", "predict", str(photos), "--server",
                                   server.url, "--jsonl", str(jsonl), "--workers", "2", "--timeout", "3"],
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while (not jsonl.exists() or len(jsonl.read_text().splitlines()) < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        # tritonserver and all, no drain; stopped processes accept connections but never answer
        _kill(process_tree(server.proc.pid)[::-1], signal.SIGKILL if fate == "killed" else signal.SIGSTOP)
        code = client.wait(120)
        err = client.stderr.read()
    finally:
        _kill(process_tree(server.proc.pid))
        server.proc.wait()
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not done (listed as failed)" in errors[0], err
    assert "the server stopped answering" in errors[0]
    assert len(lines) == 60 and sum(line["error"] is None for line in lines) >= 3
    assert all("not done: " in line["error"] for line in lines if line["error"])


def test_server_only_options_are_refused_with_server(capsys):
    code = cli_run(["runtime", "predict", str(SAMPLES), "--server", "http://127.0.0.1:9", "--refine", "2"])
    assert code == 2
    assert "--refine: set on the server" in capsys.readouterr().err
    # every runtime option is the server's, a newly declared one too (the list is made from the options classes)
    for flags in (["--detector", "faceboxes", "--detector-input-side", "480"], ["--preset", "fast"], ["--tta", "flip"]):
        assert cli_run(["runtime", "predict", str(SAMPLES), "--server", "http://127.0.0.1:9", *flags]) == 2
        err = " ".join(capsys.readouterr().err.split())  # rich wraps the message
        assert f"{', '.join(flags[::2])}: set on the server" in err


def test_unreachable_server_is_one_progress_line_then_one_error_exit_2(capsys):
    pytest.importorskip("tritonclient.http", reason="the serve extra is not installed")
    port = free_ports(1)[0]
    started = time.monotonic()
    code = cli_run(["runtime", "predict", str(SAMPLES), "--server", f"http://127.0.0.1:{port}", "--wait", "1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2, err
    assert err[0].startswith(f"waiting up to 1.5 s for the facemark server at http://127.0.0.1:{port}")
    assert "no facemark server answers" in err[1] and "after waiting 1.5 s (--wait)" in err[1]
    assert 1.5 <= time.monotonic() - started < 20


def test_a_hung_server_costs_one_timeout(capsys):
    """A listener that never answers: --timeout bounds the readiness check, one line, exit 2."""
    pytest.importorskip("tritonclient.http", reason="the serve extra is not installed")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        started = time.monotonic()
        code = cli_run(["runtime", "predict", str(SAMPLES), "--server", f"http://127.0.0.1:{hung.getsockname()[1]}",
                        "--wait", "0", "--timeout", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no facemark server answers" in err[0], err
    assert time.monotonic() - started < 15


def test_server_options_need_server(capsys):
    assert cli_run(["runtime", "predict", str(SAMPLES), "--wait", "5"]) == 2
    assert "--wait: only with --server" in capsys.readouterr().err


def test_serve_limits_refuse_from_the_headers_alone():
    from facemark.runtime.serving.server import ServeLimits

    limits = ServeLimits(max_request_mb=1, max_images=2, max_megapixels=0.2)
    photo = PHOTO.read_bytes()  # 500x332: 0.166 megapixels
    assert limits.refusal([photo]) is None
    assert limits.refusal([b"not an image"]) is None  # fails on its own when decoded
    assert limits.refusal([photo] * 2).startswith("request refused: 0.3 megapixels decoded, the limit is 0.2")
    assert limits.refusal([photo] * 3).startswith("request refused: 3 images, the limit is 2")
    assert "the limit is 1 MB" in limits.refusal([b"x" * 1_100_000])


def test_decoder_pool_survives_a_crashing_decoder():
    from facemark.errors import ImageError
    from facemark.runtime.decode_pool import DecoderPool

    with DecoderPool(1) as pool:
        with pytest.raises(ImageError, match="image 1: "):
            pool.decode(damaged_jpeg2000(), "image 1")
        assert pool.decode(PHOTO.read_bytes(), "image 2").shape == (332, 500, 3)
        with pytest.raises(ImageError, match="image 3: not a readable image"):
            pool.decode(b"junk", "image 3")


@pytest.mark.parametrize("case", ["unloadable model", "missing extra", "images above the batch"])
def test_serve_start_up_failures_are_one_line_exit_2(case, tmp_path, monkeypatch, capsys):
    pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install 'facemark[serve]')")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_text("not a model")
    args = {"unloadable model": ["--model", str(garbage)], "missing extra": [],
            "images above the batch": ["--max-images", "20"]}[case]
    if case == "missing extra":
        monkeypatch.setitem(sys.modules, "pytriton.triton", None)  # as if the serve extra were absent
    ports = [str(p) for p in free_ports(3)]
    code = cli_run(["serve", "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], *args])
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"unloadable model": "garbage.onnx: not a loadable ONNX model",
                "missing extra": "pip install 'facemark[serve]'",
                "images above the batch": "--max-images 20 is above --max-batch-size 16"}[case]
    assert code == 2 and len(err) == 1 and expected in err[0], err


def test_check_ports_free_names_the_port_in_use():
    from facemark.runtime.serving.server import ServeError, check_ports_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"127.0.0.1:{port} \\(--grpc-port\\)"):
            check_ports_free("127.0.0.1", {"http": free_ports(1)[0], "grpc": port})
    free = free_ports(1)[0]
    with pytest.raises(ServeError, match="--metrics-port"):  # the same port twice
        check_ports_free("127.0.0.1", {"http": free, "metrics": free})


def test_pack_and_unpack_keep_every_field_and_empty_images():
    from facemark.runtime.landmarker import Detections, Face
    from facemark.runtime.serving.protocol import pack_detections, unpack_image

    rng = np.random.default_rng(1)
    with_scores = Face((10.5, 20.25, 30.0, 31.0), rng.random((68, 2), dtype=np.float32) * 100, 0.97, 3.0,
                       (9.0, 19.0, 33.0, 33.0), rng.random(68, dtype=np.float32), (640, 480))
    bare = Face((1.0, 2.0, 3.0, 4.0), rng.random((68, 2), dtype=np.float32), None, None, None, None, (640, 480))
    packed = pack_detections([Detections([with_scores, bare], {}, []), Detections([], {}, ["1 face(s) dropped"]),
                              "image 2 of the request: corrupt"])
    assert packed["landmarks"].shape == (3, 2, 68, 2)
    faces, error = unpack_image(packed, 0, (640, 480))
    assert error == "" and len(faces) == 2
    assert faces[0].to_json() == with_scores.to_json() and faces[1].to_json() == bare.to_json()
    assert unpack_image(packed, 1, (640, 480)) == ([], "1 face(s) dropped")
    assert unpack_image(packed, 2, (640, 480)) == ([], "image 2 of the request: corrupt")
    assert all(np.isfinite(v).all() for v in packed.values() if v.dtype.kind == "f")  # no NaN, ever
    nobody = pack_detections([Detections([], {}, [])])
    assert nobody["boxes"].shape == (1, 1, 4)  # one padding row: PyTriton cannot ship an empty tensor
    assert unpack_image(nobody, 0, (1, 1)) == ([], "")


@pytest.mark.parametrize("tensorrt", [False, True])
def test_triton_repository_config_parses_and_matches_the_onnx_file(tmp_path, tensorrt):
    pytest.importorskip("onnx", reason="export needs the train extra")
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="the serve extra is not installed")
    import onnxruntime as ort
    from google.protobuf import text_format

    repo = tmp_path / "repo"
    (repo / "facemark_crops").mkdir(parents=True)
    (repo / "facemark_crops" / "stale.txt").write_text("replaced")  # an older export is replaced whole
    (repo / "other_model").mkdir()  # other models in the repository are left alone
    args = ["export", str(SHIPPED), "--triton-repo", str(repo), "--triton-max-batch-size", "8"]
    assert cli_run(args + (["--triton-tensorrt"] if tensorrt else ["--triton-kind", "cpu"])) == 0
    folder = repo / "facemark_crops"
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt"] and (repo / "other_model").is_dir()
    assert oct(folder.stat().st_mode & 0o777) == "0o755"
    config = text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())
    assert config.name == "facemark_crops" and config.backend == "onnxruntime" and config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [t.name for t in actual]
        for tensor, onnx_value in zip(declared, actual, strict=True):
            assert tensor.data_type == pb.TYPE_FP32
            per_item = list(onnx_value.shape[1:])
            assert list(tensor.dims) == (per_item or [1])
            assert tensor.HasField("reshape") == (not per_item)
    kind = config.instance_group[0].kind
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    if tensorrt:
        assert kind == pb.ModelInstanceGroup.KIND_GPU
        assert accelerators[0].name == "tensorrt"
        assert accelerators[0].parameters["precision_mode"] == "FP16"
        assert accelerators[0].parameters["trt_engine_cache_enable"] == "1"
    else:
        assert kind == pb.ModelInstanceGroup.KIND_CPU and not accelerators


def test_triton_repository_refuses_a_model_without_a_batch_dimension(tmp_path):
    onnx = pytest.importorskip("onnx", reason="export needs the train extra")
    from facemark.errors import ModelError
    from facemark.export.triton_repo import write_triton_repository

    model = onnx.load(str(SHIPPED))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    with pytest.raises(ModelError, match="no dynamic batch dimension"):
        write_triton_repository(fixed, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()  # checked before anything is written


def test_libpython_folder_goes_first_on_ld_library_path(monkeypatch):
    import sysconfig

    from facemark.runtime.serving.server import use_own_libpython

    monkeypatch.setenv("LD_LIBRARY_PATH", "/somewhere/else")
    libdir = use_own_libpython()
    assert libdir == sysconfig.get_config_var("LIBDIR")
    assert os.environ["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, "/somewhere/else"]
    use_own_libpython()  # idempotent
    assert os.environ["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, "/somewhere/else"]


def test_bench_serve_adds_a_load_row_with_no_errors_and_identical_faces(tmp_path):
    pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install 'facemark[serve]')")
    out = tmp_path / "bench"
    code = cli_run(["bench", "--serve", "--quick", "--serve-requests", "24", "--serve-clients", "3",
                    "--serve-damaged-every", "8", "--out-dir", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    serve = report["serve"]
    assert serve["requests"] == 24 and serve["clients"] == 3 and serve["errors"] == 0
    assert serve["requests_per_s"] > 0 and serve["p50_ms"] <= serve["p99_ms"] and serve["peak_rss_mb"] > 100
    assert serve["damaged"]["damaged"] == 3 and serve["damaged"]["errors"] == 0 and serve["server_exits"] == 0
    assert serve["max_landmark_diff_px"] <= 0.01 and serve["face_count_mismatches"] == 0
    assert "## Serving" in (out / "report.md").read_text()
