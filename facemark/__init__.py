"""facemark: 68-point face landmarks from training to deployment.

`from facemark import FaceLandmarker` gives the torch-free runtime (imported on first use).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["FaceLandmarker", "Face", "__version__"]


def __getattr__(name: str):
    if name in ("FaceLandmarker", "Face"):
        from facemark import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'facemark' has no attribute {name!r}")
