"""Uploads decoded in worker processes, so a decoder that crashes or hangs on a hostile file costs that one
image, not the server: `facemark serve` decodes every upload through DecoderPool.

Each worker is a child process (`python -m facemark.runtime.decode_pool`: no fork of a threaded server, no
re-import of the caller's main module) running facemark.imageio.decode_image (the same checks and decoder guard as
local predict) on the bytes it is sent, one file at a time, over its own pipe. A worker that dies mid-file
(SIGSEGV inside a native decoder) or takes longer than the timeout is replaced; the file gets an ImageError.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from facemark.errors import ImageError
from facemark.imageio import DEFAULT_MAX_PIXELS, decode_image

DEFAULT_DECODE_TIMEOUT_S = 20.0


def _decode_loop(max_pixels: int) -> None:
    """A worker: (name, bytes) in on stdin, ("ok", array) or ("error", text) out on stdout, until stdin closes."""
    # Ctrl-C and `kill -TERM -- -PGID` (systemd's stop) reach the whole group: the server decides when to stop,
    # and closes stdin once its requests in flight are decoded
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    requests = Connection(os.dup(0), writable=False)
    answers = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # a native library printing to stdout must not corrupt the answers
    while True:
        try:
            name, data = requests.recv()
        except (EOFError, OSError):
            return
        try:
            answers.send(("ok", decode_image(data, name, max_pixels)))
        except ImageError as exc:
            answers.send(("error", str(exc)))


@dataclass
class _Worker:
    process: subprocess.Popen
    requests: Connection
    answers: Connection

    def close(self) -> None:
        self.requests.close()
        self.answers.close()


def _death(process: subprocess.Popen) -> str:
    try:
        code = process.wait(1.0)
    except subprocess.TimeoutExpired:
        return "no answer"
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


class DecoderPool:
    """`workers` decoding processes; `decode` blocks until one is free. Thread-safe.

    >>> with DecoderPool(2) as pool:  # doctest: +SKIP
    ...     image = pool.decode(data, "image 0 of the request")
    """

    def __init__(self, workers: int = 2, timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.workers = max(1, workers)
        self.timeout_s = timeout_s
        self.max_pixels = max_pixels
        self.replaced = 0  # workers lost to a crash or a hang
        self._closed = False
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        for _ in range(self.workers):
            self._idle.put(self._spawn())

    def _spawn(self) -> _Worker:
        # OpenCV's log off: a damaged file is this image's error line, not decoder chatter in the server's log
        process = subprocess.Popen([sys.executable, "-m", __name__, str(self.max_pixels)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, env={**os.environ, "OPENCV_LOG_LEVEL": "OFF"})
        worker = _Worker(process, Connection(os.dup(process.stdin.fileno()), readable=False),  # type: ignore[union-attr]
                         Connection(os.dup(process.stdout.fileno()), writable=False))  # type: ignore[union-attr]
        process.stdin.close()  # type: ignore[union-attr]
        process.stdout.close()  # type: ignore[union-attr]
        with self._lock:
            self._all.append(worker)
        return worker

    def _replace(self, worker: _Worker) -> _Worker:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()
        worker.close()
        with self._lock:
            if self._closed:  # shutting down: no new worker
                return worker
            self._all.remove(worker)
            self.replaced += 1
        return self._spawn()

    def decode(self, data: bytes, name: str) -> np.ndarray:
        """The image as decode_image returns it; ImageError for a bad file, a decoder crash or a hang."""
        worker = self._idle.get()
        try:
            worker.requests.send((name, data))
            if not worker.answers.poll(self.timeout_s):
                worker = self._replace(worker)
                raise ImageError(f"{name}: decoding took longer than {self.timeout_s:.0f} s; refused")
            kind, payload = worker.answers.recv()
        except (EOFError, OSError):
            reason = _death(worker.process)
            worker = self._replace(worker)
            raise ImageError(f"{name}: the decoder crashed on it ({reason}); the file is damaged") from None
        finally:
            self._idle.put(worker)
        if kind == "error":
            raise ImageError(payload)
        return payload

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for worker in workers:
            worker.close()  # the worker's recv ends: it returns
        for worker in workers:
            try:
                worker.process.wait(2.0)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    _decode_loop(int(sys.argv[1]))
