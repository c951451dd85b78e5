"""`facemark serve` (PyTriton), its client (`runtime predict --server`) and `export --triton-repo`.

The server tests start the real tritonserver that PyTriton's wheel carries, on free loopback ports, and compare
the client's output with local predict; `make test` installs the serve extra, so CI runs them.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from facemark.benchmarks.serve_load import ServerProcess, free_ports
from facemark.cli import run as cli_run
from tests.conftest import SAMPLES

SHIPPED = Path(__file__).resolve().parents[1] / "facemark" / "assets" / "facemark-68.onnx"


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc (Linux)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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
    started = ServerProcess(["--max-batch", "8"], log=tmp_path_factory.mktemp("serve") / "serve.log")
    yield started
    started.stop()


def _predict(tmp: Path, name: str, inputs: list[str], *extra: str) -> tuple[int, dict]:
    out = tmp / name
    code = cli_run(["runtime", "predict", *inputs, "--json", str(out / "doc.json"), "--out", str(out / "pictures"),
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


def test_readiness_and_metrics_endpoints_answer(server):
    with urllib.request.urlopen(f"{server.url}/v2/health/ready", timeout=10) as reply:
        assert reply.status == 200
    with urllib.request.urlopen(server.ready["metrics"], timeout=10) as reply:
        metrics = reply.read().decode()
    assert 'nv_inference_request_success{model="facemark"' in metrics


def test_server_stops_on_sigterm_and_leaves_no_process(server):
    family = _descendants(server.proc.pid)
    assert family, "PyTriton runs tritonserver as a child process"
    assert server.stop() == 0
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in family if _alive(pid)]


def test_server_only_options_are_refused_with_server(capsys):
    code = cli_run(["runtime", "predict", str(SAMPLES), "--server", "http://127.0.0.1:9", "--refine", "2"])
    assert code == 2
    assert "--refine: set on the server" in capsys.readouterr().err


def test_unreachable_server_is_one_line_exit_2(capsys):
    pytest.importorskip("tritonclient.http", reason="the serve extra is not installed")
    port = free_ports(1)[0]
    code = cli_run(["runtime", "predict", str(SAMPLES), "--server", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no facemark server answers" in err[0]


def test_pack_and_unpack_keep_every_field_and_empty_images():
    from facemark.runtime.landmarker import Detections, Face
    from facemark.runtime.serving import pack_detections, unpack_image

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
    nobody = pack_detections([Detections([], {}, [])])
    assert nobody["boxes"].shape == (1, 1, 4)  # one NaN row: PyTriton cannot ship an empty tensor
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
    args = ["export", str(SHIPPED), "--triton-repo", str(repo), "--triton-max-batch", "8"]
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

    from facemark.runtime.serve import use_own_libpython

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
                    "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    serve = report["serve"]
    assert serve["requests"] == 24 and serve["clients"] == 3 and serve["errors"] == 0
    assert serve["requests_per_s"] > 0 and serve["p50_ms"] <= serve["p99_ms"]
    assert serve["max_landmark_diff_px"] <= 0.01 and serve["face_count_mismatches"] == 0
    assert "## Serving" in (out / "report.md").read_text()
