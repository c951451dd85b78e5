"""The MediaPipe peer row of `facemark bench` (benchmarks/mediapipe_peer.py): the 468 -> 68 map, face matching,
the skip reason, and -- where `make bench` has created MediaPipe's environment -- the real worker."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLES

from facemark.benchmarks import mediapipe_peer as mp_peer
from facemark.data import FaceRecord, load_records
from facemark.metrics import nme_per_face


def sample_records() -> list[FaceRecord]:
    return load_records([SAMPLES / "landmarks.xml"], lambda _m: None)


def test_the_map_fit_picks_each_points_nearest_vertex():
    records = sample_records()[:4]
    rng = np.random.default_rng(0)
    truth = rng.permutation(468)[:68]  # vertex truth[k] sits on iBUG point k (plus noise); the rest far away
    meshes = []
    for r in records:
        mesh = rng.uniform(-500, -400, (468, 2)).astype(np.float32)
        mesh[truth] = r.landmarks + rng.normal(0, 0.5, (68, 2))
        meshes.append(mesh)
    assert mp_peer.fit_index_map(meshes, records) == tuple(int(v) for v in truth)


def test_the_shipped_map_is_68_distinct_mesh_vertices():
    assert len(mp_peer.MESH_TO_IBUG68) == 68
    assert len(set(mp_peer.MESH_TO_IBUG68)) == 68 and all(0 <= v < 468 for v in mp_peer.MESH_TO_IBUG68)


def test_a_mesh_counts_only_when_it_overlaps_the_annotated_face():
    record = sample_records()[0]
    low, high = record.landmarks.min(axis=0), record.landmarks.max(axis=0)
    on_face = np.random.default_rng(0).uniform(low, high, (468, 2)).astype(np.float32)  # a mesh fills the face
    on_face[list(mp_peer.MESH_TO_IBUG68)] = record.landmarks
    elsewhere = on_face + 10_000
    assert mp_peer.matched_mesh([elsewhere.tolist()], record) is None
    assert np.allclose(mp_peer.matched_mesh([elsewhere.tolist(), on_face.tolist()], record), on_face)


def test_a_missing_environment_skips_the_row_with_the_command_that_makes_it(monkeypatch, tmp_path):
    monkeypatch.setenv("FACEMARK_MEDIAPIPE_PYTHON", str(tmp_path / "nowhere" / "python"))
    doc = mp_peer.mediapipe_document(sample_records(), cores=1)
    assert "nowhere" in doc["skipped"] and "make bench" in doc["skipped"]


@pytest.mark.skipif(isinstance(mp_peer.find_mediapipe_python(), str),
                    reason="MediaPipe's environment is absent: `make bench` creates .venv-mediapipe")
def test_face_mesh_worker_finds_the_sample_faces_and_maps_them_to_68_points():
    records = sample_records()[:3]
    out = mp_peer.run_worker(mp_peer.find_mediapipe_python(), "faces", records, cores=1)
    for result, record in zip(out["results"], records, strict=True):
        mesh = mp_peer.matched_mesh(result["faces"], record)
        assert mesh is not None and mesh.shape == (468, 2)
        assert nme_per_face(mp_peer.to_ibug68(mesh), record.landmarks)[0] < 0.15
