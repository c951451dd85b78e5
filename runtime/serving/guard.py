"""The HTTP front of `facemark serve`: request heads are checked before Triton sees a byte of them.

tritonserver 2.51 (the one PyTriton 0.7.0, the latest release, carries) has no option that limits an HTTP
body, and its HTTP library (libevhtp) reads a body sent as `application/x-www-form-urlencoded` into two stack
arrays of the body's size to parse it as query arguments: above ~4 MB (on an 8 MiB thread stack) tritonserver
dies of SIGSEGV, whatever the body holds. So Triton's HTTP endpoint listens on a private loopback port and this
guard takes the public one; per request, from its head alone:
- a body over `max_body_bytes` (Content-Length) is refused with 413 before any of it is read;
- a body without Content-Length (chunked) is refused with 411;
- a head over 64 KiB is refused with 431, one that does not parse with 400;
- a Content-Type of application/x-www-form-urlencoded is dropped (Triton reads a KServe body as JSON or binary
  tensors whatever its type; that type only triggers the parse above).
Everything else (the head, then exactly Content-Length bytes of body, then the next request) is passed on over
one Triton connection per client connection, and Triton's replies are copied back as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading

LOGGER = logging.getLogger("facemark.serve")
HEAD_LIMIT = 64 * 1024
CHUNK = 256 * 1024
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


class HttpGuard:
    """Listens on (host, port) and passes checked requests on to Triton's HTTP endpoint at 127.0.0.1:upstream.

    >>> guard = HttpGuard("127.0.0.1", 8000, 18000, 33_000_000)  # doctest: +SKIP
    >>> guard.start()  # once Triton is ready  # doctest: +SKIP
    >>> guard.close_listener()  # the drain: new connections refused  # doctest: +SKIP
    >>> guard.stop()  # once Triton has stopped  # doctest: +SKIP
    """

    def __init__(self, host: str, port: int, upstream_port: int, max_body_bytes: int) -> None:
        self.host, self.port, self.upstream_port, self.max_body_bytes = host, port, upstream_port, max_body_bytes
        self.refused = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="facemark-http-guard", daemon=True)

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, sock=listener, limit=HEAD_LIMIT, backlog=1024), self._loop).result()

    def close_listener(self) -> None:
        """New connections are refused from now on; those open go on."""
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)

    def stop(self) -> None:
        """Every connection closed, the thread ended."""
        if not self._thread.is_alive():
            if not self._loop.is_closed():
                self._loop.close()
            return
        self.close_listener()

        async def close_all() -> None:
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)

        with contextlib.suppress(Exception):  # a loop already closing
            asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)  # type: ignore[arg-type]
        upstream_writer = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            replies = asyncio.ensure_future(self._copy_replies(upstream_reader, client_writer))
            while not replies.done():
                refusal = await self._pass_request(client_reader, upstream_writer)
                if refusal is not None:
                    self.refused += 1
                    client_writer.write(refusal)
                    await client_writer.drain()
                    await self._discard(client_reader)
                    break
            replies.cancel()
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass  # the client or Triton went away: nothing to answer
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
            self._connections.discard(task)  # type: ignore[arg-type]

    async def _pass_request(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter) -> bytes | None:
        """One request passed on; its refusal instead when its head says so. IncompleteReadError at the end."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _reply("431 Request Header Fields Too Large", f"the request head is over {HEAD_LIMIT} bytes")
        checked = check_head(head, self.max_body_bytes)
        if isinstance(checked, bytes):
            return checked
        head, left = checked
        upstream.write(head)
        while left > 0:
            chunk = await reader.read(min(CHUNK, left))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", left)
            upstream.write(chunk)
            left -= len(chunk)
            await upstream.drain()
        await upstream.drain()
        return None

    @staticmethod
    async def _discard(reader: asyncio.StreamReader, seconds: float = 2.0) -> None:
        """Read and drop what the client still sends of a refused body for a moment, so that closing does not reset
        the connection before the client has read the refusal."""
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(seconds):
                while await reader.read(CHUNK):
                    pass

    @staticmethod
    async def _copy_replies(upstream: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await upstream.read(CHUNK):
                client.write(chunk)
                await client.drain()
        client.close()  # Triton closed: so does the client's connection
