"""The HTTP front of `facemark serve`: request heads are checked before Triton sees a byte of them.

tritonserver 2.51 (the one PyTriton 0.7.0, the latest release, carries) has no option that limits an HTTP
body, and its HTTP library (libevhtp) reads a body sent as `application/x-www-form-urlencoded` into two stack
arrays of the body's size to parse it as query arguments: above ~4 MB (on an 8 MiB thread stack) tritonserver
dies of SIGSEGV, whatever the body holds. So Triton's HTTP endpoint listens on a private loopback port and this
guard takes the public one; per request, from its head alone:
- a body over request_limit_bytes (--max-request-mb and 1 MB; Content-Length) is refused with 413 before any of
  it is read;
- a body without Content-Length (chunked) is refused with 411;
- a head over 64 KiB is refused with 431, one that does not parse with 400;
- a Content-Type of application/x-www-form-urlencoded is dropped (Triton reads a KServe body as JSON or binary
  tensors whatever its type; that type only triggers the parse above).
Everything else (the head, then exactly Content-Length bytes of body, then the next request) is passed on over
one Triton connection per client connection, and Triton's replies are copied back one by one, so the guard also
knows which requests are in flight: the drain closes idle keep-alive connections and counts the requests left
unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

LOGGER = logging.getLogger("facemark.serve")
HEAD_LIMIT = 64 * 1024
CHUNK = 256 * 1024
IDLE_CLOSE_S = 1.0
MAX_CONNECTIONS = 1000  # per guard, at most (connection_limit: fewer when file descriptors are short)
FDS_PER_CONNECTION = 4  # the client's socket and Triton's here, and Triton's end of its own
FDS_KEPT = 256  # for everything else of facemark serve: model files, decoder pipes, Triton's own sockets
OPEN_FILES_WANTED = 65536
OVERLOAD_LOG_S = 10.0  # at most one "too many connections" line per guard in this many seconds
FORM_TYPE = b"application/x-www-form-urlencoded"


def _reply(status: str, message: str) -> bytes:
    body = ('{"error":"' + message.replace('"', "'") + '"}').encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def check_head(head: bytes, max_body_bytes: int) -> tuple[bytes, int] | bytes:
    """(the head to pass on, its body's length), or the reply refusing it."""
    lines = head.split(b"\r\n")
    if len(lines[0].split(b" ")) != 3:
        return _reply("400 Bad Request", "the request line does not parse")
    kept, length = [lines[0]], None
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():  # RFC 9112: no space before the colon, or 400
            return _reply("400 Bad Request", "a header line does not parse")
        key, value = name.lower(), value.strip()
        if key == b"transfer-encoding":
            return _reply("411 Length Required", "send the body with a Content-Length, not chunked")
        if key == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                return _reply("400 Bad Request", "Content-Length is not one whole number")
            length = int(value)
        if key == b"content-type" and value.lower().startswith(FORM_TYPE):
            continue  # see the module docstring: the one type that makes Triton parse the body as a query
        kept.append(line)
    length = length or 0
    if length > max_body_bytes:
        return _reply("413 Content Too Large", f"the body holds {length} bytes, the limit is {max_body_bytes} "
                      "(--max-request-mb and 1 MB for the request's JSON header)")
    return b"\r\n".join(kept) + b"\r\n\r\n", length


REQUEST_ALLOWANCE_BYTES = 1_000_000  # beyond --max-request-mb: an HTTP body's JSON header, a gRPC message's fields


def request_limit_bytes(max_request_mb: float) -> int:
    """The largest HTTP body or gRPC message a guard passes on: --max-request-mb of images and the allowance."""
    return int(max_request_mb * 1e6) + REQUEST_ALLOWANCE_BYTES


class RepeatFilter(logging.Filter):
    """Lets a message through at most once per `seconds` (asyncio logs every failed accept(): thousands of lines a
    second when file descriptors run out)."""

    def __init__(self, seconds: float = OVERLOAD_LOG_S) -> None:
        super().__init__()
        self.seconds, self._last = seconds, {}

    def filter(self, record: logging.LogRecord) -> bool:
        now, key = time.monotonic(), str(record.msg)
        if now - self._last.get(key, -self.seconds) < self.seconds:
            return False
        self._last[key] = now
        return True


ASYNCIO_REPEATS = RepeatFilter()


def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED) -> int:
    """The soft limit of open files raised towards the hard one (a shell's default 1024 would cap the
    connections at about 100 per guard); Triton, started later, inherits it. The limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return wanted if soft == resource.RLIM_INFINITY else soft


def connection_limit(open_files: int, guards: int = 2) -> int:
    """Connections one guard holds at most: MAX_CONNECTIONS, or what the open-files limit leaves for each."""
    return max(8, min(MAX_CONNECTIONS, (open_files - FDS_KEPT) // (FDS_PER_CONNECTION * guards)))


@dataclass
class Connection:
    """One client connection of a guard, the task serving it, and when it last had something in flight."""

    task: asyncio.Task
    last_activity: float = field(default_factory=time.monotonic)  # opened, a request begun or answered

    def in_flight(self) -> int:
        """Requests (or calls) passed on to Triton and not answered yet."""
        raise NotImplementedError

    def busy(self) -> bool:
        return self.in_flight() > 0

    def idle_for(self, now: float) -> float:
        """Seconds without a request in flight (0: one is)."""
        return 0.0 if self.busy() else now - self.last_activity


class LoopbackGuard:
    """Listens on (host, port) in front of one of Triton's endpoints at 127.0.0.1:upstream_port, on an asyncio
    loop of its own thread; a subclass serves each client connection (`_handle`) and says what it has in flight.
    The drain refuses new connections and closes each one once it has had nothing in flight for IDLE_CLOSE_S
    (Triton would wait for an idle keep-alive connection until its exit timeout); `cut` counts the requests
    (calls) whose connection ended without their answer from the drain on.

    >>> guard = HttpGuard("127.0.0.1", 8000, 18000, 33_000_000)  # doctest: +SKIP
    >>> guard.start()  # once Triton is ready  # doctest: +SKIP
    >>> guard.drain()  # new connections refused, idle ones closed  # doctest: +SKIP
    >>> guard.stop()  # once Triton has stopped; guard.cut: requests left unanswered  # doctest: +SKIP
    """

    name = "guard"

    def __init__(self, host: str, port: int, upstream_port: int, max_bytes: int,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.host, self.port, self.upstream_port, self.max_bytes = host, port, upstream_port, max_bytes
        self.max_connections = max_connections
        self.refused = 0
        self.overloaded = 0  # connections turned away: max_connections busy ones open
        self.reaped = 0  # idle connections closed to make room for new ones
        self._overload_logged = -OVERLOAD_LOG_S
        self.cut = 0  # requests in flight whose connection ended without their reply, from the drain on
        self._draining = False
        self._sweeper: asyncio.Task | None = None
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._connections: list[Connection] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"facemark-{self.name}", daemon=True)

    def start(self) -> None:
        if ASYNCIO_REPEATS not in logging.getLogger("asyncio").filters:
            logging.getLogger("asyncio").addFilter(ASYNCIO_REPEATS)
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, sock=listener, limit=HEAD_LIMIT, backlog=1024), self._loop).result()

    def drain(self) -> None:
        """New connections are refused from now on; idle ones are closed now, the others once answered."""
        if self._server is None or self._loop.is_closed():
            return

        def begin() -> None:
            if not self._draining:
                self._draining = True
                self._server.close()  # type: ignore[union-attr]
                self._sweeper = self._loop.create_task(self._close_idle())

        self._loop.call_soon_threadsafe(begin)

    async def _close_idle(self) -> None:
        """While draining: close each connection once it has had no request in flight for IDLE_CLOSE_S (a client
        that has just connected gets that long to send its request)."""
        while True:
            now = time.monotonic()
            for connection in self._connections:
                if connection.idle_for(now) >= IDLE_CLOSE_S:
                    connection.task.cancel()
            await asyncio.sleep(IDLE_CLOSE_S / 4)

    def stop(self) -> None:
        """Every connection closed (the requests still pending on them counted in `cut`), the thread ended."""
        if not self._thread.is_alive():
            if not self._loop.is_closed():
                self._loop.close()
            return
        self.drain()

        async def close_all() -> None:
            tasks = [connection.task for connection in self._connections] + [t for t in (self._sweeper,) if t]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):  # a loop already closing
            asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def _new_connection(self, task: asyncio.Task) -> Connection:
        raise NotImplementedError

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: Connection
                      ) -> None:
        raise NotImplementedError

    def _make_room(self) -> bool:
        """Whether a new connection may be served: below max_connections, or once the connection idle the
        longest (nothing in flight: a keep-alive client between requests, or one that never sent a whole request)
        is closed. False when every connection has a request in flight."""
        if len(self._connections) < self.max_connections:
            return True
        now = time.monotonic()
        idle = [c for c in self._connections if not c.busy() and not c.task.cancelling()]
        if not idle:
            return False
        max(idle, key=lambda c: c.idle_for(now)).task.cancel()
        self.reaped += 1
        return True

    def _turn_away(self, writer: asyncio.StreamWriter) -> None:
        """A connection over max_connections: counted, one log line per OVERLOAD_LOG_S (not one per connection),
        then closed at once (`_goodbye`)."""
        self.overloaded += 1
        now = time.monotonic()
        if now - self._overload_logged >= OVERLOAD_LOG_S:
            self._overload_logged = now
            LOGGER.warning("%s: %d connections, each with a request in flight: new ones turned away (%d so far)",
                           self.name, len(self._connections), self.overloaded)
        self._goodbye(writer)

    def _goodbye(self, writer: asyncio.StreamWriter) -> None:
        """Close a connection turned away (a subclass may answer first: its protocol's way to say "busy")."""
        writer.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if not self._make_room():
            self._turn_away(client_writer)
            return
        connection = self._new_connection(asyncio.current_task())  # type: ignore[arg-type]
        self._connections.append(connection)
        try:
            await self._handle(client_reader, client_writer, connection)
        except (ConnectionError, asyncio.IncompleteReadError, OSError, asyncio.CancelledError):
            pass  # the client or Triton went away, or the drain closed an idle connection: nothing to answer
        finally:
            client_writer.close()
            self._connections.remove(connection)
            if self._draining:
                self.cut += connection.in_flight()


@dataclass
class _HttpConnection(Connection):
    """The methods of the requests passed on to Triton and not answered yet, in order."""

    pending: deque[bytes] = field(default_factory=deque)
    between_requests: bool = True  # waiting for the client's next request head

    def in_flight(self) -> int:
        return len(self.pending)

    def busy(self) -> bool:
        return not self.between_requests or bool(self.pending)


class HttpGuard(LoopbackGuard):
    """Passes checked requests on to Triton's HTTP endpoint (check_head, the module docstring). Triton's replies
    are copied back one by one (their heads read for the body's length), so the guard knows which requests are
    in flight."""

    name = "http-guard"

    def _new_connection(self, task: asyncio.Task) -> _HttpConnection:
        return _HttpConnection(task)

    def _goodbye(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            writer.write(_reply("503 Service Unavailable", "too many connections with a request in flight; retry"))
        writer.close()  # after the reply is flushed

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                      connection: _HttpConnection) -> None:  # type: ignore[override]
        upstream_writer = replies = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port,
                                                                              limit=HEAD_LIMIT)
            replies = asyncio.ensure_future(self._copy_replies(upstream_reader, client_writer, connection))
            while not replies.done():
                refusal = await self._pass_request(client_reader, upstream_writer, connection)
                if refusal is not None:
                    self.refused += 1
                    client_writer.write(refusal)
                    await client_writer.drain()
                    await self._discard(client_reader)
                    break
        finally:
            if replies is not None:
                replies.cancel()
            if upstream_writer is not None:
                upstream_writer.close()

    async def _pass_request(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter,
                            connection: _HttpConnection) -> bytes | None:
        """One request passed on; its refusal instead when its head says so. IncompleteReadError at the end."""
        connection.between_requests = True
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _reply("431 Request Header Fields Too Large", f"the request head is over {HEAD_LIMIT} bytes")
        connection.between_requests, connection.last_activity = False, time.monotonic()
        checked = check_head(head, self.max_bytes)
        if isinstance(checked, bytes):
            return checked
        head, left = checked
        connection.pending.append(head.split(b" ", 1)[0])
        upstream.write(head)
        await _copy_exactly(reader, upstream, left)
        return None

    @staticmethod
    async def _discard(reader: asyncio.StreamReader, seconds: float = 2.0) -> None:
        """Read and drop what the client still sends of a refused body for a moment, so that closing does not reset
        the connection before the client has read the refusal."""
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(seconds):
                while await reader.read(CHUNK):
                    pass

    async def _copy_replies(self, upstream: asyncio.StreamReader, client: asyncio.StreamWriter,
                            connection: _HttpConnection) -> None:
        """Triton's replies to the client, one by one."""
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                                 ValueError, IndexError):  # the last two: a reply head that does not parse
            while True:
                head = await upstream.readuntil(b"\r\n\r\n")
                client.write(head)
                status, length = reply_length(head, connection.pending[0] if connection.pending else b"")
                if status < 200:  # 100 Continue: the final reply follows
                    await client.drain()
                    continue
                if length is None:  # no length (never seen from Triton): the rest of the stream, untracked
                    connection.pending.clear()
                    while chunk := await upstream.read(CHUNK):
                        client.write(chunk)
                        await client.drain()
                    break
                await _copy_exactly(upstream, client, length)
                if connection.pending:
                    connection.pending.popleft()
                connection.last_activity = time.monotonic()
        client.close()  # Triton closed: so does the client's connection
        connection.task.cancel()


def reply_length(head: bytes, method: bytes) -> tuple[int, int | None]:
    """A reply head's status and its body's length (None: not given, the body runs to the end of the stream)."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    if status < 200 or status in (204, 304) or method == b"HEAD":
        return status, 0
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
        elif name.strip().lower() == b"transfer-encoding":
            return status, None
    return status, length


async def _copy_exactly(source: asyncio.StreamReader, target: asyncio.StreamWriter, count: int) -> None:
    """`count` bytes from `source` to `target` in chunks, each drained; IncompleteReadError when the source ends
    first."""
    while count > 0:
        chunk = await source.read(min(CHUNK, count))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", count)
        target.write(chunk)
        count -= len(chunk)
        await target.drain()
    await target.drain()
