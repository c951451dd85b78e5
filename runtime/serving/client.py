"""The client of `facemark serve` (tritonclient HTTP): `runtime predict --server URL` and TritonLandmarker.

The client waits up to `wait_s` for the server and its model to be ready (a server started together with it),
gives each request `timeout_s`, and once the server stops answering (refused, reset, timed out) sends nothing
more: the files not done fail with one reason instead of one timeout each.

Each file is read and decoded here too (the same facemark.imageio checks, so a bad file gets the same error
line as local predict, and the annotated picture is drawn on the same pixels); its encoded bytes go to the
server's `facemark` model, whose faces come back as facemark.runtime.serving.protocol packs them. Worker threads of
predict_files send requests concurrently, so the server's dynamic batching gathers them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from facemark.errors import FacemarkError, ImageError
from facemark.imageio import DEFAULT_MAX_FILE_BYTES, decode_image, read_image_bytes
from facemark.runtime.landmarker import Detections, Face
from facemark.runtime.predict.inputs import ImageResult
from facemark.runtime.predict.runner import LoadedFile
from facemark.runtime.serving.protocol import (
    ERROR,
    FACE_COUNT,
    FACE_OUTPUTS,
    IMAGE_INPUT,
    INFO_INPUT,
    INFO_MODEL,
    INFO_OUTPUT,
    PIPELINE_MODEL,
    PRESENT,
    serve_extra,
    unpack_image,
)

OUTPUT_NAMES = (*FACE_OUTPUTS, PRESENT, FACE_COUNT, ERROR)
DEFAULT_TIMEOUT_S = 30.0  # per request
DEFAULT_WAIT_S = 60.0  # for the server and its model to be ready


class ServerError(FacemarkError):
    """The server cannot be reached or refused a request."""


class ServerGone(ServerError):
    """The server stopped answering: refused, reset or timed out (as opposed to an error it answered with)."""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {lines[0][:300]}" if lines else exc.__class__.__name__


def _readiness(client) -> str | None:
    """None when the server and model `facemark` are ready, else why not."""
    try:
        if not client.is_server_ready():
            return "the server is up but not ready"
        if not client.is_model_ready(PIPELINE_MODEL):
            return f"the server is up but model '{PIPELINE_MODEL}' is not ready"
    except Exception as exc:  # tritonclient raises connection errors of several kinds
        return f"no facemark server answers ({_first_line(exc)})"
    return None


def wait_until_ready(client, url: str, wait_s: float, on_wait: Callable[[str], None] | None = None) -> None:
    """Poll readiness until it holds or `wait_s` has passed (then ServerError, one line); `on_wait` hears once
    that the wait began."""
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        why = _readiness(client)
        if why is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            waited = f" after waiting {wait_s:g} s (--wait)" if wait_s > 0 else ""
            raise ServerError(f"{url}: {why}{waited}")
        if not announced and on_wait is not None:
            on_wait(f"waiting up to {wait_s:g} s for the facemark server at {url} ({why})")
            announced = True
        time.sleep(min(0.5, left))


def _http_module():
    return serve_extra("tritonclient.http", "--server")


def server_address(url: str) -> str:
    """tritonclient wants host:port; users write http://host:port."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme != "http" or not parsed.hostname:
        raise ServerError(f"{url}: expected http://HOST:PORT (the server's HTTP endpoint)")
    return f"{parsed.hostname}:{parsed.port or 8000}"


