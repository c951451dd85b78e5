"""facemark.runtime.ray and `runtime predict --ray` on a real local Ray cluster of two nodes (1 CPU each).

The cluster tests need the ray extra (`pip install -e '.[ray]'`) and skip without it; the message a user without
the extra gets is tested either way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from conftest import SAMPLES

from facemark.benchmarks.ray_bench import largest_difference
from facemark.cli import run

requires_ray = pytest.mark.skipif(find_spec("ray") is None,
                                  reason="the ray extra is absent: pip install -e '.[ray]' (make test installs it)")
TOLERANCE_PX = 0.01
ACTOR_TITLE = "MapWorker(MapBatches(FaceLandmarks))"  # the process title Ray gives the pool's actors


def damaged_copy(folder: Path) -> Path:
    """A JPEG cut after its first 3000 bytes: its header reads, its pixels do not."""
    target = folder / "damaged.jpg"
    target.write_bytes((SAMPLES / "2008_002470.jpg").read_bytes()[:3000])
    return target


def local_lines(tmp_path: Path, *inputs: str) -> list[dict]:
    """Local predict's --jsonl lines for `inputs` (the shipped model, one thread)."""
    out = tmp_path / "local.jsonl"
    run(["runtime", "predict", *inputs, "--jsonl", str(out), "--threads", "1"])
    return [json.loads(line) for line in out.read_text().splitlines()]


def without_faces(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "faces"}


