"""Image reading with the checks a batch needs: one clear `ImageError` per bad file, never a crash."""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from facemark.errors import ImageError
from facemark.fileio import DEFAULT_MAX_FILE_MB, write_with_atomic

# The one list of readable extensions (any case): file mode, folder scanning and .pts image lookup use it.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pbm", ".gif")
# 8K x 8K: anything bigger is refused before decoding, so a hostile file cannot exhaust memory.
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_FILE_BYTES = int(DEFAULT_MAX_FILE_MB * 1e6)
# A JPEG's size marker comes within this many bytes (its APP segments are 64 KB each); Pillow would scan a
# damaged file's zeros byte by byte for it (3 s per 50 MB), so the header of a JPEG is probed on this head.
JPEG_HEADER_BYTES = 4 << 20
# A file is sniffed on its first bytes before it is read whole: one whose head names no image format (by
# magic, or one Pillow identifies) is refused without reading the rest.
SNIFF_BYTES = 1 << 20

Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit with a clear message


def probe_size(source: Path | io.BytesIO, name: object = None) -> tuple[int, int]:
    """(width, height) from the header alone (Pillow reads it lazily, nothing is decoded); `source` is a path
    or the encoded bytes in a BytesIO, `name` what error messages call it (default: the path)."""
    try:
        with Image.open(source) as im:
            return im.size
    except Exception as exc:  # noqa: BLE001  Pillow's parsers raise many kinds on damaged headers
        raise ImageError(f"{name or source}: not a readable image ({exc.__class__.__name__})") from None


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> np.ndarray:
    """Read an image file as 8-bit BGR (H, W, 3): decode_image on its bytes, errors naming the file."""
    return decode_image(read_image_bytes(path, max_bytes), os.fspath(path), max_pixels)


# scheme:// at the start of a name: a URL (https://, rtsp://, s3://), which a path cannot stand for.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(name: str | os.PathLike) -> bool:
    return isinstance(name, str) and bool(_URL.match(name))


def url_error(name: str) -> str:
    """The one line for a URL given where a local file is expected (the name kept whole: Path() would make
    https://host/a.jpg https:/host/a.jpg)."""
    return f"{name}: a URL; facemark reads local files only (download it first)"


# Why a file cannot be read, in words, for the errors whose system text says little.
_OPEN_REASONS = {errno.ELOOP: "a symlink loop", errno.ENXIO: "not a regular file (a socket or a device)",
                 errno.ENOENT: "no such file", errno.ENOTDIR: "no such file (a part of its path is not a folder)"}


