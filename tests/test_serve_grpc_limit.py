"""gRPC messages above --max-request-mb are refused with RESOURCE_EXHAUSTED by the guard in front of Triton's gRPC
endpoint (facemark.runtime.serving.grpc_guard) before Triton buffers them, and the server, the channel and the
other calls on the same connection go on. One `facemark serve` on loopback for the whole file.
"""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time

import cv2
import numpy as np
import pytest
from conftest import GUARDED_LIMIT_BYTES, GUARDED_LIMIT_MB, SAMPLES, guarded_server

from facemark.benchmarks.serve_load import PeakRss, ServerProcess, tree_rss_bytes

PHOTO = (SAMPLES / "2008_002470.jpg").read_bytes()
PHOTO_SIZE = (500, 332)
LIMIT_MB = GUARDED_LIMIT_MB
LIMIT_BYTES = GUARDED_LIMIT_BYTES
INFER = "/inference.GRPCInferenceService/ModelInfer"
CONCURRENT_40_MB = 6
RSS_GROWTH_MB = 200  # allowed peak growth of the tree's RSS while 6 x 40 MB are sent twice


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = guarded_server(tmp_path_factory, "grpc-limit")
    yield started
    started.stop()


def _image(megabytes: float) -> bytes:
    """The photo followed by zeros up to `megabytes` (decoders stop at the JPEG's end)."""
    return PHOTO + b"\x00" * max(0, int(megabytes * 1e6) - len(PHOTO))


def _request(image: bytes) -> bytes:
    """A serialized ModelInferRequest of model `facemark` with one image."""
    from tritonclient.grpc import service_pb2

    message = service_pb2.ModelInferRequest(model_name="facemark")
    tensor = message.inputs.add(name="image", datatype="BYTES")
    tensor.shape.extend([1, 1])
    message.raw_input_contents.append(struct.pack("<I", len(image)) + image)
    return message.SerializeToString()


def _faces(client, image: bytes = PHOTO, compression: str | None = None) -> int:
    """Faces found in one image sent with a tritonclient.grpc client; its `error` output must be empty."""
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=object))
    result = client.infer("facemark", [tensor], client_timeout=60, compression_algorithm=compression)
    assert result.as_numpy("error").reshape(-1)[0] == b""
    return int(result.as_numpy("face_count").reshape(-1)[0])


def _client(server: ServerProcess):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")


def _raw_channel(server: ServerProcess):
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc}")
    return channel, channel.unary_unary(INFER, request_serializer=lambda raw: raw,
                                        response_deserializer=lambda raw: raw)


@pytest.mark.parametrize("megabytes", [5, 20, 40])
def test_an_oversized_grpc_request_is_refused_with_resource_exhausted_and_the_channel_goes_on(server, megabytes):
    from tritonclient.utils import InferenceServerException

    client = _client(server)
    for _ in range(3):  # several on one connection: the window of the bytes swallowed is given back each time
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as refused:
            _faces(client, _image(megabytes))
        print(f"{megabytes} MB refused in {time.monotonic() - started:.3f} s")  # with -s
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED", refused.value
        assert f"above --max-request-mb {LIMIT_MB}" in refused.value.message()
    assert _faces(client) >= 1  # the same channel
    assert _faces(_client(server)) >= 1  # a new one
    assert server.proc.poll() is None


def test_a_request_just_under_the_limit_is_answered(server):
    image = _image(LIMIT_MB - 0.1)
    assert len(_request(image)) < LIMIT_BYTES
    assert _faces(_client(server), image) >= 1


def test_an_oversized_call_and_a_good_one_on_one_connection_the_good_one_is_answered(server):
    import grpc

    channel, infer = _raw_channel(server)
    with channel:
        for _ in range(3):
            good = infer.future(_request(PHOTO), timeout=60)
            oversized = infer.future(_request(_image(40)), timeout=60)
            also_good = infer.future(_request(PHOTO), timeout=60)
            with pytest.raises(grpc.RpcError) as refused:
                oversized.result()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert good.result() and also_good.result()


def test_oversized_grpc_requests_do_not_grow_the_server_memory(server):
    import grpc

    channel, infer = _raw_channel(server)
    payload = _request(_image(40))
    codes: list[str] = []
    before = tree_rss_bytes(server.proc.pid)
    with channel, PeakRss(server.proc.pid, period_s=0.05) as peak:
        for _ in range(2):
            calls = [infer.future(payload, timeout=120) for _ in range(CONCURRENT_40_MB)]
            for call in calls:
                try:
                    call.result()
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
    grown = (peak.peak_mb or 0) - before / 2**20
    print(f"tree RSS {before / 2**20:.0f} MB before, peak {peak.peak_mb:.0f} MB while sending "
          f"{2 * CONCURRENT_40_MB} x 40 MB", codes)
    assert codes == ["RESOURCE_EXHAUSTED"] * 2 * CONCURRENT_40_MB
    assert grown < RSS_GROWTH_MB, grown


def _closed_within(connection: socket.socket, seconds: float) -> bool:
    """Whether the guard closes `connection` within `seconds` (what it sends first is read and dropped)."""
    connection.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not connection.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return False


