"""MoEClient: the Python client of the gRPC gateway, with the same interface as an in-cluster Deployment.

    client = MoEClient(["127.0.0.1:50051", "127.0.0.1:50052"], token="...")
    y = client.forward(x, layer=3)          # torch in -> torch out; numpy in -> numpy out

UNAVAILABLE (a gateway down, or the service unable to serve right now) is retried with
bounded exponential backoff across the listed gateways, within the call's deadline.
Other status codes map back to moe-serve's errors and are not retried.

`MoEClient(..., stream=True)` sends `forward` calls over one long-lived `ForwardStream` (shared
by every thread of the client) instead of one `Forward` call each: about half the round trip.
Errors, retries and deadlines behave the same; a request whose deadline passes is given up
by the client (its late answer is dropped), and a broken stream is reopened on the next gateway.
A stream that gave no answer at all while a request waited out its deadline (a stopped or wedged
router keeps it open) is retired: later calls open one on the next gateway, requests already on it
keep waiting to their own deadlines. A request over the message limit is refused for its caller
alone (on the shared stream gRPC would fail every request with it).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import queue
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expert_workers import wire
from expert_workers.errors import InvalidRequestError, MoEServeError
from moe.v1 import expert_service_pb2 as pb
from moe.v1 import expert_service_pb2_grpc as pb_grpc
from router_svc.local import RoutingReport
from router_svc.gate.stats import RoutingStats


class MoEService(Protocol):
    """What LocalMoE-like callers need; implemented by MoEClient and cluster.Deployment."""

    def forward(self, hidden_states: Any, layer: int, token_ids: Any = None, return_routing: bool = False) -> Any: ...

    def status(self) -> Any: ...

    def health(self) -> bool: ...


class RemoteError(MoEServeError):
    """The service answered with a non-OK status that has no more specific error here."""

    def __init__(self, *, code: str, details: str) -> None:
        self._set(f"{code}: {details}", code=code, details=details)


@dataclass(frozen=True, kw_only=True)
class TLSOptions:
    """PEM files: the CA that signed the gateway's cert; for mutual TLS also a client cert and key."""

    ca: str
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


_CODES = {c.value[0]: c for c in grpc.StatusCode}
MAX_MESSAGE = 256 << 20  # bytes of one request or answer on the client's channels, both ways
_END = object()


class _StreamFailed(Exception):
    """A stream request ended without an answer: the stream broke or the gateway answered a status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class _Stream:
    """One open ForwardStream on one gateway, shared by the client's threads: requests are queued
    to gRPC's sending thread, a reader thread hands each answer to the request it names."""

    def __init__(self, channel: grpc.Channel, metadata: list[tuple[str, str]]) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waiting: dict[int, cf.Future] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self.answers = 0  # answers read so far (a stream that gives none while a request waits may be hung)
        self.retired = False  # no new requests (see retire)
        self.broken: _StreamFailed | None = None
        rpc = channel.stream_stream("/moe.v1.ExpertService/ForwardStream", request_serializer=pb.ForwardRequest.SerializeToString,
                                    response_deserializer=pb.ForwardStreamResponse.FromString)
        self._call = rpc(iter(self._requests.get, _END), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="moe-client-stream", daemon=True)
        self._reader.start()

    def submit(self, request: pb.ForwardRequest) -> tuple[int, cf.Future]:
        fut: cf.Future = cf.Future()
        with self._lock:
            if self.broken is not None:
                raise self.broken
            seq, self._seq = self._seq, self._seq + 1
            self._waiting[seq] = fut
            self._requests.put(request)  # under the lock: the stream's order is the sequence order
        return seq, fut

    def forget(self, seq: int) -> None:
        with self._lock:
            self._waiting.pop(seq, None)
            idle = self.retired and not self._waiting
        if idle:
            self._end()

    def retire(self) -> None:
        """The gateway may have stopped answering (a stopped or wedged router keeps the stream open):
        later calls open another stream, on the next gateway; requests already waiting here keep
        waiting, each to its own deadline (a slow gateway still answers them), and the stream closes
        once none waits."""
        with self._lock:
            self.retired = True
            idle = not self._waiting
        if idle:
            self._end()

    def _end(self) -> None:
        self._requests.put(_END)
        self._call.cancel()

    def _fail(self, failure: _StreamFailed) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = failure
            waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            fut.set_exception(failure)

    def _read(self) -> None:
        failure = _StreamFailed(grpc.StatusCode.UNAVAILABLE, "the gateway ended the stream")
        try:
            for answer in self._call:
                with self._lock:
                    fut = self._waiting.pop(answer.sequence, None)
                    self.answers += 1
                    idle = self.retired and not self._waiting
                if fut is not None:
                    fut.set_result(answer)
                if idle:
                    self._end()
        except grpc.RpcError as e:
            failure = _StreamFailed(e.code(), e.details() or "")
        self._fail(failure)

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()
        self._reader.join(timeout=5)