class TritonLandmarker:
    """FaceLandmarker's results from a `facemark serve` server; one client per thread (tritonclient's HTTP
    client is not thread-safe).

    >>> remote = TritonLandmarker("http://127.0.0.1:8000")  # doctest: +SKIP
    >>> faces = remote.detect_file("photo.jpg")  # doctest: +SKIP
    """

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, wait_s: float = 0.0,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.url = url
        self.address = server_address(url)
        self.timeout_s = timeout_s
        self._local = threading.local()
        wait_until_ready(self._client(), url, wait_s, on_wait)
        try:
            self._header = self._fetch_header()
        except Exception as exc:
            raise ServerError(f"{url}: the server did not describe its model ({_first_line(exc)})") from None

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            http = _http_module()
            client = http.InferenceServerClient(self.address, connection_timeout=self.timeout_s,
                                                network_timeout=self.timeout_s)
            self._local.client = client
        return client

    def _fetch_header(self) -> dict:
        http = _http_module()
        request = http.InferInput(INFO_INPUT, [1], "BYTES")
        request.set_data_from_numpy(np.array([b""], dtype=np.object_))
        answer = self._client().infer(INFO_MODEL, [request])
        return json.loads(answer.as_numpy(INFO_OUTPUT).reshape(-1)[0])

    def describe(self) -> dict:
        """The server's model and detector: the header of predict's JSON document."""
        return self._header

    @property
    def providers(self) -> list[str]:
        return list(self._header["model"]["providers"])

    def detect_encoded(self, files: Sequence[bytes], image_sizes: Sequence[tuple[int, int]]
                       ) -> list[tuple[list[Face], str]]:
        """Faces and error text ("" if none) for encoded images, sent as one request."""
        http = _http_module()
        data = np.array([[bytes(f)] for f in files], dtype=np.object_)
        request = http.InferInput(IMAGE_INPUT, list(data.shape), "BYTES")
        request.set_data_from_numpy(data)
        wanted = [http.InferRequestedOutput(name, binary_data=True) for name in OUTPUT_NAMES]
        try:
            answer = self._client().infer(PIPELINE_MODEL, [request], outputs=wanted)
        except http.InferenceServerException as exc:  # the server answered with an error: this request failed
            raise ServerError(f"{self.url}: the server failed on it ({_first_line(exc)})") from None
        except Exception as exc:  # refused, reset, timed out: the server is gone
            self._local.client = None  # a fresh connection if it comes back
            raise ServerGone(f"{self.url}: the server stopped answering ({_first_line(exc)}; --timeout "
                             f"{self.timeout_s:g} s)") from None
        outputs = {name: answer.as_numpy(name) for name in OUTPUT_NAMES}
        return [unpack_image(outputs, i, size) for i, size in enumerate(image_sizes)]

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces of a BGR (or gray) image array: sent losslessly as PNG."""
        import cv2

        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise ImageError("cannot encode the image as PNG")
        faces, error = self.detect_encoded([encoded.tobytes()], [(image.shape[1], image.shape[0])])[0]
        if error:
            raise ServerError(f"{self.url}: {error}")
        return faces

    def detect_file(self, path: str | Path) -> list[Face]:
        data = read_image_bytes(path)
        image = decode_image(data, path)
        faces, error = self.detect_encoded([data], [(image.shape[1], image.shape[0])])[0]
        if error:
            raise ServerError(f"{path}: {error}")
        return faces

    def steps(self, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> RemoteSteps:
        return RemoteSteps(self, max_bytes)


class RemoteSteps:
    """predict_files' FileSteps over a server: each worker thread decodes its file (for the same errors and the
    picture) and sends it; the faces come back complete. Once the server is gone (`gone` holds why), files
    are not sent: they fail at once, and `not_done` names them."""

    def __init__(self, remote: TritonLandmarker, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.remote = remote
        self.max_bytes = max_bytes  # a larger file is refused by its size, never read (--max-file-mb)
        self.gone: str | None = None
        self.not_done: set[str] = set()
        self._lock = threading.Lock()

    def stopped(self) -> bool:
        return self.gone is not None

    def _not_done(self, path: Path, reason: str) -> LoadedFile:
        with self._lock:
            self.gone = self.gone or reason
            self.not_done.add(str(path))
        return LoadedFile(ImageResult(str(path), error=f"{path}: not done: {self.gone}"))

    def load(self, path: Path) -> LoadedFile:
        if self.gone is not None:
            return self._not_done(path, self.gone)
        start = time.perf_counter()
        try:
            data = read_image_bytes(path, self.max_bytes)  # read_image's checks, keeping the bytes to send
            image = decode_image(data, path)
        except (FacemarkError, OSError) as exc:
            return LoadedFile(ImageResult(str(path), error=str(exc)))
        result = ImageResult(str(path), image.shape[1], image.shape[0])
        try:
            faces, error = self.remote.detect_encoded([data], [(image.shape[1], image.shape[0])])[0]
        except ServerGone as exc:
            return self._not_done(path, str(exc))
        except ServerError as exc:
            result.error = f"{path}: {exc}"
            return LoadedFile(result, image)
        seconds = time.perf_counter() - start
        done = Detections(faces, {"detect": seconds * 1e3, "landmarks": 0.0}, [error] if error else [])
        return LoadedFile(result, image, done=done, seconds=seconds)

    def landmarks(self, group: Sequence[LoadedFile]) -> list[Detections | None]:
        return [item.done for item in group]

