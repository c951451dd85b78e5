"""The environment block: what machine and software produced the figures (so reports can be compared)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

# The CPU features that decide which kernels torch / ONNX Runtime can use for fp32, bf16 and int8.
INTERESTING_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                     "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> dict:
    """CPU model name and the relevant instruction-set flags (Linux /proc/cpuinfo; platform elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {"model": model, "flags": [f for f in INTERESTING_FLAGS if f in flags], "logical_cores": os.cpu_count()}


def gpu_description() -> list[str]:
    """Names of the NVIDIA GPUs nvidia-smi reports (empty when there is none)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def software_versions() -> dict:
    import cv2
    import numpy
    import onnxruntime

    import facemark

    torch = _torch()
    versions = {"python": platform.python_version(), "facemark": facemark.__version__,
                "torch": torch.__version__ if torch else "not installed",
                "onnxruntime": onnxruntime.__version__, "opencv": cv2.__version__, "numpy": numpy.__version__}
    try:
        import dlib

        versions["dlib"] = dlib.__version__
    except ImportError:
        pass
    return versions


def _torch():
    """torch when installed (the ONNX-only benchmark runs without it)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def describe_environment(threads: int, model_hashes: dict[str, str]) -> dict:
    import onnxruntime

    torch = _torch()
    return {
        "cpu": cpu_description(),
        "gpu": gpu_description(),
        "os": platform.platform(),
        "threads": threads,
        "torch_threads": torch.get_num_threads() if torch else None,
        "versions": software_versions(),
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "model_sha256": model_hashes,
    }
