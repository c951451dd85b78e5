"""The client of `facemark serve` (tritonclient HTTP): `runtime predict --server URL` and TritonLandmarker.

Each file is read and decoded here too (the same facemark.imageio checks, so a bad file gets the same error
line as local predict, and the annotated picture is drawn on the same pixels); its encoded bytes go to the
server's `facemark` model, whose faces come back as facemark.runtime.serving packs them. Worker threads of
predict_files send requests concurrently, so the server's dynamic batching gathers them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from facemark.errors import FacemarkError, ImageError
from facemark.imageio import decode_image
from facemark.runtime.landmarker import Detections, Face
from facemark.runtime.predict import ImageResult, LoadedFile
from facemark.runtime.serving import (
    ERROR,
    FACE_COUNT,
    FACE_OUTPUTS,
    IMAGE_INPUT,
    INFO_INPUT,
    INFO_MODEL,
    INFO_OUTPUT,
    PIPELINE_MODEL,
    serve_extra,
    unpack_image,
)

OUTPUT_NAMES = (*FACE_OUTPUTS, FACE_COUNT, ERROR)
DEFAULT_TIMEOUT_S = 60.0


class ServerError(FacemarkError):
    """The server cannot be reached or refused a request."""


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

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url
        self.address = server_address(url)
        self.timeout_s = timeout_s
        self._local = threading.local()
        client = self._client()
        try:
            ready = client.is_server_ready() and client.is_model_ready(PIPELINE_MODEL)
        except Exception as exc:  # tritonclient raises connection errors of several kinds
            raise ServerError(f"{url}: no facemark server answers ({exc.__class__.__name__}: {exc})") from None
        if not ready:
            raise ServerError(f"{url}: the server is up but model '{PIPELINE_MODEL}' is not ready")
        self._header = self._fetch_header()

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
        except Exception as exc:  # InferenceServerException, connection errors: one line, not the server's traceback
            lines = str(exc).strip().splitlines() or [exc.__class__.__name__]
            raise ServerError(f"{self.url}: the server failed on it ({lines[0][:300]})") from None
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
        data = Path(path).read_bytes()
        image = decode_image(data, path)
        faces, error = self.detect_encoded([data], [(image.shape[1], image.shape[0])])[0]
        if error:
            raise ServerError(f"{path}: {error}")
        return faces

    def steps(self) -> RemoteSteps:
        return RemoteSteps(self)


class RemoteSteps:
    """predict_files' FileSteps over a server: each worker thread decodes its file (for the same errors and the
    picture) and sends it; the faces come back complete."""

    def __init__(self, remote: TritonLandmarker) -> None:
        self.remote = remote

    def load(self, path: Path) -> LoadedFile:
        start = time.perf_counter()
        try:
            if not path.is_file():  # facemark.imageio.read_image's checks, keeping the bytes to send
                raise ImageError(f"{path}: no such file")
            data = path.read_bytes()
            image = decode_image(data, path)
        except (FacemarkError, OSError) as exc:
            return LoadedFile(ImageResult(str(path), error=str(exc)))
        result = ImageResult(str(path), image.shape[1], image.shape[0])
        try:
            faces, error = self.remote.detect_encoded([data], [(image.shape[1], image.shape[0])])[0]
        except ServerError as exc:
            result.error = f"{path}: {exc}"
            return LoadedFile(result, image)
        seconds = time.perf_counter() - start
        done = Detections(faces, {"detect": seconds * 1e3, "landmarks": 0.0}, [error] if error else [])
        return LoadedFile(result, image, done=done, seconds=seconds)

    def landmarks(self, group: Sequence[LoadedFile]) -> list[Detections | None]:
        return [item.done for item in group]

