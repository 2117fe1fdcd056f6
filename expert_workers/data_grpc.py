"""The expert groups' gRPC data plane: framed raw tensors, no protobuf payloads, no pickle.

A frame is: 4-byte little-endian header length, a msgpack header, then the raw tensor
bytes. The request header carries layer, experts, counts, dtype, shape and request
ids; the response header dtype and shape (or an error). The service is one generic
unary method, `/moe.v1.ExpertData/Forward`, so no generated code is needed.
"""

from __future__ import annotations

import logging
import struct
from concurrent import futures
from typing import Any, Callable

import grpc
import msgpack

from expert_workers.errors import MoEServeError

METHOD = "/moe.v1.ExpertData/Forward"
SERVICE = "moe.v1.ExpertData"
# NOTE: a 4096-token batch of a 7168-wide model is 117 MB in float32; gRPC's 4 MB default would refuse it.
MAX_MESSAGE_BYTES = 1 << 30
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
_LEN = struct.Struct("<I")
log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], memoryview], tuple[dict[str, Any], Any]]


class FrameError(MoEServeError, ValueError):
    def __init__(self, *, problem: str) -> None:
        self._set(f"malformed data-plane frame: {problem}", problem=problem)


def encode_frame(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    return b"".join((_LEN.pack(len(head)), head, payload))


def decode_frame(buf: bytes) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(buf)
    if len(view) < _LEN.size:
        raise FrameError(problem=f"{len(view)} bytes, shorter than the length prefix")
    (n,) = _LEN.unpack_from(view)
    if _LEN.size + n > len(view):
        raise FrameError(problem=f"header length {n} exceeds the frame ({len(view)} bytes)")
    try:
        header = msgpack.unpackb(view[_LEN.size : _LEN.size + n], raw=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise FrameError(problem=f"header is not msgpack: {e}") from None
    if not isinstance(header, dict):
        raise FrameError(problem="header is not a map")
    return header, view[_LEN.size + n :]


def serve(handler: Handler, host: str = "127.0.0.1", port: int = 0, workers: int = 4) -> tuple[grpc.Server, int]:
    """Start a data-plane server calling `handler(header, payload) -> (header, payload)`; returns (server, port)."""

    def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            header, payload = decode_frame(request)
            out_header, out_payload = handler(header, payload)
            return encode_frame(out_header, out_payload)
        except (MoEServeError, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # the server keeps serving whatever one request does
            log.exception("data-plane request failed")
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        raise AssertionError("unreachable")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=CHANNEL_OPTIONS)
    rpc = grpc.unary_unary_rpc_method_handler(forward, request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Forward": rpc}),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the data-plane server to {host}:{port}")
    server.start()
    return server, bound
