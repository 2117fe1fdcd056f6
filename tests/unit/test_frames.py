"""The gRPC data plane's frames (expert_workers.data_grpc): encode/decode, malformed input, a live server.

The frame layout is checked against `struct` + `msgpack` directly; the live server
runs on 127.0.0.1 with an ephemeral port and a handler that doubles a tensor.
"""

from __future__ import annotations

import logging
import re
import struct
from typing import Any, Iterator

import grpc
import msgpack
import pytest
import torch

from expert_workers import data_grpc, wire
from expert_workers.data_grpc import FrameError, decode_frame, encode_frame
from expert_workers.errors import MoEServeError

pytestmark = pytest.mark.unit


# -- frames -----------------------------------------------------------------

HEADERS = [
    {},
    {"layer": 3, "experts": [0, 2, -1], "counts": [4, 1, 5], "dtype": "float32", "shape": [10, 16], "request_ids": ["a", "b"]},
    {"nested": {"x": [1.5, None, True, False]}, "bytes": b"\x00\xff", "neg": -(2**40), "unicode": "héllo"},
]
PAYLOADS = [b"", b"\x00", bytes(range(256)) * 3]


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("payload", PAYLOADS, ids=len)
def test_encode_decode_round_trip(header: dict[str, Any], payload: bytes) -> None:
    frame = encode_frame(header, payload)
    got_header, got_payload = decode_frame(frame)
    assert got_header == header
    assert bytes(got_payload) == payload


@pytest.mark.parametrize("header", HEADERS)
def test_frame_layout_is_length_prefix_msgpack_header_then_payload(header: dict[str, Any]) -> None:
    payload = b"\x01\x02\x03\x04\x05"
    head = msgpack.packb(header, use_bin_type=True)
    assert encode_frame(header, payload) == struct.pack("<I", len(head)) + head + payload


def test_decode_accepts_a_hand_built_frame_and_a_memoryview_payload() -> None:
    head = msgpack.packb({"k": "v"}, use_bin_type=True)
    frame = struct.pack("<I", len(head)) + head + b"tail"
    header, payload = decode_frame(frame)
    assert header == {"k": "v"}
    assert bytes(payload) == b"tail"
    # a memoryview payload encodes the same as its bytes
    assert encode_frame({"k": "v"}, memoryview(b"tail")) == frame


def test_encode_frame_without_payload() -> None:
    header, payload = decode_frame(encode_frame({"a": 1}))
    assert header == {"a": 1}
    assert len(payload) == 0


@pytest.mark.parametrize("frame", [b"", b"\x01", b"\x01\x00\x00"], ids=len)
def test_truncated_length_prefix(frame: bytes) -> None:
    msg = re.escape(f"malformed data-plane frame: {len(frame)} bytes, shorter than the length prefix")
    with pytest.raises(FrameError, match=msg) as info:
        decode_frame(frame)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MoEServeError)


@pytest.mark.parametrize("n, rest", [(100, b"abc"), (1, b""), (0xFFFFFFFF, b"\x80" * 10)])
def test_header_length_past_the_end(n: int, rest: bytes) -> None:
    frame = struct.pack("<I", n) + rest
    msg = re.escape(f"malformed data-plane frame: header length {n} exceeds the frame ({len(frame)} bytes)")
    with pytest.raises(FrameError, match=msg):
        decode_frame(frame)


@pytest.mark.parametrize(
    "head",
    [
        b"\xc1",  # the one byte msgpack never uses
        b"\x92\x01",  # an array of 2 with only one element
        msgpack.packb({"a": 1}) + b"\x01",  # trailing bytes inside the header
        b"",  # an empty header is not a msgpack value
    ],
    ids=["reserved-byte", "truncated-array", "extra-data", "empty"],
)
def test_header_that_is_not_msgpack(head: bytes) -> None:
    frame = struct.pack("<I", len(head)) + head + b"payload"
    with pytest.raises(FrameError, match=re.escape("malformed data-plane frame: header is not msgpack")):
        decode_frame(frame)


@pytest.mark.parametrize("value", [[1, 2], 7, "text", None, b"raw"], ids=repr)
def test_header_that_is_not_a_map(value: Any) -> None:
    head = msgpack.packb(value, use_bin_type=True)
    frame = struct.pack("<I", len(head)) + head
    with pytest.raises(FrameError, match=re.escape("malformed data-plane frame: header is not a map")):
        decode_frame(frame)


# -- a live server ----------------------------------------------------------


