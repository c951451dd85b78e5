"""Malformed and oversized requests against one `facemark serve` on loopback: KServe v2 HTTP as JSON, HTTP with
binary tensors, and gRPC. After each batch the server is up, answers a good request with faces, and its
resident memory (the whole process tree) stays bounded; the gRPC messages over the limit are refused with
RESOURCE_EXHAUSTED. The requests are made from a seeded generator: the same few hundred every run.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections import Counter

import numpy as np
import pytest
from conftest import GUARDED_LIMIT_BYTES, GUARDED_LIMIT_MB, SAMPLES, guarded_server

from facemark.benchmarks.serve_load import INFER_PATH, ServerProcess, post_status, tree_rss_bytes

PHOTO = (SAMPLES / "2008_002470.jpg").read_bytes()
LIMIT_MB = GUARDED_LIMIT_MB
LIMIT_BYTES = GUARDED_LIMIT_BYTES
PER_BATCH = 60
ROUNDS = 2  # of PER_BATCH requests per encoding
RSS_GROWTH_MB = 600  # allowed growth of the tree's RSS over the whole fuzz, after the first good answer
RSS_ROUND_GROWTH_MB = 200  # allowed growth from the first round's peak to the second's


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = guarded_server(tmp_path_factory, "fuzz")
    yield started
    started.stop()


def _json_body(data: list, shape: list | None = None, datatype: str = "BYTES", name: str = "image") -> bytes:
    tensor = {"name": name, "shape": shape if shape is not None else [len(data), 1], "datatype": datatype,
              "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


def _json_cases(rng: np.random.Generator) -> list[bytes]:
    good = _json_body([PHOTO.decode("latin-1")])
    fixed = [b"", b"{", b"[]", b"null", b'{"inputs": 5}', b'{"inputs": [{}]}', b'{"inputs": [{"name": "image"}]}',
             _json_body(["x"], shape=[1_000_000_000, 1]), _json_body(["x"], shape=[-1, 1]),
             _json_body([1, 2, 3], datatype="FP32"), _json_body(["x"], datatype="NOPE"),
             _json_body(["x"], name="other"), _json_body(["x"] * 9), _json_body([[["x"]]]),
             b'{"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["\\ud800"]}]}',
             b"[" * 2000 + b"]" * 2000, b'{"inputs": [' + b'{"a": ' * 500 + b"1" + b"}" * 500 + b"]}",
             _json_body(["A" * int(3e6)]), _json_body(["A" * int(5e6)]), _json_body(["B" * int(20e6)])]
    mutated = []
    for _ in range(PER_BATCH - len(fixed)):
        body = bytearray(good)
        if rng.random() < 0.5:
            body = body[: int(rng.integers(1, len(body)))]  # truncated
        for position in rng.integers(0, len(body), int(rng.integers(1, 20))):
            body[position] = int(rng.integers(0, 256))
        mutated.append(bytes(body))
    return fixed + mutated


def _binary_request(files: list[bytes], header_extra: dict | None = None, sizes: list[int] | None = None
                    ) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 binary-tensor request: JSON header, then the BYTES tensor (4-byte length before each item)."""
    payload = b"".join(struct.pack("<I", len(f) if sizes is None else sizes[i]) + f for i, f in enumerate(files))
    header = {"inputs": [{"name": "image", "shape": [len(files), 1], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(payload)}}], **(header_extra or {})}
    head = json.dumps(header).encode()
    return head + payload, {"Inference-Header-Content-Length": str(len(head)),
                            "Content-Type": "application/octet-stream"}


def _binary_cases(rng: np.random.Generator) -> list[tuple[bytes, dict[str, str]]]:
    body, headers = _binary_request([PHOTO])
    cases = [(body, {**headers, "Inference-Header-Content-Length": value})
             for value in ("0", "-5", "abc", str(len(body) + 10), "99999999999999999999")]
    cases.append(_binary_request([PHOTO], sizes=[2**31]))
    cases.append(_binary_request([PHOTO, PHOTO], sizes=[10, 3]))
    cases.append(_binary_request([PHOTO] * 9))
    cases.append(_binary_request([b"\x00" * int(3e6)]))
    cases.append(_binary_request([b"\xff" * int(20e6)]))
    while len(cases) < PER_BATCH:
        mutated = bytearray(body)
        for position in rng.integers(0, len(mutated), int(rng.integers(1, 40))):
            mutated[position] = int(rng.integers(0, 256))
        cases.append((bytes(mutated), headers))
    return cases


