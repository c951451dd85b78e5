"""Image reading with the checks a batch needs: one clear `ImageError` per bad file, never a crash."""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from facemark.errors import ImageError
from facemark.fileio import write_with_atomic

# The one list of readable extensions (any case): file mode, folder scanning and .pts image lookup use it.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pbm", ".gif")
# 8K x 8K: anything bigger is refused before decoding, so a hostile file cannot exhaust memory.
DEFAULT_MAX_PIXELS = 64_000_000

Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit with a clear message


def probe_size(source: Path | io.BytesIO, name: object = None) -> tuple[int, int]:
    """(width, height) from the header alone (Pillow reads it lazily, nothing is decoded); `source` is a path
    or the encoded bytes in a BytesIO, `name` what error messages call it (default: the path)."""
    try:
        with Image.open(source) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name or source}: not a readable image ({exc.__class__.__name__})") from None


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as 8-bit BGR (H, W, 3): decode_image on its bytes, errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such file")
    return decode_image(p.read_bytes(), p, max_pixels)


def decode_image(data: bytes, name: object, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image (the bytes of a file; `name` for error messages) as 8-bit BGR (H, W, 3).

    Grayscale, 16-bit and RGBA inputs are converted; EXIF orientation is applied (OpenCV's IMREAD_COLOR).
    The server decodes a client's upload with this, so both sides read a file the same way.
    """
    if len(data) == 0:
        raise ImageError(f"{name}: empty file")
    width, height = probe_size(io.BytesIO(data), name)
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} is larger than the limit of {max_pixels / 1e6:.0f} megapixels; "
            "downscale it first"
        )
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        image = _decode_with_pillow(data)  # formats this OpenCV build lacks (GIF, some PNM variants)
    if image is None or image.size == 0:
        raise ImageError(f"{name}: corrupt or unsupported image data")
    return image


def _decode_with_pillow(data: bytes) -> np.ndarray | None:
    """First frame, EXIF-rotated, as 8-bit BGR; None when Pillow cannot decode it either."""
    from PIL import ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def to_gray(image: np.ndarray) -> np.ndarray:
    """BGR / BGRA / gray arrays, uint8 or 16-bit, -> 2-D uint8 gray (what the detector and crops use)."""
    if image is None:
        raise ImageError("expected an image array, got None: did cv2.imread fail to read the file?")
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected a numpy image array (H, W[, C]) in BGR order, got {type(image).__name__}; "
                         "read files with facemark.imageio.read_image or cv2.imread")
    a = image
    if a.size == 0:
        raise ImageError(f"expected a non-empty image, got an array of shape {a.shape}")
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    if a.dtype != np.uint8:
        raise ImageError(f"expected a uint8 (or uint16) image array, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return a
    if a.ndim == 3 and a.shape[2] == 3:
        return cv2.cvtColor(a, cv2.COLOR_BGR2GRAY)
    if a.ndim == 3 and a.shape[2] == 4:
        return cv2.cvtColor(a, cv2.COLOR_BGRA2GRAY)
    raise ImageError(f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")


COLOR_ORDERS = ("bgr", "rgb", "gray")


def image_to_gray(image, color: str = "bgr") -> np.ndarray:
    """What `FaceLandmarker.detect` accepts -> 2-D uint8 gray.

    - a numpy array in `color` order: "bgr" (cv2.imread's, the default), "rgb" (PIL, matplotlib, imageio) or
      "gray"; 16-bit and BGRA/RGBA arrays are converted;
    - a PIL image: converted by its own mode (EXIF orientation is the caller's: PIL does not apply it);
    - a str or Path: read from disk with `read_image` (EXIF orientation honoured).
    """
    if color not in COLOR_ORDERS:
        raise ImageError(f"color {color!r}: expected one of {', '.join(COLOR_ORDERS)}")
    if isinstance(image, (str, os.PathLike)):
        return read_gray(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"))
    if color == "rgb" and isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] in (3, 4):
        a = (image >> 8).astype(np.uint8) if image.dtype == np.uint16 else image
        code = cv2.COLOR_RGB2GRAY if image.shape[2] == 3 else cv2.COLOR_RGBA2GRAY
        if a.dtype == np.uint8:
            return cv2.cvtColor(a, code)
    if color == "gray" and isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] != 1:
        raise ImageError(f"color='gray' expects an (H, W) or (H, W, 1) array, got shape {image.shape}")
    return to_gray(image)


def read_gray(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    return to_gray(read_image(path, max_pixels))


def write_image(path: str | os.PathLike, image: np.ndarray, jpeg_quality: int = 92) -> None:
    """Encode by the extension of `path` and write atomically."""
    target = Path(path)
    ext = target.suffix.lower() or ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:
        raise ImageError(f"{target}: could not encode image as {ext}")
    write_with_atomic(target, lambda tmp: tmp.write_bytes(buf.tobytes()))