def test_garbage_or_a_stalled_preface_closes_that_connection_alone(server):
    client = _client(server)
    assert _faces(client) >= 1
    closed = {}

    def probe(name: str, data: bytes, seconds: float) -> None:
        with socket.create_connection(("127.0.0.1", server.grpc), timeout=30) as connection:
            connection.sendall(data)
            closed[name] = _closed_within(connection, seconds)

    cases = {"http/1.1": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 10),
             "random bytes": (np.random.default_rng(38).bytes(5000), 10),
             "half a preface, then silence": (b"PRI * HTTP/2.0\r\n", 15)}
    threads = [threading.Thread(target=probe, args=(name, *case)) for name, case in cases.items()]
    for thread in threads:
        thread.start()
    assert _faces(client) >= 1  # while they are open
    for thread in threads:
        thread.join(60)
    assert closed == dict.fromkeys(cases, True)
    assert _faces(client) >= 1 and server.proc.poll() is None


def test_a_compressed_request_is_refused_as_unimplemented(server):
    """Its size is known only once decompressed (a few MB of gzip can unpack to Triton's 2 GB limit)."""
    from tritonclient.utils import InferenceServerException

    client = _client(server)
    with pytest.raises(InferenceServerException) as refused:
        _faces(client, compression="gzip")
    assert refused.value.status() == "StatusCode.UNIMPLEMENTED", refused.value
    assert _faces(client) >= 1


def test_message_framing_judges_each_message_by_its_announced_length_wherever_the_frames_cut_it():
    from facemark.runtime.serving.grpc_guard import RESOURCE_EXHAUSTED, UNIMPLEMENTED, MessageFraming

    def prefix(length: int, compressed: int = 0) -> bytes:
        return bytes((compressed,)) + length.to_bytes(4, "big")

    def judged(stream: bytes, cuts: int) -> tuple[int, str] | None:
        framing, step = MessageFraming(), max(1, len(stream) // cuts)
        for start in range(0, len(stream), step):
            if (refusal := framing.refusal(memoryview(stream[start : start + step]), 100)) is not None:
                return refusal
        return None

    acceptable = prefix(100) + b"a" * 100 + prefix(0) + prefix(7) + b"b" * 7
    for cuts in (1, 3, len(acceptable)):  # one frame, a few, one byte per frame
        assert judged(acceptable, cuts) is None
        assert judged(acceptable + prefix(101), cuts)[0] == RESOURCE_EXHAUSTED  # refused from its prefix alone
        assert judged(acceptable + prefix(5, compressed=1) + b"c" * 5, cuts)[0] == UNIMPLEMENTED
    assert "request is 0.0 MB" in judged(prefix(101), 1)[1]


def test_hpack_answer_and_padding_helpers():
    from facemark.runtime.serving.grpc_guard import PADDED, _hpack_integer, data_span, trailers_only

    assert _hpack_integer(10, 5) == b"\x0a" and _hpack_integer(1337, 5) == b"\x1f\x9a\x0a"  # RFC 7541 C.1
    block = trailers_only(8, "too big")
    assert block.startswith(b"\x88\x0f\x10\x10application/grpc")  # :status 200 indexed, content-type literal
    assert block.endswith(b"\x00\x0bgrpc-status\x018\x00\x0cgrpc-message\x07too big")
    assert not trailers_only(8, "x", headers_sent=True).startswith(b"\x88")
    assert data_span(b"\x03abc\x00\x00\x00", PADDED) == (1, 4) and data_span(b"abc", 0) == (0, 3)


def _refused_at(port: int, timeout_s: float = 10.0) -> float | None:
    """When a new connection to `port` is first refused (None: not within `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return time.monotonic()
        time.sleep(0.05)
    return None


def _big_photo_request() -> bytes:
    """One photo of 1500x996: about a second of work per few calls on 2 cores."""
    big = cv2.resize(cv2.imdecode(np.frombuffer(PHOTO, np.uint8), cv2.IMREAD_COLOR), None, fx=3, fy=3)
    return _request(cv2.imencode(".jpg", big)[1].tobytes())


def test_the_drain_answers_the_grpc_calls_in_flight_and_refuses_new_connections(tmp_path):
    import grpc

    pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install 'facemark[serve]')")
    server = ServerProcess(["--max-batch-size", "8", "--grace", "60"], log=tmp_path / "serve.log")
    try:
        channel, infer = _raw_channel(server)
        with channel:
            calls = [infer.future(_big_photo_request(), timeout=120) for _ in range(8)]
            answered: list[float] = []
            for call in calls:
                call.add_done_callback(lambda _: answered.append(time.monotonic()))
            time.sleep(0.4)
            server.proc.send_signal(signal.SIGTERM)
            refused = _refused_at(server.grpc)
            codes = [call.code() for call in calls]
            assert codes == [grpc.StatusCode.OK] * len(calls), [call.exception() for call in calls]
        code = server.proc.wait(120)
    finally:
        server.stop()
    assert refused is not None and max(answered) > refused, "no call was still in flight once the port closed"
    assert code == 0, server.log.read_text()[-3000:]

