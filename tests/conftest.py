"""Shared fixtures. Data tests use ../shared/data and skip with a reason when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DATA_300W = SHARED_DATA / "300w"
DLIB_EXAMPLES = SHARED_DATA / "dlib-examples"
SAMPLES = REPO / "facemark" / "assets" / "samples"

requires_300w = pytest.mark.skipif(not DATA_300W.is_dir(), reason=f"{DATA_300W} absent (../shared not beside the repo)")
requires_dlib_examples = pytest.mark.skipif(
    not DLIB_EXAMPLES.is_dir(), reason=f"{DLIB_EXAMPLES} absent (../shared not beside the repo)"
)

TINY_SIZE = 64  # small crops keep the tests fast; the weights are a full ResNet18 all the same
GUARDED_LIMIT_MB = 2  # --max-request-mb of the servers the limit tests start
GUARDED_LIMIT_BYTES = GUARDED_LIMIT_MB * 1_000_000 + 1_000_000  # and the allowance the HTTP and gRPC guards share


def guarded_server(tmp_path_factory, name: str):
    """A `facemark serve` on loopback with small limits (GUARDED_LIMIT_MB, 4 images, grace 5 s), its log in a
    folder of its own; the serve extra or a skip."""
    pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install 'facemark[serve]')")
    from facemark.benchmarks.serve_load import ServerProcess

    return ServerProcess(["--max-batch-size", "8", "--max-images", "4", "--max-request-mb", str(GUARDED_LIMIT_MB),
                          "--grace", "5"], log=tmp_path_factory.mktemp(name) / "serve.log")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised checkpoint at 64 px in the real checkpoint format."""
    torch = pytest.importorskip("torch")
    from facemark.contract import CropContract
    from facemark.train.checkpoint import save_checkpoint
    from facemark.train.model import LandmarkNet

    torch.manual_seed(0)
    model = LandmarkNet(image_size=TINY_SIZE).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, CropContract(size=TINY_SIZE), {"data": ["synthetic"], "seed": 0},
                    {"epoch": 0, "val_nme": None})
    return path
