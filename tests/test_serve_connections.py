"""Connection floods against `facemark serve`'s guards: idle connections are closed to make room (the one idle the
longest first), connections beyond the cap while every one has a request in flight are turned away (HTTP: 503)
with one log line per interval, and a flood of thousands leaves the real server up and answering."""

from __future__ import annotations

import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import SAMPLES, guarded_server

from facemark.runtime.serving.guard import (
    FDS_KEPT,
    MAX_CONNECTIONS,
    HttpGuard,
    RepeatFilter,
    connection_limit,
    raise_open_files_limit,
)
from facemark.runtime.serving.server import free_loopback_port

CAP = 4
FLOOD = 3000  # per port: more than a guard holds (MAX_CONNECTIONS)
RELEASE = threading.Event()


class _Upstream(BaseHTTPRequestHandler):
    """A real HTTP server behind the guard: /slow answers once RELEASE is set, anything else at once."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/slow":
            RELEASE.wait(30)
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def guard():
    RELEASE.clear()
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    started = HttpGuard("127.0.0.1", free_loopback_port(), upstream.server_address[1], 1_000_000, max_connections=CAP)
    started.start()
    yield started
    RELEASE.set()
    started.stop()
    upstream.shutdown()


def _connect(guard: HttpGuard) -> socket.socket:
    return socket.create_connection(("127.0.0.1", guard.port), timeout=10)


def _get(sock: socket.socket, path: str) -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def _reply(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
        if b"\r\n\r\n" in b"".join(chunks) and b"".join(chunks).endswith((b"ok", b"}")):
            break
    return b"".join(chunks)


def _wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_an_idle_connection_is_closed_to_make_room_the_oldest_first(guard):
    idle = [_connect(guard) for _ in range(CAP)]  # keep-alive clients that send nothing (or a slowloris)
    assert _wait_for(lambda: len(guard._connections) == CAP)
    newcomer = _connect(guard)
    _get(newcomer, "/fast")
    assert _reply(newcomer).startswith(b"HTTP/1.1 200")
    assert idle[0].recv(1) == b""  # the one idle the longest was closed
    assert guard.reaped == 1 and guard.overloaded == 0
    for sock in (*idle, newcomer):
        sock.close()


def test_beyond_the_cap_with_every_connection_busy_a_new_one_gets_503_and_the_busy_ones_their_answers(guard, caplog):
    busy = [_connect(guard) for _ in range(CAP)]
    for sock in busy:
        _get(sock, "/slow")
    assert _wait_for(lambda: len(guard._connections) == CAP and all(c.busy() for c in guard._connections))
    with caplog.at_level(logging.WARNING, logger="facemark.serve"):
        turned = [_connect(guard) for _ in range(5)]
        answers = [_reply(sock) for sock in turned]
    assert all(a.startswith(b"HTTP/1.1 503") and b"too many connections" in a for a in answers), answers
    assert guard.overloaded == 5 and guard.reaped == 0
    assert len([r for r in caplog.records if "turned away" in r.getMessage()]) == 1  # one line, not one each
    RELEASE.set()
    assert all(_reply(sock).startswith(b"HTTP/1.1 200") for sock in busy)
    for sock in (*busy, *turned):
        sock.close()


def test_the_connection_cap_follows_the_open_files_limit():
    assert connection_limit(1024) == (1024 - FDS_KEPT) // 8  # a shell's default: about 100 per guard
    assert connection_limit(1_000_000) == MAX_CONNECTIONS
    assert connection_limit(100) == 8  # never none
    assert raise_open_files_limit() >= 1024


def test_a_repeated_log_message_passes_once_per_interval():
    repeats = RepeatFilter(seconds=60)
    records = [logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource",
                                 None, None) for _ in range(1000)]
    assert sum(repeats.filter(r) for r in records) == 1
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "another message", None, None)
    assert repeats.filter(other)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = guarded_server(tmp_path_factory, "connections")
    yield started
    started.stop()


def test_thousands_of_idle_connections_leave_the_server_up_and_answering(server):
    """FLOOD connections that send nothing to each public port (more than the guards hold): the server stays up,
    answers a good request on both protocols, and logs a handful of lines, not one per connection."""
    from test_serve_grpc_limit import _client, _faces

    from facemark.runtime.serving.client import TritonLandmarker

    photo = SAMPLES / "2008_002470.jpg"
    before = server.log.read_text().count("\n")
    flood = [socket.create_connection(("127.0.0.1", port), timeout=10)
             for port in (server.http, server.grpc) for _ in range(FLOOD)]
    time.sleep(2)
    assert server.proc.poll() is None
    assert len(TritonLandmarker(server.url).detect_file(photo)) == 6  # HTTP, while flooded
    assert _faces(_client(server)) == 6  # gRPC
    for sock in flood:
        sock.close()
    time.sleep(1)
    assert server.proc.poll() is None and len(TritonLandmarker(server.url).detect_file(photo)) == 6
    assert server.log.read_text().count("\n") - before < 20, server.log.read_text()[-2000:]
