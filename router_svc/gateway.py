"""The public gRPC gateway (`moe.v1.ExpertService`), served on a Router's own event loop.

The servicer only translates between protobuf and the Router; errors map to status
codes here and nowhere else. Health (`grpc.health.v1`) reports SERVING while every
expert group answers; reflection lists the services. Auth is a bearer token checked
by an interceptor; TLS and mutual TLS come from certificate files.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
from google.protobuf import any_pb2, message_factory
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from expert_workers import wire
from expert_workers.errors import BackPressureError, ConfigError, ExpertUnavailableError, InvalidRequestError, MoEServeError
from moe.v1 import expert_service_pb2 as pb
from moe.v1 import expert_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from router_svc.router import ForwardOutput, Router

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExpertService"].full_name
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
MAX_DIMS = 1 << 31
MAX_INTERNAL_MESSAGE = 200  # characters of an unexpected error's first line sent to the client


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # gRPC's own limit on one message; requests are bounded by tokens first.
    max_message_bytes: int = 256 << 20


class _BearerAuth(grpc.aio.ServerInterceptor):
    """Every RPC but the health check needs `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]], details: Any) -> Any:
        if details.method == HEALTH_CHECK:
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected):
            return await continuation(details)
        reason = "missing bearer token" if not given else "invalid bearer token"

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _fail(context, _Failure(code=grpc.StatusCode.UNAUTHENTICATED, message=reason))
            return b""

        async def deny_stream(requests: Any, context: grpc.aio.ServicerContext) -> None:
            _fail(context, _Failure(code=grpc.StatusCode.UNAUTHENTICATED, message=reason))

        handler = await continuation(details)
        if handler is not None and handler.request_streaming and handler.response_streaming:
            # a denial of the same kind as the method: the status ends the stream before any answer
            return grpc.stream_stream_rpc_method_handler(deny_stream, request_deserializer=lambda b: b, response_serializer=lambda b: b)
        return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=lambda b: b, response_serializer=lambda b: b)


def _tensor_in(t: pb.Tensor, field: str, hidden_size: int, max_tokens: int) -> Any:
    """A wire tensor -> torch tensor sharing the request's bytes.

    Its form (rank, dimensions, dtype, byte count, hidden size: each O(1)) is checked before the
    token limit, so a malformed request is INVALID_ARGUMENT and never told to come back later
    (RESOURCE_EXHAUSTED).
    """
    shape = list(t.shape)
    if len(shape) not in (2, 3):
        raise InvalidRequestError(field=f"{field}.shape", problem=f"rank {len(shape)} {shape}; expected [tokens, hidden] or [batch, seq, hidden]")
    if any(d < 0 or d >= MAX_DIMS for d in shape):
        raise InvalidRequestError(field=f"{field}.shape", problem=f"dimensions must be in [0, 2^31): {shape}")
    if t.dtype not in wire.DTYPES:
        raise InvalidRequestError(field=f"{field}.dtype", problem=f"unknown dtype {t.dtype!r}; expected one of {sorted(wire.DTYPES)}")
    x = wire.from_bytes(t.data, t.dtype, shape)  # byte count == prod(shape) * itemsize, else INVALID_ARGUMENT; no copy
    if shape[-1] != hidden_size:
        raise InvalidRequestError(field=field, problem=f"hidden size {shape[-1]} != model hidden size {hidden_size}")
    tokens = math.prod(shape[:-1])
    if tokens > max_tokens:
        raise BackPressureError(limit="tokens per request", value=tokens, maximum=max_tokens)
    return x


def _response(out: "ForwardOutput") -> pb.ForwardResponse:
    resp = pb.ForwardResponse(
        hidden_states=pb.Tensor(dtype=out.dtype, shape=list(out.hidden_states.shape), data=out.hidden_states.tobytes()),
        dropped_tokens=out.dropped, rerouted_tokens=out.rerouted, routing_table_version=out.routing_table_version,
        transport=out.transport, degraded_tokens=list(out.degraded_tokens),
    )
    if out.token_index is not None:
        resp.routing.token_index.extend(out.token_index.tolist())
        resp.routing.expert.extend(out.expert.tolist())
        resp.routing.weight.extend(out.weight.tolist())
    if out.stats is not None:
        s = out.stats
        resp.stats.CopyFrom(pb.RoutingStats(
            tokens_per_expert=list(s.tokens_per_expert), utilisation_entropy=s.utilisation_entropy,
            load_balancing_loss=s.load_balancing_loss, z_loss=s.z_loss, max_over_mean_load=s.max_over_mean_load,
        ))
    return resp


class _StreamWindow:
    """What one ForwardStream holds at once: requests read whose answers are not yet written.

    Bounded as the router's admission bounds its queue (`max_queued_requests` requests and
    `max_queued_tokens` tokens; one request alone always fits, so an oversized one still gets its
    own answer). The router frees a request's admission slot when it answers, before the answer
    is written; without this bound a client that sends and never reads would have the gateway
    read on and hold every answer. With it, the stream stops reading when full, and HTTP/2 flow
    control pushes back on the client.

    NOTE: one acquirer (the stream's read loop), so one event suffices; `release` is synchronous,
    safe in a `finally` of a cancelled task.
    """

    def __init__(self, *, max_requests: int, max_tokens: int) -> None:
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.requests = self.tokens = 0
        self._room = asyncio.Event()

    def _fits(self, tokens: int) -> bool:
        return self.requests == 0 or (self.requests < self.max_requests and self.tokens + tokens <= self.max_tokens)

    async def acquire(self, tokens: int) -> None:
        while not self._fits(tokens):
            self._room.clear()
            await self._room.wait()
        self.requests += 1
        self.tokens += tokens

    def release(self, tokens: int) -> None:
        self.requests -= 1
        self.tokens -= tokens
        self._room.set()


class ExpertServicer(pb_grpc.ExpertServiceServicer):
    def __init__(self, router: "Router") -> None:
        self.router = router
        self.stream_peak_held = 0  # the most requests one ForwardStream has held at once (see _StreamWindow)

    async def _forward(self, request: pb.ForwardRequest, traceparent: str) -> pb.ForwardResponse:
        """One request -> its answer; raises for one that fails (a MoEServeError, or anything unexpected)."""
        t0 = time.perf_counter()
        try:
            x = _tensor_in(request.hidden_states, "hidden_states", self.router.spec.hidden_size, self.router.config.max_tokens_per_request)
        except MoEServeError as e:  # refused here, before the router: counted as the router counts its own
            self.router.count_request(status_name(e), t0)
            raise
        # NOTE: int64 array, not a list of Python ints: a million ids would scatter ~36 MB of small objects.
        ids = np.asarray(request.token_ids, dtype=np.int64) if len(request.token_ids) else None
        out = await self.router.forward_tensor(x, int(request.layer), ids, bool(request.return_routing), request.request_id,
                                               traceparent=traceparent)
        return _response(out)

    async def Forward(self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext) -> pb.ForwardResponse:
        try:
            # NOTE: no wait_for on the deadline: gRPC cancels this handler's task when the call's
            # deadline passes or the client goes away (the answer would be DEADLINE_EXCEEDED either way).
            return await self._forward(request, _traceparent(context))
        except Exception as e:
            _fail(context, _failure(_logged(e, "Forward request %r", request.request_id)))
            return pb.ForwardResponse()

    async def ForwardStream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        """Every request read becomes its own task at once (so they batch together); each writes its
        answer, or its failure as a status, as soon as it is ready. The stream reads on only while
        its window has room (see _StreamWindow). The call ends OK once the client has stopped
        sending and every answer is out; cancelling it cancels what is left."""
        traceparent = _traceparent(context)
        write = asyncio.Lock()  # one write at a time on a stream
        c = self.router.config
        window = _StreamWindow(max_requests=c.max_queued_requests, max_tokens=c.max_queued_tokens)
        tasks: set[asyncio.Task] = set()

        async def one(seq: int, request: pb.ForwardRequest | InvalidRequestError, tokens: int) -> None:
            rid = ""
            try:
                try:
                    if isinstance(request, InvalidRequestError):
                        self.router.count_request(grpc.StatusCode.INVALID_ARGUMENT.name, time.perf_counter())
                        raise request
                    rid = request.request_id
                    answer = pb.ForwardStreamResponse(sequence=seq, request_id=rid, response=await self._forward(request, traceparent))
                except Exception as e:  # never a request without an answer on an open stream
                    f = _failure(_logged(e, "ForwardStream request %d (%r)", seq, rid))
                    answer = pb.ForwardStreamResponse(sequence=seq, request_id=rid, code=f.code.value[0], message=f.message)
                async with write:
                    await context.write(answer)
            finally:
                window.release(tokens)

        try:
            seq = 0
            async for raw in requests:
                request = _parse_stream_request(raw)
                del raw  # not kept while the loop waits for room: the parsed message has its own copy
                tokens = _tokens_of(request, c.max_tokens_per_request)
                await window.acquire(tokens)
                self.stream_peak_held = max(self.stream_peak_held, window.requests)
                task = asyncio.get_running_loop().create_task(one(seq, request, tokens))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                seq += 1
            while tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in list(tasks):
                task.cancel()

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        st = await self.router.service_status()
        return pb.StatusResponse(
            model=st["model"], routing_table_version=st["routing_table_version"],
            experts=[pb.ExpertStatus(**e) for e in st["experts"]],
            groups=[pb.GroupStatus(**g) for g in st["groups"]],
            routers=[pb.RouterStatus(**r) for r in st["routers"]],
            events=[pb.ControlEvent(**e) for e in st["events"]],
            supervisor_alive=st["supervisor_alive"], supervisor_restarts=st["supervisor_restarts"],
        )


def _parse_stream_request(raw: bytes) -> pb.ForwardRequest | InvalidRequestError:
    """One stream message -> its request, or the error its answer will carry (not raised: no traceback)."""
    try:
        return pb.ForwardRequest.FromString(raw)
    except DecodeError as e:
        return InvalidRequestError(field="request", problem=f"not a valid moe.v1.ForwardRequest message: {e}")


def _tokens_of(request: pb.ForwardRequest | InvalidRequestError, max_tokens: int) -> int:
    """The tokens a stream request's answer may carry (at most `max_tokens`: more is refused); 0 for a malformed one."""
    if isinstance(request, InvalidRequestError):
        return 0
    shape = request.hidden_states.shape
    if len(shape) not in (2, 3) or any(d < 0 for d in shape):
        return 0
    return min(math.prod(shape[:-1]), max_tokens)


def _traceparent(context: grpc.aio.ServicerContext) -> str:
    return dict(context.invocation_metadata() or ()).get("traceparent", "")


def _add_servicer(servicer: ExpertServicer, server: grpc.aio.Server) -> None:
    """Register every method of the service, each parsing its own requests.

    NOTE: registered the generated way, gRPC parses the request before any servicer code runs,
    and a body that is not a valid protobuf message (corrupt wire format, bad UTF-8 in a string)
    ends as UNKNOWN "Exception deserializing request"; parsed here it is INVALID_ARGUMENT (on a
    stream: that request's answer, and the stream carries on).
    """
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["ExpertService"].methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                getattr(servicer, method.name), response_serializer=response_cls.SerializeToString)
            continue
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _parsing(request_cls, getattr(servicer, method.name)), response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _parsing(request_cls: Any, method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A servicer method taking a message -> a handler taking the raw request bytes."""

    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = request_cls.FromString(raw)
        except DecodeError as e:
            err = InvalidRequestError(field="request", problem=f"not a valid {request_cls.DESCRIPTOR.full_name} message: {e}")
            _fail(context, _failure(err))
            return None
        return await method(request, context)

    return handler


@dataclass(frozen=True, kw_only=True)
class _Failure:
    """An error as its status: plain data, holding no exception (nor its traceback)."""

    code: grpc.StatusCode
    message: str
    quota_subject: str | None = None  # RESOURCE_EXHAUSTED: the limit, sent as a QuotaFailure detail


def _failure(e: BaseException) -> _Failure:
    """The one place errors map to status codes: an error that is no MoEServeError (a bug, a group's
    CUDA OOM arriving as a RayTaskError) is INTERNAL, with a one-line message (see _logged)."""
    if not isinstance(e, MoEServeError):
        return _Failure(code=grpc.StatusCode.INTERNAL, message=_internal_message(e))
    if isinstance(e, InvalidRequestError):
        return _Failure(code=grpc.StatusCode.INVALID_ARGUMENT, message=str(e))
    if isinstance(e, BackPressureError):
        return _Failure(code=grpc.StatusCode.RESOURCE_EXHAUSTED, message=str(e), quota_subject=e.limit)
    if isinstance(e, ExpertUnavailableError):
        return _Failure(code=grpc.StatusCode.UNAVAILABLE, message=str(e))
    return _Failure(code=grpc.StatusCode.FAILED_PRECONDITION, message=str(e))


def status_name(e: BaseException) -> str:
    """The status code name a request failing with `e` ends with (for the metrics: as `_failure` maps it)."""
    return grpc.StatusCode.CANCELLED.name if isinstance(e, asyncio.CancelledError) else _failure(e).code.name


def _internal_message(e: BaseException) -> str:
    """A short, one-line message for an unexpected error: its type and the first line of what it says.

    NOTE: a RayTaskError's text is the remote traceback; its `cause` is the error the actor raised.
    """
    cause = getattr(e, "cause", None)
    shown = cause if isinstance(cause, BaseException) else e
    first = next((line.strip() for line in str(shown).splitlines() if line.strip()), "")
    what = type(shown).__name__ + (f": {first}" if first else "")
    return f"internal error ({what[:MAX_INTERNAL_MESSAGE]})"


def _logged(e: BaseException, what: str, *args: Any) -> BaseException:
    """`e`, logged in full when it is unexpected (no MoEServeError), then stripped of its traceback.

    NOTE: drop the traceback: the error's frames hold the request's tensor and token ids, and
    anything keeping the error (a task, a cycle) would keep them until a full collection.
    """
    if not isinstance(e, MoEServeError):
        log.error("%s failed", what % args, exc_info=e)
    e.__traceback__ = None
    return e


def _fail(context: grpc.aio.ServicerContext, f: _Failure) -> None:
    """Set the call's status; the handler then returns, and gRPC sends the status, not the answer.

    NOTE: not `context.abort`: it raises, and gRPC keeps the raised error in a reference cycle
    whose traceback holds every frame it left, with their locals: the request, raw bytes and all,
    stays alive until a full garbage collection, and bad requests pile up in memory.
    """
    context.set_code(f.code)
    context.set_details(f.message)
    if f.quota_subject is not None:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=f.quota_subject, description=f.message),
        ]))
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=f.message, details=[detail])
        context.set_trailing_metadata(rpc_status.to_status(status).trailing_metadata)


class Gateway:
    """The server object: bind, serve, report health, stop."""

    def __init__(self, router: "Router", config: GatewayConfig) -> None:
        self.config = config
        interceptors = [_BearerAuth(config.token)] if config.token else []
        # NOTE: SO_REUSEPORT off: otherwise a second gateway silently shares a port that one already serves.
        opts = [("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes), ("grpc.so_reuseport", 0)]
        # NOTE: past this many RPCs in progress gRPC itself answers RESOURCE_EXHAUSTED at once, before
        # the call reaches the event loop (admission's request bound plus room for Status and health).
        self.server = grpc.aio.server(interceptors=interceptors, options=opts,
                                      maximum_concurrent_rpcs=router.config.max_queued_requests + 64)
        self.servicer = ExpertServicer(router)
        _add_servicer(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server)
        host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
        target = f"{host}:{config.port}"
        creds = None
        if config.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(_read(config.tls_key), _read(config.tls_cert))],
                root_certificates=_read(config.tls_client_ca) if config.tls_client_ca else None,
                require_client_auth=bool(config.tls_client_ca),
            )
        try:
            self.port = self.server.add_insecure_port(target) if creds is None else self.server.add_secure_port(target, creds)
        except RuntimeError:  # gRPC's "Failed to bind", which names neither the field nor a way out
            self.port = 0
        if self.port == 0:
            raise ConfigError(field="gateway.port", value=config.port,
                              expected=f"a port this node can bind on {config.host} ({target} is in use, not permitted or not this node's; "
                                       "0 picks a free one)")
        self.address = f"{host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(False)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)


def _read(path: str | None) -> bytes:
    assert path is not None
    with open(path, "rb") as f:
        return f.read()