def _grpc_cases(rng: np.random.Generator):
    from tritonclient.grpc import service_pb2

    def request(contents: list[bytes], shape: list[int] | None = None, datatype: str = "BYTES",
                model: str = "facemark") -> bytes:
        message = service_pb2.ModelInferRequest(model_name=model)
        tensor = message.inputs.add(name="image", datatype=datatype)
        tensor.shape.extend(shape if shape is not None else [len(contents), 1])
        message.raw_input_contents.append(b"".join(struct.pack("<I", len(c)) + c for c in contents))
        return message.SerializeToString()

    good = request([PHOTO])
    cases = [b"", b"\xff" * 100, request([PHOTO], shape=[1_000_000, 1]), request([PHOTO], shape=[]),
             request([PHOTO], datatype="FP32"), request([PHOTO], model="missing"), request([PHOTO] * 9),
             request([b"\x00" * int(3e6)]), request([b"\xff" * int(20e6)]), request([b"\x00" * int(40e6)])]
    while len(cases) < PER_BATCH:
        mutated = bytearray(good)
        for position in rng.integers(0, len(mutated), int(rng.integers(1, 30))):
            mutated[position] = int(rng.integers(0, 256))
        cases.append(bytes(mutated))
    return cases


def _good_answer(server: ServerProcess) -> int:
    """Faces found by a good request: the server answers."""
    from facemark.runtime.serving.client import TritonLandmarker

    faces, error = TritonLandmarker(server.url, timeout_s=60).detect_encoded([PHOTO], [(500, 332)])[0]
    assert error == ""
    return len(faces)


def _after_batch(server: ServerProcess, rss: list[int]) -> None:
    assert server.proc.poll() is None, server.log.read_text()[-3000:]
    assert _good_answer(server) >= 1
    rss.append(tree_rss_bytes(server.proc.pid))


def _fuzz_round(server: ServerProcess, rng: np.random.Generator, statuses: dict[str, list], rss: list[int]) -> None:
    import grpc

    for body in _json_cases(rng):
        statuses["json"].append(post_status(server.http, body, {"Content-Type": "application/json"}))
    _after_batch(server, rss)
    for body, headers in _binary_cases(rng):
        statuses["binary"].append(post_status(server.http, body, headers))
    _after_batch(server, rss)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        for raw in _grpc_cases(rng):
            try:
                infer(raw, timeout=60)
                status = "OK"
            except grpc.RpcError as exc:
                status = exc.code().name
            statuses["grpc"].append(status)
            if len(raw) > LIMIT_BYTES:
                statuses["grpc oversized"].append(status)
    _after_batch(server, rss)