def _reason(exc: OSError) -> str:
    return _OPEN_REASONS.get(exc.errno or 0) or (exc.strerror or exc.__class__.__name__).lower()


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def read_image_bytes(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of an image file, or one ImageError naming it and the real reason: any OSError (EIO, EACCES,
    EINVAL, ELOOP, ...), not a regular file (a folder, FIFO, device: opened without blocking), empty, or larger
    than `max_bytes` (told by its size before reading, and never read past, for files that report no size)."""
    name = os.fspath(path)  # as given: Path() would turn a URL's // into /
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT and is_url(name):
            raise ImageError(url_error(name)) from None
        raise ImageError(f"{name}: cannot read ({_reason(exc)})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(f"{name}: not a regular file ({_file_kind(mode)})")
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise _too_large(f"{name}: {_megabytes(size)} is larger than the limit of {_megabytes(max_bytes)}")
        head = _read_up_to(fd, min(SNIFF_BYTES, max_bytes + 1))
        if len(head) == SNIFF_BYTES and not _may_be_image(head):  # more follows: not read for nothing
            raise ImageError(f"{name}: not an image (its first bytes name no image format)")
        data = head + _read_up_to(fd, max_bytes + 1 - len(head)) if len(head) == SNIFF_BYTES else head
    except OSError as exc:
        raise ImageError(f"{name}: cannot read ({_reason(exc)})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # a file that reports no size (/proc) and goes on
        raise _too_large(f"{name}: larger than the limit of {_megabytes(max_bytes)}")
    return data


def _too_large(message: str) -> ImageError:
    """The size refusal: Python's caller set `max_bytes`, the command line's --max-file-mb (cli_message)."""
    return ImageError(f"{message} (read_image's max_bytes)", cli=f"{message} (--max-file-mb)")


def _read_up_to(fd: int, count: int) -> bytes:
    """At most `count` bytes from `fd` (fewer at its end)."""
    chunks, total = [], 0
    while total < count:
        chunk = os.read(fd, min(1 << 22, count - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _may_be_image(head: bytes) -> bool:
    """Whether the first bytes of a file name an image format (by magic, or one Pillow identifies)."""
    if sniff_format(head) != "other":
        return True
    try:
        with Image.open(io.BytesIO(head)):
            return True
    except UnidentifiedImageError:
        return False
    except Exception:  # noqa: BLE001  a format Pillow knows, whose header runs past the head: read it whole
        return True


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.4g} MB"


# The container formats recognised by their first bytes, and the decoder each one goes to. OpenCV gets only
# the formats whose decoders survive damaged input (libjpeg-turbo, libpng, libwebp, libtiff and OpenCV's own
# BMP/PNM readers: the fuzz test in tests/test_safety.py); OpenCV 4.11's OpenJPEG path corrupts memory on a
# damaged JPEG 2000 file and kills the process, so JPEG 2000, like every format not listed, goes to Pillow.
OPENCV_FORMATS = ("jpeg", "png", "webp", "tiff", "bmp", "pnm")
_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),  # JP2 container
    (b"\xff\x4f\xff\x51", "jpeg2000"),  # raw J2K codestream
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)


def sniff_format(data: bytes) -> str:
    """The image format named by the first bytes of `data` (not by any file name): jpeg, png, webp, tiff,
    jpeg2000, gif, bmp, pnm, or "other" (Pillow decides whether it can read it)."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "pnm"
    return "other"


def decoder_for(data: bytes) -> str:
    """"opencv" or "pillow": the decoder that `decode_image` trusts with these bytes."""
    return "opencv" if sniff_format(data) in OPENCV_FORMATS else "pillow"


def decode_image(data: bytes, name: object, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image (the bytes of a file; `name` for error messages) as 8-bit BGR (H, W, 3).

    Grayscale, 16-bit and RGBA inputs are converted; EXIF orientation is applied (OpenCV's IMREAD_COLOR).
    The format is told by the bytes, and each format goes only to a decoder that survives damaged input of it
    (see OPENCV_FORMATS), so no file can end the process. Local predict and the server's uploads both decode
    with this, so both sides read a file the same way.
    """
    if len(data) == 0:
        raise ImageError(f"{name}: empty file")
    head = data[:JPEG_HEADER_BYTES] if sniff_format(data[:16]) == "jpeg" else data
    width, height = probe_size(io.BytesIO(head), name)
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} is larger than the limit of {max_pixels / 1e6:.0f} megapixels; "
            "downscale it first"
        )
    image = None
    if decoder_for(data) == "opencv":
        try:
            image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:
            image = None
    if image is None or image.size == 0:
        image = _decode_with_pillow(data)  # the other formats, and variants this OpenCV build lacks (some PNM)
    if image is None or image.size == 0:
        raise ImageError(f"{name}: corrupt or unsupported image data")
    return image


def _decode_with_pillow(data: bytes) -> np.ndarray | None:
    """First frame, EXIF-rotated, as 8-bit BGR; None when Pillow cannot decode it either."""
    from PIL import ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except Exception:  # noqa: BLE001  damaged data raises OSError, SyntaxError, EOFError, struct.error, ...
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


def color_order(color: str) -> str:
    """`color` as one of COLOR_ORDERS, any case ("RGB" is "rgb"); ImageError for another."""
    key = color.lower() if isinstance(color, str) else color
    if key not in COLOR_ORDERS:
        raise ImageError(f"color {color!r}: expected one of {', '.join(COLOR_ORDERS)} (any case)")
    return key


def image_to_gray(image, color: str = "bgr") -> np.ndarray:
    """What `FaceLandmarker.detect` accepts -> 2-D uint8 gray.

    - a numpy array in `color` order: "bgr" (cv2.imread's, the default), "rgb" (PIL, matplotlib, imageio) or
      "gray"; 16-bit and BGRA/RGBA arrays are converted;
    - a PIL image: converted by its own mode (EXIF orientation is the caller's: PIL does not apply it);
    - a str or Path: read from disk with `read_image` (EXIF orientation honoured).
    """
    color = color_order(color)
    if isinstance(image, (str, os.PathLike)):
        return read_gray(image)
    if isinstance(image, Image.Image):
        return _pil_pixels(image, "L")
    if color == "rgb" and isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] in (3, 4):
        a = (image >> 8).astype(np.uint8) if image.dtype == np.uint16 else image
        code = cv2.COLOR_RGB2GRAY if image.shape[2] == 3 else cv2.COLOR_RGBA2GRAY
        if a.dtype == np.uint8:
            return cv2.cvtColor(a, code)
    if color == "gray" and isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] != 1:
        raise ImageError(f"color='gray' expects an (H, W) or (H, W, 1) array, got shape {image.shape}")
    return to_gray(image)


# Pillow modes whose pixels exceed 8 bits: convert("L") would clamp them (a 16-bit photo turns white).
WIDE_PIL_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _pil_pixels(image: Image.Image, mode: str) -> np.ndarray:
    """A PIL image as a uint8 array in `mode` ("L" or "RGB"); 16-bit, 32-bit integer and float images (one
    channel) are scaled to 8 bits as a 16-bit file read by path is (the top byte), not clamped: integers by
    their 16-bit range, floats by [0, 1] when they lie in it, else as 8-bit values (above 255: a 16-bit range)."""
    if image.mode not in WIDE_PIL_MODES:
        return np.asarray(image.convert(mode))
    values = np.nan_to_num(np.asarray(image).astype(np.float64))
    top = float(values.max()) if values.size else 0.0
    if image.mode == "F" and top <= 1.0:
        scaled = values * 255.0
    elif image.mode == "F" and top <= 255.0:
        scaled = values
    else:
        scaled = values / 256.0
    return np.clip(np.floor(scaled), 0, 255).astype(np.uint8)


_TO_BGR = {("bgr", 3): None, ("bgr", 4): cv2.COLOR_BGRA2BGR, ("rgb", 3): cv2.COLOR_RGB2BGR,
           ("rgb", 4): cv2.COLOR_RGBA2BGR}


def image_to_gray_and_bgr(image, color: str = "bgr") -> tuple[np.ndarray, np.ndarray]:
    """`image_to_gray` and the image as uint8 BGR for detectors that use colour (the gray array itself when
    the image has none). Accepts what `image_to_gray` accepts; a file is read once."""
    color = color_order(color)
    if isinstance(image, (str, os.PathLike)):
        image, color = read_image(image), "bgr"
    elif isinstance(image, Image.Image):
        image = _pil_pixels(image, "RGB")
        color = "rgb" if image.ndim == 3 else "gray"
    gray = image_to_gray(image, color)
    if color == "gray" or image.ndim != 3 or image.shape[2] not in (3, 4):
        return gray, gray
    pixels = (image >> 8).astype(np.uint8) if image.dtype == np.uint16 else image
    code = _TO_BGR[(color, image.shape[2])]
    return gray, pixels if code is None else cv2.cvtColor(pixels, code)


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
