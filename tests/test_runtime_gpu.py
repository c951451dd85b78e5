"""GPU execution providers (CUDA, TensorRT): skipped where they do not load, e.g. on CI.

On a GPU machine: `.venv/bin/pytest -q tests/test_runtime_gpu.py` checks that each provider really runs the
session (no silent CPU fallback), agrees with the CPU within fp32 / fp16 tolerances, takes batches beyond the
TensorRT profile, and writes its engine cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SIZE
from test_runtime import export_tiny_onnx

from facemark.runtime import session

LOADABLE = session.available_providers()
needs_cuda = pytest.mark.skipif(session.CUDA not in LOADABLE, reason="CUDAExecutionProvider does not load here")
needs_tensorrt = pytest.mark.skipif(session.TENSORRT not in LOADABLE,
                                    reason="TensorrtExecutionProvider does not load here")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_tiny_onnx(tiny_checkpoint, tmp_path_factory.getbasetemp() / "runtime-models" / "tiny.onnx")


@pytest.fixture(scope="module")
def batch_and_cpu(tiny_onnx) -> tuple[np.ndarray, np.ndarray]:
    batch = np.random.default_rng(0).uniform(-1, 1, (5, 1, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    return batch, session.LandmarkModel(tiny_onnx, provider="cpu").predict(batch)


@needs_cuda
def test_cuda_runs_the_session_and_matches_cpu(tiny_onnx, batch_and_cpu):
    batch, reference = batch_and_cpu
    model = session.LandmarkModel(tiny_onnx, provider="cuda")
    assert model.providers[0] == session.CUDA
    np.testing.assert_allclose(model.predict(batch), reference, atol=2e-3)


@needs_tensorrt
def test_tensorrt_fp16_with_engine_cache_and_batch_profile(tiny_onnx, batch_and_cpu, tmp_path):
    batch, reference = batch_and_cpu
    model = session.LandmarkModel(tiny_onnx, provider="tensorrt", trt_fp16=True, trt_cache_dir=tmp_path, max_batch=4)
    assert model.providers[0] == session.TENSORRT
    np.testing.assert_allclose(model.predict(batch), reference, atol=2e-2)  # 5 > max_batch 4: two runs
    assert any(tmp_path.iterdir()), "TensorRT wrote no engine cache"


@needs_cuda
def test_auto_prefers_a_gpu_provider(tiny_onnx):
    assert session.LandmarkModel(tiny_onnx).providers[0] in (session.TENSORRT, session.CUDA)