def doubling_handler(header: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], Any]:
    if header.get("op") == "boom":
        raise RuntimeError("kaboom")
    x = wire.from_bytes(payload, header["dtype"], header["shape"])
    y = x * 2
    data, name, shape = wire.to_bytes(y)
    return {"dtype": name, "shape": list(shape), "request_ids": header.get("request_ids", [])}, data


@pytest.fixture(scope="module")
def call() -> Iterator[Any]:
    server, port = data_grpc.serve(doubling_handler, host="127.0.0.1", port=0, workers=2)
    channel = None
    try:
        assert port > 0
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=data_grpc.CHANNEL_OPTIONS)
        rpc = channel.unary_unary(data_grpc.METHOD, request_serializer=None, response_deserializer=None)
        yield lambda frame: rpc(frame, timeout=20)
    finally:
        if channel is not None:
            channel.close()
        server.stop(grace=None)


def request(x: torch.Tensor, **extra: Any) -> bytes:
    data, name, shape = wire.to_bytes(x)
    return encode_frame({"dtype": name, "shape": list(shape), **extra}, data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_server_answers_a_valid_frame(call: Any, dtype: torch.dtype) -> None:
    x = (torch.arange(24, dtype=torch.float32).reshape(4, 6) - 7.5).to(dtype)
    header, payload = decode_frame(call(request(x, request_ids=["r1", "r2"])))
    assert header == {"dtype": wire.NAMES[dtype], "shape": [4, 6], "request_ids": ["r1", "r2"]}
    y = wire.from_bytes(payload, header["dtype"], header["shape"])
    assert torch.equal(y, x + x)  # doubling is exact in every float dtype


def rpc_error(call: Any, frame: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(frame)
    return info.value


@pytest.mark.parametrize(
    "frame, detail",
    [
        (b"\x01", "shorter than the length prefix"),
        (struct.pack("<I", 50) + b"xx", "header length 50 exceeds the frame"),
        (struct.pack("<I", 1) + b"\xc1", "header is not msgpack"),
        (struct.pack("<I", 1) + b"\x90", "header is not a map"),
    ],
    ids=["prefix", "length", "msgpack", "map"],
)
def test_malformed_frame_is_invalid_argument(call: Any, frame: bytes, detail: str) -> None:
    err = rpc_error(call, frame)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed data-plane frame" in err.details()
    assert detail in err.details()


def test_handler_invalid_request_is_invalid_argument(call: Any) -> None:
    # a byte count that does not match the shape: wire raises InvalidRequestError inside the handler
    frame = encode_frame({"dtype": "float32", "shape": [2, 3]}, b"\x00" * 7)
    err = rpc_error(call, frame)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "7 bytes for shape [2, 3] of float32 (24 expected)" in err.details()
    err = rpc_error(call, encode_frame({"dtype": "int8", "shape": [1]}, b"\x00"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown dtype 'int8'" in err.details()


def test_handler_runtime_error_is_internal(call: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.CRITICAL, logger=data_grpc.__name__):
        err = rpc_error(call, encode_frame({"op": "boom"}))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "RuntimeError: kaboom"


def test_handler_key_error_is_reported(call: Any, caplog: pytest.LogCaptureFixture) -> None:
    # a header missing "dtype": KeyError is a LookupError, neither MoEServeError nor ValueError -> INTERNAL
    with caplog.at_level(logging.CRITICAL, logger=data_grpc.__name__):
        err = rpc_error(call, encode_frame({"shape": [1]}, b"\x00" * 4))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details().startswith("KeyError")


def test_server_keeps_serving_after_errors(call: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.CRITICAL, logger=data_grpc.__name__):
        for _ in range(3):
            assert rpc_error(call, b"\x00").code() == grpc.StatusCode.INVALID_ARGUMENT
            assert rpc_error(call, encode_frame({"op": "boom"})).code() == grpc.StatusCode.INTERNAL
    x = torch.tensor([[1.0, -2.0, 3.5]])
    header, payload = decode_frame(call(request(x)))
    assert header["shape"] == [1, 3]
    assert wire.from_bytes(payload, header["dtype"], header["shape"]).tolist() == [[2.0, -4.0, 7.0]]



# -- the ForwardStream method (one stream, many frames) -----------------------


@pytest.fixture(scope="module")
def stream_call() -> Iterator[Any]:
    """`exchange(frames) -> replies`: one ForwardStream carrying every frame in order."""
    server, port = data_grpc.serve(doubling_handler, host="127.0.0.1", port=0, workers=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=data_grpc.CHANNEL_OPTIONS)
    try:
        rpc = channel.stream_stream(data_grpc.STREAM_METHOD, request_serializer=None, response_deserializer=None)
        yield lambda frames: list(rpc(iter(frames), timeout=20))
    finally:
        channel.close()
        server.stop(grace=None)


def test_stream_answers_each_frame_in_order_echoing_its_seq(stream_call: Any) -> None:
    xs = [torch.full((i + 1, 3), float(i)) for i in range(6)]
    replies = stream_call([request(x, seq=100 + i) for i, x in enumerate(xs)])
    assert len(replies) == len(xs)
    for i, (x, reply) in enumerate(zip(xs, replies)):
        header, payload = decode_frame(reply)
        assert header["seq"] == 100 + i
        assert torch.equal(wire.from_bytes(payload, header["dtype"], header["shape"]), x * 2)


def test_stream_answers_bad_frames_with_error_frames_and_carries_on(stream_call: Any, caplog: pytest.LogCaptureFixture) -> None:
    x = torch.tensor([[1.0, -2.0]])
    frames = [
        request(x, seq=1),
        b"\x01",  # no header at all: an error frame without seq
        encode_frame({"dtype": "float32", "shape": [2, 3], "seq": 3}, b"\x00" * 7),  # wrong byte count
        encode_frame({"op": "boom", "seq": 4}),  # the handler fails
        request(x, seq=5),
    ]
    with caplog.at_level(logging.CRITICAL, logger=data_grpc.__name__):
        headers = [decode_frame(r)[0] for r in stream_call(frames)]
    assert [h.get("seq") for h in headers] == [1, None, 3, 4, 5]
    assert "error" not in headers[0] and "error" not in headers[4]
    assert headers[1]["error"]["code"] == "INVALID_ARGUMENT"
    assert "shorter than the length prefix" in headers[1]["error"]["message"]
    assert headers[2]["error"]["code"] == "INVALID_ARGUMENT"
    assert "7 bytes for shape [2, 3] of float32 (24 expected)" in headers[2]["error"]["message"]
    assert headers[3]["error"] == {"code": "INTERNAL", "message": "RuntimeError: kaboom"}
    failed = data_grpc.error_of(headers[3])
    assert failed is not None and (failed.code, failed.message) == ("INTERNAL", "RuntimeError: kaboom")
    assert data_grpc.error_of(headers[0]) is None


@pytest.mark.parametrize("bad", [
    {"counts": [1.5, 1.5]},          # a float count would shift a row onto the next slot
    {"counts": ["1", "2"]},
    {"experts": 1},
    {"layer": None},
    {"layer": 0.9},
    {"shape": 3},
    {"dtype": ["float32"]},
], ids=["float_counts", "string_counts", "int_experts", "null_layer", "float_layer", "int_shape", "list_dtype"])
def test_expert_group_refuses_a_header_of_the_wrong_types_as_invalid_argument(bad: dict) -> None:
    """An ExpertGroup's own data-plane handler (no Ray: the class as it is): wrong header types are the
    sender's error (INVALID_ARGUMENT), never INTERNAL, and never computed."""
    from expert_workers.group import ExpertGroup
    from expert_workers.source import SourceSpec
    from expert_workers.spec import MoESpec

    spec = MoESpec(hidden_size=8, intermediate_size=4, num_experts=4, num_layers=1, moe_layers=(0,))
    group = ExpertGroup("g", SourceSpec(random=spec, seed=1), [(0, 1), (0, 3)])
    channel = grpc.insecure_channel(group.grpc_address, options=data_grpc.CHANNEL_OPTIONS)
    try:
        rpc = channel.unary_unary(data_grpc.METHOD, request_serializer=None, response_deserializer=None)
        x = torch.ones(3, 8)
        data, name, shape = wire.to_bytes(x)
        good = {"dtype": name, "shape": list(shape), "layer": 0, "experts": [1, 3], "counts": [1, 2]}
        with pytest.raises(grpc.RpcError) as info:
            rpc(encode_frame({**good, **bad}, data), timeout=20)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert group.core.stats()["batches"] == 0
        answer, _ = decode_frame(rpc(encode_frame(good, data), timeout=20))
        assert answer["shape"] == [3, 8] and group.core.stats()["batches"] == 1
    finally:
        channel.close()
        group.shutdown()