def test_fuzz_every_encoding_and_the_server_stays_up_with_bounded_memory(server):
    rng = np.random.default_rng(38)
    rss: list[int] = []
    _after_batch(server, rss)
    statuses: dict[str, list[int | str]] = {"json": [], "binary": [], "grpc": [], "grpc oversized": []}
    for _ in range(ROUNDS):
        _fuzz_round(server, rng, statuses, rss)
    mb = [round(r / 2**20) for r in rss]
    print({kind: dict(Counter(map(str, values))) for kind, values in statuses.items()},  # the counts, with -s
          "tree RSS after each batch (MB):", mb)
    assert sum(len(statuses[kind]) for kind in ("json", "binary", "grpc")) == ROUNDS * 3 * PER_BATCH
    assert statuses["grpc oversized"] == ["RESOURCE_EXHAUSTED"] * ROUNDS * 3, statuses["grpc oversized"]
    # every request got an answer: an HTTP status (Triton answers JSON it cannot parse with 500), a gRPC status
    # other than "unavailable" or a timeout
    assert [s for kind in ("json", "binary") for s in statuses[kind] if s == 0] == [], statuses
    assert not {"UNAVAILABLE", "DEADLINE_EXCEEDED"} & set(statuses["grpc"]), statuses["grpc"]
    assert max(mb) - mb[0] < RSS_GROWTH_MB, mb
    assert max(mb[4:]) - max(mb[:4]) < RSS_ROUND_GROWTH_MB, mb  # the second round holds no more than the first


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "application/json"])
def test_json_bodies_of_5_to_200_mb_are_answered_or_refused_and_the_server_stays_up(server, content_type):
    """The sizes that killed tritonserver 2.51 when sent as a form (curl -d): up to the limit they reach the model
    (and are refused there by --max-request-mb), above it the guard answers 413."""
    limit = LIMIT_BYTES  # --max-request-mb and the JSON header's allowance
    for megabytes in (4, 5, 20, 40, 200):
        body = _json_body(["A" * int(megabytes * 1e6)])
        status = post_status(server.http, body, {"Content-Type": content_type})
        assert status == (413 if len(body) > limit else 200), megabytes
    time.sleep(1)  # a tritonserver that dies takes a moment to be noticed
    assert server.proc.poll() is None and _good_answer(server) >= 1


def test_an_oversized_body_is_refused_from_its_head_before_it_is_sent(server):
    with socket.create_connection(("127.0.0.1", server.http), timeout=30) as connection:
        connection.sendall(f"POST {INFER_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {200 * 10**6}\r\n\r\n".encode())  # and not one byte of the body
        reply = connection.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413 "), reply
    for head, status in ((b"Transfer-Encoding: chunked\r\n", b"411"), (b"X-Junk: " + b"j" * 70_000 + b"\r\n", b"431"),
                         (b"Content-Length: -3\r\n", b"400")):
        with socket.create_connection(("127.0.0.1", server.http), timeout=30) as connection:
            connection.sendall(f"POST {INFER_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + head + b"\r\n")
            assert connection.recv(4096).startswith(b"HTTP/1.1 " + status), head[:30]
    assert _good_answer(server) >= 1


def test_check_head_decides_from_the_head_alone():
    from facemark.runtime.serving.guard import check_head

    def status(head: bytes, limit: int = 100) -> bytes:
        checked = check_head(b"POST /v2/models/facemark/infer HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n", limit)
        return checked.split(b" ")[1] if isinstance(checked, bytes) else b"passed"

    assert status(b"Content-Length: 100\r\n") == b"passed"
    assert status(b"Content-Length: 101\r\n") == b"413"
    assert status(b"Transfer-Encoding: chunked\r\n") == b"411"
    for bad in (b"Content-Length: -1\r\n", b"Content-Length: 5\r\nContent-Length: 6\r\n", b"Content-Length : 5\r\n",
                b"no colon here\r\n"):
        assert status(bad) == b"400", bad
    head, length = check_head(b"POST / HTTP/1.1\r\nContent-Type: Application/X-WWW-Form-Urlencoded\r\n"
                              b"Content-Length: 7\r\nX-Kept: 1\r\n\r\n", 100)
    assert length == 7 and b"form" not in head.lower() and b"X-Kept: 1\r\n" in head and head.endswith(b"\r\n\r\n")
    assert check_head(b"GARBAGE\r\n\r\n", 100).startswith(b"HTTP/1.1 400 ")


def test_reply_length_reads_the_body_length_from_the_reply_head():
    from facemark.runtime.serving.guard import reply_length

    assert reply_length(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\nContent-Length: 1829\r\n\r\n", b"POST") == (200, 1829)
    assert reply_length(b"HTTP/1.1 100 Continue\r\n\r\n", b"POST") == (100, 0)
    assert reply_length(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD") == (200, 0)
    assert reply_length(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET") == (200, None)
    assert reply_length(b"HTTP/1.1 500 Internal Server Error\r\n\r\n", b"GET") == (500, None)