def test_without_the_extra_one_line_names_it(tmp_path):
    script = ("import sys; sys.modules['ray'] = None; from facemark.cli import run; "
              f"sys.exit(run(['runtime', 'predict', {str(SAMPLES)!r}, '--ray', 'local', '--jsonl', "
              f"{str(tmp_path / 'out.jsonl')!r}]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'facemark[ray]'" in lines[0], done.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_ray_options_are_refused_where_they_mean_nothing(tmp_path, capsys):
    out = str(tmp_path / "rows.parquet")
    assert run(["runtime", "predict", str(SAMPLES), "--parquet", out]) == 2
    assert run(["runtime", "predict", str(SAMPLES), "--ray", "local", "--jsonl", out, "--out-dir", str(tmp_path)]) == 2
    assert run(["runtime", "predict", str(SAMPLES), "--ray", "local"]) == 2
    assert run(["runtime", "predict", str(SAMPLES), "--ray", "local", "--server", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "--parquet: only with --ray" in err and "--out-dir: not with --ray" in err and "--ray needs --jsonl" in err
    assert "--server and --ray" in err
    assert not list(tmp_path.iterdir())


@requires_ray
def test_an_address_where_nothing_answers_is_one_line(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "facemark", "runtime", "predict", str(SAMPLES), "--ray",
                           f"127.0.0.1:{port}", "--jsonl", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2  # in a process of its own: this one may be connected to the test cluster
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and f"--ray 127.0.0.1:{port}: no Ray cluster answers there" in err[0], done.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def cluster():
    """A head and one more node, 1 CPU each: a pool of two 1-CPU actors spans both nodes."""
    ray = pytest.importorskip("ray", reason="the ray extra is absent: pip install -e '.[ray]'")
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                          "object_store_memory": 200 * 2**20})
    nodes.add_node(num_cpus=1, object_store_memory=200 * 2**20)
    ray.init(address=nodes.address, logging_level="WARNING")
    nodes.wait_for_nodes()
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@requires_ray
def test_reads_paths_uris_and_bytes_and_a_bad_image_is_a_row():
    """The map_batches callable itself (no cluster): a local path, a file:// URI, a row's bytes, a damaged
    row and a missing URI; each gives its row, in order."""
    import pyarrow as pa

    from facemark.runtime.landmarker import FaceLandmarker
    from facemark.runtime.predict.runner import predict_files
    from facemark.runtime.ray import FaceLandmarks, image_schema

    photo = SAMPLES / "2009_004587.jpg"
    batch = pa.table({"path": [str(photo), photo.as_uri(), "upload-1.jpg", "upload-2.jpg", "file:///no/such.jpg"],
                      "bytes": [None, None, photo.read_bytes(), b"\xff\xd8\xff\xe0 not a jpeg", None]})
    rows = FaceLandmarks(threads=1)(batch)
    assert rows.schema == image_schema()
    rows = rows.to_pylist()
    expected = predict_files(FaceLandmarker(threads=1), [photo], workers=1)[0].to_json()
    assert rows[0] == expected and expected["faces"]
    assert rows[1] == {**expected, "path": photo.as_uri()}
    assert rows[2] == {**expected, "path": "upload-1.jpg"}
    assert rows[3]["faces"] == [] and rows[3]["error"].startswith("upload-2.jpg: ")
    assert rows[4] == {"path": "file:///no/such.jpg", "width": None, "height": None, "faces": [],
                       "error": "file:///no/such.jpg: no such file"}
    as_json = FaceLandmarks(threads=1, faces="json")(batch.slice(0, 1)).to_pylist()[0]
    assert json.loads(as_json["faces"]) == expected["faces"]
    with_pose = FaceLandmarks(threads=1, pose=True)(batch.slice(0, 1)).to_pylist()[0]
    assert with_pose == predict_files(FaceLandmarker(threads=1), [photo], workers=1, pose=True)[0].to_json()
    assert "yaw" in with_pose["faces"][0]["pose"]


@requires_ray
def test_uri_folders_are_listed_like_local_folders(tmp_path):
    from facemark.runtime.ray import job_inputs

    shutil.copytree(SAMPLES, tmp_path / "photos")
    files, failures = job_inputs([(tmp_path / "photos").as_uri(), (tmp_path / "none").as_uri(), str(SAMPLES)])
    names = sorted(p.name for p in SAMPLES.glob("*.jpg"))
    assert [Path(f).name for f in files] == names * 2
    assert all(f.startswith("file:///") for f in files[: len(names)])
    assert len(failures) == 1 and failures[0].error.startswith((tmp_path / "none").as_uri())


@requires_ray
def test_cli_on_two_nodes_matches_local_predict(cluster, tmp_path, capsys):
    damaged = damaged_copy(tmp_path)
    inputs = [str(SAMPLES), str(damaged), str(tmp_path / "missing.jpg")]
    jsonl, parquet = tmp_path / "ray.jsonl", tmp_path / "ray.parquet"
    code = run(["runtime", "predict", *inputs, "--ray", cluster.address, "--workers", "2", "--jsonl", str(jsonl),
                "--parquet", str(parquet)])
    err = capsys.readouterr().err
    assert code == 1, err  # the damaged file and the missing one
    ours = [json.loads(line) for line in jsonl.read_text().splitlines()]
    theirs = local_lines(tmp_path, *inputs)
    assert [without_faces(e) for e in ours] == [without_faces(e) for e in theirs]  # paths, sizes, errors, run
    worst_px, count_mismatches = largest_difference(ours, theirs)
    assert count_mismatches == 0 and worst_px <= TOLERANCE_PX
    assert sum(len(e["faces"]) for e in ours) >= 20 and ours[-1]["error"].startswith(f"{damaged}: ")
    assert "2 actors" in err and "3 failed" not in err and "2 failed" in err
    import pyarrow.parquet as pq

    assert pq.read_table(parquet).to_pylist() == [{k: v for k, v in e.items() if k not in ("run", "pipeline")}
                                                  for e in ours]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def actor_pids() -> list[int]:
    """The processes of the pool's actors on this machine (every node of the test cluster runs here)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and ACTOR_TITLE in (entry / "cmdline").read_text():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@requires_ray
def test_a_worker_killed_mid_job_loses_no_row_and_doubles_none(cluster, tmp_path):
    import ray

    from facemark.runtime.ray import landmarks_dataset

    folder = tmp_path / "photos"
    folder.mkdir()
    files = []
    for copy in range(8):
        for photo in sorted(SAMPLES.glob("*.jpg")):
            files.append(str(shutil.copy(photo, folder / f"{copy}-{photo.name}")))
    ds = landmarks_dataset(ray.data.from_items([{"path": f} for f in files]), actors=2, batch_size=2)
    earlier = set(actor_pids())  # an earlier job's actors may still be exiting
    rows, killed, after_kill = [], None, 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += batch.to_pylist()
        if killed is None:
            pids = [pid for pid in actor_pids() if pid not in earlier]
            assert len(pids) == 2, pids
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        else:
            after_kill += batch.num_rows
    assert killed is not None and after_kill > 0, "the kill came after the last row"
    assert sorted(row["path"] for row in rows) == sorted(files)  # every file once: none lost, none doubled
    assert not [row for row in rows if row["error"]]
    by_photo = {}
    for row in rows:  # the copies of one photo got the same faces, whichever actor (or its restart) ran them
        by_photo.setdefault(Path(row["path"]).name.split("-", 1)[1], []).append(row["faces"])
    assert all(all(faces == group[0] for faces in group) for group in by_photo.values())


def test_bench_section_without_the_extra_says_why(tmp_path):
    script = ("import json, sys; sys.modules['ray'] = None\n"
              "from facemark.benchmarks.ray_bench import ray_benchmark\n"
              "from facemark.benchmarks.report import ray_section\n"
              "section = ray_benchmark(None, [])\n"
              "print(json.dumps({'section': section, 'markdown': ray_section(section)}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert "pip install 'facemark[ray]'" in result["section"]["skipped"]
    assert any(line.startswith("Skipped: ") and "facemark[ray]" in line for line in result["markdown"])


@requires_ray
def test_bench_rows_time_the_job_against_the_local_runner(cluster):
    """With a connection open (the test cluster) the bench's jobs run on it; two jobs give the slope and the
    intercept."""
    from facemark.benchmarks.ray_bench import SMALL_JOB, ray_benchmark
    from facemark.benchmarks.report import ray_section

    files = sorted(SAMPLES.glob("*.jpg")) * 2
    section = ray_benchmark(None, files)
    local, job = section["rows"]
    assert (local["config"], job["config"]) == ("local", "ray") and local["images"] == job["images"] == len(files)
    assert job["faces"] == local["faces"] >= 40 and job["errors"] == local["errors"] == 0
    assert section["max_landmark_diff_px"] <= TOLERANCE_PX and section["face_count_mismatches"] == 0
    assert job["small_job_images"] == SMALL_JOB and job["small_job_s"] > 0
    # The slope needs the larger job to take longer; on a busy machine 12 vs 8 images may not: then no rate
    if job["small_job_s"] < job["seconds"]:
        assert job["steady_images_per_s"] > 0 and job["fixed_s"] == pytest.approx(
            job["seconds"] - len(files) / job["steady_images_per_s"])
    else:
        assert job["steady_images_per_s"] is None and job["fixed_s"] is None
    text = "\n".join(ray_section(section))
    assert any(line.startswith("| ray | 12 |") for line in text.splitlines())
    assert "cluster start" in text and "{" not in text  # every figure formatted