class MoEClient:
    RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)

    def __init__(self, addresses: str | Sequence[str], token: str | None = None, tls: TLSOptions | None = None,
                 timeout: float = 30.0, max_attempts: int = 6, backoff_s: float = 0.05, stream: bool = False) -> None:
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self.addresses:
            raise ValueError("MoEClient needs at least one gateway address")
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
        if tls is not None:
            creds = grpc.ssl_channel_credentials(_read(tls.ca), _read(tls.key), _read(tls.cert))
            if tls.server_name:
                opts.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channels = [grpc.secure_channel(a, creds, options=opts) for a in self.addresses]
        else:
            self._channels = [grpc.insecure_channel(a, options=opts) for a in self.addresses]
        self._stubs = [pb_grpc.ExpertServiceStub(c) for c in self._channels]
        self._health = [health_pb2_grpc.HealthStub(c) for c in self._channels]
        self._next = itertools.count(random.randrange(len(self.addresses)))
        self._lock = threading.Lock()
        self.stream = stream
        self._stream: _Stream | None = None

    def _pause(self, attempt: int, deadline: float) -> None:
        """Bounded exponential backoff with jitter before the next attempt (none after the last)."""
        if attempt < self.max_attempts - 1:
            pause = min(self.backoff_s * (2**attempt), 1.0) * (0.5 + random.random() / 2)
            time.sleep(min(pause, max(deadline - time.monotonic(), 0)))

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        last: grpc.RpcError | None = None
        for attempt in range(self.max_attempts):
            with self._lock:
                i = next(self._next) % len(self._stubs)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return getattr(self._stubs[i], method)(request, metadata=self._metadata, timeout=remaining)
            except grpc.RpcError as e:
                if e.code() not in self.RETRYABLE:
                    raise _map_error(e) from None
                last = e
                self._pause(attempt, deadline)
        if last is None:
            raise RemoteError(code="DEADLINE_EXCEEDED", details="deadline passed before any attempt")
        raise _map_error(last)

    def _open_stream(self) -> _Stream:
        with self._lock:
            if self._stream is None or self._stream.broken is not None or self._stream.retired:
                old, i = self._stream, next(self._next) % len(self._channels)
                self._stream = _Stream(self._channels[i], self._metadata)
                if old is not None and not old.retired:  # a retired one ends itself once its waiters have their answers
                    threading.Thread(target=old.close, daemon=True).start()
            return self._stream

    def _forward_call(self, request: pb.ForwardRequest, timeout: float | None) -> pb.ForwardResponse:
        if not self.stream:
            return self._call("Forward", request, timeout)
        size = request.ByteSize()
        if size > MAX_MESSAGE:  # refused here, for this caller alone: gRPC would fail the shared stream
            raise RemoteError(code="RESOURCE_EXHAUSTED", details=f"a request of {size} bytes exceeds the message limit of {MAX_MESSAGE} bytes")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        last: _StreamFailed | None = None
        for attempt in range(self.max_attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            stream = self._open_stream()
            try:
                answers = stream.answers
                seq, fut = stream.submit(request)
                try:
                    answer = fut.result(timeout=remaining)
                except cf.TimeoutError:
                    stream.forget(seq)
                    if stream.answers == answers:  # not one answer while this waited: the gateway may hang
                        stream.retire()
                    raise RemoteError(code="DEADLINE_EXCEEDED", details=f"no answer on the stream within {remaining:.3g} s") from None
                if answer.code == 0:
                    return answer.response
                raise _StreamFailed(_CODES.get(answer.code, grpc.StatusCode.UNKNOWN), answer.message)
            except _StreamFailed as e:
                if e.code not in self.RETRYABLE:
                    raise _map_status(e.code, e.details) from None
                last = e
                self._pause(attempt, deadline)
        if last is None:
            raise RemoteError(code="DEADLINE_EXCEEDED", details="deadline passed before any attempt")
        raise _map_status(last.code, last.details)

    def forward(self, hidden_states: torch.Tensor | np.ndarray, layer: int, token_ids: Any = None,
                return_routing: bool = False, timeout: float | None = None, request_id: str = "") -> Any:
        as_numpy = isinstance(hidden_states, np.ndarray)
        t = torch.from_numpy(np.ascontiguousarray(hidden_states)) if as_numpy else hidden_states
        data, dtype, shape = wire.to_bytes(t)
        ids = [] if token_ids is None else np.asarray(token_ids.cpu() if isinstance(token_ids, torch.Tensor) else token_ids).reshape(-1).tolist()
        req = pb.ForwardRequest(layer=int(layer), hidden_states=pb.Tensor(dtype=dtype, shape=list(shape), data=bytes(data)),
                                token_ids=ids, return_routing=return_routing, request_id=request_id)
        resp: pb.ForwardResponse = self._forward_call(req, timeout)
        h = resp.hidden_states
        y = wire.from_bytes(h.data, h.dtype, list(h.shape)).clone()
        out: Any = y.numpy() if as_numpy else y
        if not return_routing:
            return out
        s = resp.stats
        stats = RoutingStats(tokens_per_expert=tuple(s.tokens_per_expert), dropped=resp.dropped_tokens,
                             rerouted=resp.rerouted_tokens, utilisation_entropy=s.utilisation_entropy,
                             load_balancing_loss=s.load_balancing_loss, z_loss=s.z_loss, max_over_mean_load=s.max_over_mean_load)
        report = RoutingReport(token_index=torch.tensor(list(resp.routing.token_index), dtype=torch.int64),
                               expert=torch.tensor(list(resp.routing.expert), dtype=torch.int64),
                               weight=torch.tensor(list(resp.routing.weight), dtype=torch.float32), stats=stats)
        return out, report

    def forward_response(self, hidden_states: torch.Tensor, layer: int, timeout: float | None = None) -> pb.ForwardResponse:
        """The raw ForwardResponse (transport, degraded tokens, table version) for one request."""
        data, dtype, shape = wire.to_bytes(hidden_states)
        req = pb.ForwardRequest(layer=int(layer), hidden_states=pb.Tensor(dtype=dtype, shape=list(shape), data=bytes(data)))
        return self._forward_call(req, timeout)

    def status(self, timeout: float | None = None) -> pb.StatusResponse:
        return self._call("Status", pb.StatusRequest(), timeout)

    def health(self, timeout: float = 5.0) -> bool:
        """True when at least one gateway reports SERVING."""
        for stub in self._health:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                continue
        return False

    def close(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        for c in self._channels:
            c.close()

    def __enter__(self) -> "MoEClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map_error(e: grpc.RpcError) -> MoEServeError:
    return _map_status(e.code(), e.details() or "")


def _map_status(code: grpc.StatusCode, details: str) -> MoEServeError:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        m = re.match(r"^invalid request field '([^']*)': (.*)$", details, re.S)
        return InvalidRequestError(field=m.group(1), problem=m.group(2)) if m else InvalidRequestError(field="request", problem=details)
    return RemoteError(code=code.name, details=details)
