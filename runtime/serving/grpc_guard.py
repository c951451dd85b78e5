"""The gRPC front of `facemark serve`: a message over the limit is refused before Triton receives it.

tritonserver 2.51 accepts gRPC messages up to 2 GB and has no option to lower that, so a client could make it
buffer (and the Python backend copy) hundreds of MB per call. Triton's gRPC endpoint therefore listens on a
private loopback port, and this guard takes the public one and passes HTTP/2 on frame by frame (RFC 9113), both
ways, holding at most one frame; it decodes no headers. Per client stream it follows gRPC's length-prefixed
messages (1 byte "compressed", 4 bytes big-endian length, the message) through the DATA frames, so a message is
judged by the length it announces, before its bytes arrive:
- a message over request_limit_bytes (--max-request-mb and the HTTP guard's allowance) is refused: Triton gets
  RST_STREAM(CANCEL) for the stream and none of its data, the client a trailers-only answer with grpc-status 8
  RESOURCE_EXHAUSTED (its call fails with StatusCode.RESOURCE_EXHAUSTED) and RST_STREAM(NO_ERROR);
- a compressed message is refused with grpc-status 12 UNIMPLEMENTED: its size is known only once decompressed,
  and Triton would decompress it up to 2 GB;
- the bytes of a refused stream that the client had already sent are given back to its connection window
  (WINDOW_UPDATE), so the other calls on the connection keep flowing; Triton's frames still on their way for
  that stream are dropped and their bytes given back to Triton the same way;
- a connection that does not open with the HTTP/2 preface within PREFACE_TIMEOUT_S is closed before Triton sees
  it.
The guard's own frames never land inside a header block (HEADERS then CONTINUATION frames, which must be
contiguous), and its answer is encoded with HPACK representations that leave the client's dynamic table alone.
The calls in flight are known (a stream opened by the client until Triton ends or resets it), for the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from facemark.runtime.serving.guard import REQUEST_ALLOWANCE_BYTES, Connection, LoopbackGuard

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PREFACE_TIMEOUT_S = 5.0
FRAME_HEADER_BYTES = 9
MESSAGE_PREFIX_BYTES = 5
DATA, HEADERS, RST_STREAM, PUSH_PROMISE, WINDOW_UPDATE, CONTINUATION = 0x0, 0x1, 0x3, 0x5, 0x8, 0x9
END_STREAM, END_HEADERS, PADDED = 0x1, 0x4, 0x8
NO_ERROR, CANCEL = 0x0, 0x8
RESOURCE_EXHAUSTED, UNIMPLEMENTED = 8, 12  # grpc-status codes
REFUSED_KEPT = 4096  # refused stream ids remembered per connection (to drop Triton's late frames for them)


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, increment.to_bytes(4, "big"))


def _hpack_integer(value: int, prefix_bits: int, first_byte: int = 0) -> bytes:
    """RFC 7541 5.1: `value` in a prefix of `prefix_bits` bits (the first byte's high bits from `first_byte`)."""
    ceiling = (1 << prefix_bits) - 1
    if value < ceiling:
        return bytes((first_byte | value,))
    out, value = bytearray((first_byte | ceiling,)), value - ceiling
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes(out + bytes((value,)))


def _hpack_string(text: str) -> bytes:
    raw = text.encode()
    return _hpack_integer(len(raw), 7) + raw  # not Huffman-coded


def trailers_only(status: int, message: str, headers_sent: bool = False) -> bytes:
    """An HPACK header block ending a gRPC call: :status 200 (static table entry 8, indexed) and content-type
    (static name 31) unless the response's headers were sent already, then grpc-status and grpc-message, as
    literals without indexing: nothing is added to the client's dynamic table."""
    block = b""
    if not headers_sent:
        block += _hpack_integer(8, 7, 0x80) + _hpack_integer(31, 4) + _hpack_string("application/grpc")
    for name, value in (("grpc-status", str(status)), ("grpc-message", message.replace("%", "%25"))):
        block += b"\x00" + _hpack_string(name) + _hpack_string(value)
    return block


def data_span(payload: bytes, flags: int) -> tuple[int, int]:
    """Where a DATA frame's data lies in its payload: (start, end), without the padding."""
    if not flags & PADDED or not payload:
        return 0, len(payload)
    return 1, max(1, len(payload) - payload[0])


@dataclass
class MessageFraming:
    """Where a client stream stands in gRPC's length-prefixed messages."""

    prefix: bytearray = field(default_factory=bytearray)  # the next message's prefix bytes received so far
    left: int = 0  # bytes of the current message still to come

    def refusal(self, data: memoryview, limit: int) -> tuple[int, str] | None:
        """The grpc-status and message refusing the stream, for the first message of `data` announced over
        `limit` bytes or compressed; None: every message so far is acceptable."""
        position = 0
        while position < len(data):
            if self.left:
                taken = min(self.left, len(data) - position)
                self.left -= taken
                position += taken
                continue
            piece = data[position : position + MESSAGE_PREFIX_BYTES - len(self.prefix)]
            self.prefix += piece
            position += len(piece)
            if len(self.prefix) < MESSAGE_PREFIX_BYTES:
                break
            compressed, length = self.prefix[0], int.from_bytes(self.prefix[1:], "big")
            self.prefix.clear()
            if length > limit:
                return RESOURCE_EXHAUSTED, (f"request is {length / 1e6:.1f} MB, above --max-request-mb "
                                            f"{(limit - REQUEST_ALLOWANCE_BYTES) / 1e6:g} (+"
                                            f"{REQUEST_ALLOWANCE_BYTES / 1e6:g} MB for the message's other fields)")
            if compressed:
                return UNIMPLEMENTED, "compressed requests are refused (their size is known only once decompressed)"
            self.left = length
        return None


@dataclass
class _Http2Connection(Connection):
    """The client's calls Triton has not ended yet (stream ids), those Triton has sent its response headers on,
    the client streams' framing, and the streams the guard refused."""

    streams: set[int] = field(default_factory=set)
    responding: set[int] = field(default_factory=set)
    framing: dict[int, MessageFraming] = field(default_factory=dict)
    refused: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def in_flight(self) -> int:
        return len(self.streams)

    def end(self, stream: int) -> None:
        self.streams.discard(stream)
        self.responding.discard(stream)

    def refuse(self, stream: int) -> None:
        self.end(stream)
        self.framing.pop(stream, None)
        self.refused[stream] = None
        if len(self.refused) > REFUSED_KEPT:
            self.refused.popitem(last=False)


class FrameWriter:
    """Frames to one peer: those passed on from the other peer, and the guard's own, which wait while a header
    block passed on is open (HEADERS or PUSH_PROMISE without END_HEADERS, until its last CONTINUATION)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.in_header_block = False
        self._held: list[bytes] = []

    def forward(self, header: bytes, payload: bytes) -> None:
        self.writer.writelines((header, payload))
        if header[3] in (HEADERS, PUSH_PROMISE, CONTINUATION):
            self.in_header_block = not header[4] & END_HEADERS
            if not self.in_header_block and self._held:
                self.writer.writelines(self._held)
                self._held.clear()

    def send(self, *frames: bytes) -> None:
        if self.in_header_block:
            self._held.extend(frames)
        else:
            self.writer.writelines(frames)


async def _give_back_window(kind: int, payload: bytes, to_sender: FrameWriter) -> None:
    """A dropped DATA frame of a refused stream still counted against the connection's flow-control window: give
    its bytes back to the side that sent it (HTTP/2 has no other way), else that side stalls."""
    if kind == DATA and payload:
        to_sender.send(window_update(0, len(payload)))
        await to_sender.writer.drain()


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(the 9-byte frame header, the payload); IncompleteReadError at the end of the stream."""
    header = await reader.readexactly(FRAME_HEADER_BYTES)
    return header, await reader.readexactly(int.from_bytes(header[:3], "big"))


def _stream_of(header: bytes) -> int:
    return int.from_bytes(header[5:9], "big") & 0x7FFF_FFFF


class GrpcGuard(LoopbackGuard):
    """Passes HTTP/2 between gRPC clients and Triton's gRPC endpoint, refusing the messages over `max_bytes`
    (the module docstring says how)."""

    name = "grpc-guard"

    def _new_connection(self, task: asyncio.Task) -> _Http2Connection:
        return _Http2Connection(task)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                      connection: _Http2Connection) -> None:  # type: ignore[override]
        if await asyncio.wait_for(client_reader.readexactly(len(PREFACE)), PREFACE_TIMEOUT_S) != PREFACE:
            return  # not HTTP/2 (nor gRPC): closed, Triton never sees it
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        to_client, to_triton = FrameWriter(client_writer), FrameWriter(upstream_writer)
        upstream_writer.write(PREFACE)
        directions = [asyncio.ensure_future(self._from_client(client_reader, to_triton, to_client, connection)),
                      asyncio.ensure_future(self._from_triton(upstream_reader, to_client, to_triton, connection))]
        try:
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)  # one side closed: both end
        finally:
            for direction in directions:
                direction.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*directions, return_exceptions=True)
            upstream_writer.close()

    async def _from_client(self, reader: asyncio.StreamReader, to_triton: FrameWriter, to_client: FrameWriter,
                           connection: _Http2Connection) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while True:
                header, payload = await _read_frame(reader)
                kind, flags, stream = header[3], header[4], _stream_of(header)
                if stream in connection.refused:  # sent before the client read the refusal
                    await _give_back_window(kind, payload, to_client)
                    continue
                if kind == HEADERS:
                    connection.streams.add(stream)
                    connection.last_activity = time.monotonic()
                elif kind == DATA and stream:
                    start, end = data_span(payload, flags)
                    framing = connection.framing.setdefault(stream, MessageFraming())
                    refusal = framing.refusal(memoryview(payload)[start:end], self.max_bytes)
                    if refusal is not None:
                        self._refuse(stream, *refusal, len(payload), to_triton, to_client, connection)
                        await to_client.writer.drain()
                        continue
                elif kind == RST_STREAM:
                    connection.end(stream)
                if flags & END_STREAM and kind in (DATA, HEADERS) or kind == RST_STREAM:
                    connection.framing.pop(stream, None)  # the client's side of the stream is closed
                to_triton.forward(header, payload)
                await to_triton.writer.drain()

    async def _from_triton(self, reader: asyncio.StreamReader, to_client: FrameWriter, to_triton: FrameWriter,
                           connection: _Http2Connection) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while True:
                header, payload = await _read_frame(reader)
                kind, flags, stream = header[3], header[4], _stream_of(header)
                if stream in connection.refused:  # the client has its answer already
                    await _give_back_window(kind, payload, to_triton)
                    continue
                if flags & END_STREAM and kind in (DATA, HEADERS) or kind == RST_STREAM:
                    connection.end(stream)
                    connection.last_activity = time.monotonic()
                elif kind == HEADERS:
                    connection.responding.add(stream)
                to_client.forward(header, payload)
                await to_client.writer.drain()

    def _refuse(self, stream: int, status: int, message: str, swallowed: int, to_triton: FrameWriter,
                to_client: FrameWriter, connection: _Http2Connection) -> None:
        """Triton forgets the call, the client gets its answer and the window of the frame not passed on."""
        self.refused += 1
        answer = frame(HEADERS, END_STREAM | END_HEADERS, stream,
                       trailers_only(status, message, stream in connection.responding))
        connection.refuse(stream)
        to_triton.send(frame(RST_STREAM, 0, stream, CANCEL.to_bytes(4, "big")))
        to_client.send(answer, frame(RST_STREAM, 0, stream, NO_ERROR.to_bytes(4, "big")),
                       *([window_update(0, swallowed)] if swallowed else []))
