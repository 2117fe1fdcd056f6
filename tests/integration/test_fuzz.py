"""Bad input at scale: hypothesis-driven requests against a live gateway.

Over 1,000 derandomized cases (valid requests, requests with malformed fields, and raw bytes sent as
the whole request) go to one gateway over a raw channel. Each must end with the status an oracle
predicts from the request alone: OK (the answer equal to LocalMoE's), INVALID_ARGUMENT naming what is
wrong, or RESOURCE_EXHAUSTED with a QuotaFailure for more tokens than the limit; never UNKNOWN,
INTERNAL or a hang (a 10 s deadline per call). Afterwards the router's resident memory has grown by
less than 200 MB and a correct request still gets the exact answer.

The oracle states the gateway's order of checks: the message parses; the tensor's form (rank,
dimensions in [0, 2^31), dtype); the token limit; the byte count; then admission (layer, hidden size,
finite values, token id count). NaN and Inf in the input are INVALID_ARGUMENT ("contains NaN or Inf").
Finite inputs are accepted whatever their magnitude; where such an input overflows inside the model
the answer may hold Inf or NaN as LocalMoE's does, so only its finite rows are compared.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
import ray
import torch
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from cluster import deploy
from moe.v1 import expert_service_pb2 as pb
from moe.v1 import expert_service_pb2_grpc as pb_grpc
from router_svc import LocalMoE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = dict(hidden_size=16, intermediate_size=24, num_experts=4, num_layers=3, moe_layers=[0, 2])
D = SPEC["hidden_size"]
LAYERS = SPEC["num_layers"]
MOE_LAYERS = (0, 2)
TOP_K = 2  # the default routing policy: softmax top-2, dropless
MAX_TOKENS = 64  # gateway.max_tokens_per_request: small, so over-limit requests are cheap to build
CALL_TIMEOUT = 10.0  # seconds per call; DEADLINE_EXCEEDED fails the case
READY_TIMEOUT = 300.0
RSS_GROWTH_LIMIT = 200 << 20
# cases per @given test; together >= 1,000
VALID_CASES, MALFORMED_CASES, RAW_CASES = 250, 550, 300
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BITS = {"float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16}
# bit patterns: quiet / signalling / negative NaN, +Inf, -Inf
NONFINITE_BITS = {
    "float32": (0x7FC00000, 0x7FA00001, -1, 0x7F800000, -0x00800000),
    "float16": (0x7E00, 0x7D01, -1, 0x7C00, -0x0400),
    "bfloat16": (0x7FC0, 0x7FA1, -1, 0x7F80, -0x0080),
}


# -- wire helpers and the oracle -----------------------------------------------------------------


def _encode(x: torch.Tensor) -> bytes:
    name = next(k for k, v in TORCH.items() if v == x.dtype)
    return x.contiguous().view(BITS[name]).numpy().tobytes()


def _decode(t: pb.Tensor) -> torch.Tensor:
    """A well-formed wire tensor -> torch tensor (a copy)."""
    bits = torch.frombuffer(bytearray(t.data), dtype=BITS[t.dtype]) if t.data else torch.empty(0, dtype=BITS[t.dtype])
    return bits.view(TORCH[t.dtype]).reshape(list(t.shape))


@dataclass(frozen=True, kw_only=True)
class Expect:
    code: grpc.StatusCode
    pattern: str = ""  # a regex the status details must match


def _invalid(pattern: str) -> Expect:
    return Expect(code=grpc.StatusCode.INVALID_ARGUMENT, pattern=r"invalid request field " + pattern)


def expected(req: pb.ForwardRequest) -> Expect:
    """The status the gateway must answer `req` with, in the order it checks."""
    t = req.hidden_states
    shape = list(t.shape)
    if len(shape) not in (2, 3):
        return _invalid(rf"'hidden_states.shape': rank {len(shape)} ")
    if any(d < 0 or d >= 1 << 31 for d in shape):
        return _invalid(r"'hidden_states.shape': dimensions must be in \[0, 2\^31\)")
    if t.dtype not in ITEMSIZE:
        return _invalid(rf"'hidden_states.dtype': unknown dtype {re.escape(repr(t.dtype))}")
    want = math.prod(shape) * ITEMSIZE[t.dtype]
    if len(t.data) != want:
        return _invalid(rf"'data': {len(t.data)} bytes for shape .* \({want} expected\)")
    if shape[-1] != D:
        return _invalid(rf"'hidden_states': hidden size {shape[-1]} != model hidden size {D}")
    tokens = math.prod(shape[:-1])
    if tokens > MAX_TOKENS:
        return Expect(code=grpc.StatusCode.RESOURCE_EXHAUSTED, pattern=rf"^tokens per request: {tokens} exceeds the limit of {MAX_TOKENS}$")
    if req.layer >= LAYERS:
        return _invalid(rf"'layer': layer {req.layer} out of range \[0, {LAYERS}\)")
    if req.layer not in MOE_LAYERS:
        return _invalid(rf"'layer': layer {req.layer} is not an MoE layer")
    if not bool(torch.isfinite(_decode(t)).all()):
        return _invalid(r"'hidden_states': contains NaN or Inf")
    if len(req.token_ids) and len(req.token_ids) != tokens:
        return _invalid(rf"'token_ids': {len(req.token_ids)} ids .* for {tokens} tokens")
    return Expect(code=grpc.StatusCode.OK)


def expected_raw(raw: bytes) -> Expect:
    try:
        return expected(pb.ForwardRequest.FromString(raw))
    except DecodeError:
        return _invalid(r"'request': not a valid moe.v1.ForwardRequest message")


# -- the deployment --------------------------------------------------------------------------------


def _rss_bytes(actor_self) -> int:
    """Resident memory of the calling actor's process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, kw_only=True)
class Target:
    """What the fuzz tests share (fields kept out of the repr hypothesis prints for a failing case)."""

    address: str
    stub: pb_grpc.ExpertServiceStub = field(repr=False)
    channel: grpc.Channel = field(repr=False)
    router: "ray.actor.ActorHandle" = field(repr=False)
    ref: LocalMoE = field(repr=False)
    rss_before: int = field(repr=False)
    tally: Counter = field(repr=False)  # (test, status name) -> cases


@pytest.fixture(scope="module")
def target(ray_local, request) -> Target:
    dep = deploy({
        "model": {"random": SPEC, "seed": 1},
        "gateway": {"port": 0, "max_tokens_per_request": MAX_TOKENS},
        "deployment": {"name": "fuzz", "expert_groups": 1, "routers": 1, "transport": "object_store"},
    })
    request.addfinalizer(dep.shutdown)
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    channel = grpc.insecure_channel(dep.gateway_addresses[0], options=opts)
    request.addfinalizer(channel.close)
    _wait_serving(channel)
    ref = LocalMoE.from_config(SPEC, seed=1)
    stub = pb_grpc.ExpertServiceStub(channel)
    for layer in MOE_LAYERS:  # warm both layers on both sides before the memory baseline
        for dtype in TORCH.values():
            _assert_serves(stub, ref, layer, torch.randn(8, D).to(dtype))
    router = dep.routers[0]
    return Target(address=dep.gateway_addresses[0], stub=stub, channel=channel,
                  router=router, ref=ref, rss_before=ray.get(router.__ray_call__.remote(_rss_bytes)), tally=Counter())


def _wait_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "the gateway never reported SERVING"
        time.sleep(0.2)


def _assert_serves(stub: pb_grpc.ExpertServiceStub, ref: LocalMoE, layer: int, x: torch.Tensor) -> None:
    name = next(k for k, v in TORCH.items() if v == x.dtype)
    req = pb.ForwardRequest(layer=layer, hidden_states=pb.Tensor(dtype=name, shape=list(x.shape), data=_encode(x)))
    resp = stub.Forward(req, timeout=CALL_TIMEOUT)
    _assert_answer(req, resp, ref, strict=True)


# -- checking one case -----------------------------------------------------------------------------


def _rel(y: torch.Tensor, want: torch.Tensor) -> float:
    y, want = y.double(), want.double()
    return float((y - want).norm() / max(float(want.norm()), 1e-300)) if want.numel() else 0.0


def _assert_answer(req: pb.ForwardRequest, resp: pb.ForwardResponse, ref: LocalMoE, strict: bool) -> None:
    """An OK answer: same dtype and shape as the request, equal to LocalMoE's.

    strict (inputs of moderate magnitude): every value finite, relative error < 1e-5 (float32; 1e-2 for
    half precision, rounded once more on the way out), routing as LocalMoE's. Otherwise only the
    token rows where LocalMoE's answer is finite are compared.
    """
    t = req.hidden_states
    assert resp.hidden_states.dtype == t.dtype and list(resp.hidden_states.shape) == list(t.shape)
    assert len(resp.hidden_states.data) == len(t.data)
    x, y = _decode(t), _decode(resp.hidden_states)
    ids = torch.tensor(list(req.token_ids)) if len(req.token_ids) else None
    want, report = ref.forward(x, req.layer, token_ids=ids, return_routing=True)
    tol = 1e-5 if t.dtype == "float32" else 1e-2
    if strict:
        assert bool(torch.isfinite(y).all()), "a finite, moderate input got a non-finite answer"
        assert _rel(y, want) < tol, _rel(y, want)
    else:
        rows = torch.isfinite(want.reshape(-1, D)).all(dim=-1)
        assert _rel(y.reshape(-1, D)[rows], want.reshape(-1, D)[rows]) < tol
    tokens = x.numel() // D
    assert resp.HasField("routing") == req.return_routing
    if req.return_routing:
        assert len(resp.routing.token_index) == len(resp.routing.expert) == len(resp.routing.weight) == tokens * TOP_K
        if strict:
            assert list(resp.routing.expert) == report.expert.tolist()
            assert list(resp.routing.token_index) == report.token_index.tolist()


def _raw(target: Target, method: str) -> grpc.UnaryUnaryMultiCallable:
    """A call of `method` taking and returning raw bytes: the body reaches the gateway unparsed."""
    return target.channel.unary_unary(f"/moe.v1.ExpertService/{method}", request_serializer=None, response_deserializer=None)


def _call(target: Target, case: str, req: pb.ForwardRequest | None = None, raw: bytes | None = None) -> None:
    """Send one case (a message, or raw bytes as the whole request) and check its status against the oracle."""
    want = expected(req) if req is not None else expected_raw(raw)
    try:
        if req is not None:
            resp = target.stub.Forward(req, timeout=CALL_TIMEOUT)
        else:
            resp = pb.ForwardResponse.FromString(_raw(target, "Forward")(raw, timeout=CALL_TIMEOUT))
        code, details, err = grpc.StatusCode.OK, "", None
    except grpc.RpcError as e:
        code, details, err, resp = e.code(), e.details() or "", e, None
    target.tally[(case, code.name)] += 1
    note(f"expected {want}, got {code.name}: {details}")
    assert code == want.code, f"expected {want.code.name} /{want.pattern}/, got {code.name}: {details}"
    if code == grpc.StatusCode.OK:
        parsed = req if req is not None else pb.ForwardRequest.FromString(raw)
        _assert_answer(parsed, resp, target.ref, strict=case == "valid")
        return
    assert re.search(want.pattern, details), f"{code.name} details {details!r} do not match /{want.pattern}/"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        status = rpc_status.from_call(err)
        assert status is not None, "RESOURCE_EXHAUSTED without google.rpc.Status details"
        qf = error_details_pb2.QuotaFailure()
        assert len(status.details) == 1 and status.details[0].Unpack(qf)
        assert [v.subject for v in qf.violations] == ["tokens per request"]


# -- strategies ------------------------------------------------------------------------------------


@st.composite
def valid_requests(draw) -> pb.ForwardRequest:
    """A correct request: [T, D] or [B, S, D] with T <= MAX_TOKENS (empty ones too), values of moderate
    magnitude with zeros, -0.0 and subnormals mixed in, maybe token ids (any int64: the default
    routing policy ignores their values), routing, a request id."""
    dtype = draw(st.sampled_from(sorted(TORCH)))
    if draw(st.booleans()):
        lead = [draw(st.integers(1, 4)), draw(st.integers(1, MAX_TOKENS // 4))]
    else:
        lead = [draw(st.integers(1, MAX_TOKENS))]
    # NOTE: generation re-draws many values as their simplest (0, the first element): so an empty
    # request is the rarer draw, not the simplest one.
    if draw(st.integers(0, 9)) == 9:
        lead[draw(st.integers(0, len(lead) - 1))] = 0
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = torch.randn(*lead, D, generator=gen) * draw(st.sampled_from([1.0, 1e-3, 0.1, 10.0, 100.0]))
    flat = x.view(-1)
    for value in draw(st.lists(st.sampled_from([0.0, -0.0, 1e-40, -1e-45, 1e-30]), max_size=4)):
        if flat.numel():
            flat[draw(st.integers(0, flat.numel() - 1))] = value
    tokens = math.prod(lead)
    ids = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=tokens, max_size=tokens)) if tokens and draw(st.booleans()) else []
    return pb.ForwardRequest(
        layer=draw(st.sampled_from(MOE_LAYERS)),
        hidden_states=pb.Tensor(dtype=dtype, shape=[*lead, D], data=_encode(x.to(TORCH[dtype]))),
        token_ids=ids, return_routing=draw(st.booleans()), request_id=draw(st.text(max_size=40)),
    )


def _any_index(draw, n: int) -> int:
    return draw(st.integers(0, n - 1))


def _tokens(req: pb.ForwardRequest) -> int:
    return math.prod(list(req.hidden_states.shape)[:-1]) if len(req.hidden_states.shape) else 0


def _zeros_for(req: pb.ForwardRequest) -> None:
    """Data of zeros matching the shape, where that is a few megabytes at most."""
    t = req.hidden_states
    n = math.prod(list(t.shape)) * ITEMSIZE.get(t.dtype, 4)
    if 0 <= n <= 4 << 20 and min(t.shape, default=0) >= 0:
        t.data = bytes(n)


def _set_shape(req: pb.ForwardRequest, shape: list[int]) -> None:
    del req.hidden_states.shape[:]
    req.hidden_states.shape.extend(shape)


def _mutate_dtype(draw, req):
    req.hidden_states.dtype = draw(st.one_of(
        st.sampled_from(["float64", "int8", "int32", "Float32", "float32 ", " float16", "bf16", "", "float",
                         "bfloat16\x00", "torch.float32", "f4", "<f4", "FLOAT16", "float8_e4m3fn", "complex64"]),
        st.text(max_size=16)))


def _mutate_rank(draw, req):
    rank = draw(st.sampled_from([0, 1, 4, 5, 8, 33]))
    _set_shape(req, draw(st.lists(st.integers(0, 2 * D), min_size=rank, max_size=rank)))


def _mutate_negative_dim(draw, req):
    shape = list(req.hidden_states.shape)
    if not shape:
        return
    shape[_any_index(draw, len(shape))] = draw(st.one_of(st.sampled_from([-1, -D, -(2**31), -(2**63)]), st.integers(-(2**63), -1)))
    _set_shape(req, shape)


def _mutate_huge_dim(draw, req):
    shape = list(req.hidden_states.shape)
    if not shape:
        return
    shape[_any_index(draw, len(shape))] = draw(st.one_of(
        st.sampled_from([2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1]), st.integers(2**20, 2**63 - 1)))
    _set_shape(req, shape)


def _mutate_dim_off_by(draw, req):
    """A dimension that disagrees with the data (or, last, the model's hidden size)."""
    shape = list(req.hidden_states.shape)
    if not shape:
        return
    i = _any_index(draw, len(shape))
    shape[i] = max(0, shape[i] + draw(st.sampled_from([-3, -1, 1, 2, 7])))
    _set_shape(req, shape)


def _mutate_hidden_size(draw, req):
    """Data that matches its shape, whose last dimension is not the model's hidden size."""
    hidden = draw(st.integers(0, 3 * D).filter(lambda h: h != D))
    _set_shape(req, [*list(req.hidden_states.shape)[:-1], hidden])
    _zeros_for(req)


def _mutate_over_limit(draw, req):
    """More tokens than the limit, with matching data or none."""
    tokens = draw(st.one_of(st.integers(MAX_TOKENS + 1, 4 * MAX_TOKENS), st.sampled_from([2**20, 2**31 - 1])))
    _set_shape(req, [tokens, D] if draw(st.booleans()) else [2, -(-tokens // 2), D])
    if draw(st.booleans()):
        _zeros_for(req)


def _mutate_truncate(draw, req):
    t = req.hidden_states
    t.data = t.data[: draw(st.integers(0, max(len(t.data) - 1, 0)))]


def _mutate_extend(draw, req):
    req.hidden_states.data += draw(st.binary(min_size=1, max_size=64))


def _mutate_random_data(draw, req):
    req.hidden_states.data = draw(st.binary(max_size=4096))


def _mutate_random_data_exact(draw, req):
    """Random bytes of exactly the right length: any finite values (huge ones too), maybe NaN/Inf."""
    t = req.hidden_states
    n = len(t.data)
    if n <= 4096:
        t.data = draw(st.binary(min_size=n, max_size=n))
    else:
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
        t.data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).numpy().tobytes()


def _mutate_huge_data(draw, req):
    """Megabytes of data: for its shape, or for a shape far over the token limit."""
    t = req.hidden_states
    n = draw(st.integers(1 << 20, 8 << 20))
    if draw(st.booleans()):
        _set_shape(req, [n // (D * 4), D])
        n = n // (D * 4) * D * ITEMSIZE.get(t.dtype, 4)
    t.data = bytes([draw(st.integers(0, 255))]) * n


def _mutate_nonfinite(draw, req):
    t = req.hidden_states
    if t.dtype not in ITEMSIZE or not t.data or len(t.data) % ITEMSIZE[t.dtype]:
        return
    bits = torch.frombuffer(bytearray(t.data), dtype=BITS[t.dtype]).clone()
    for _ in range(draw(st.integers(1, 3))):
        bits[_any_index(draw, bits.numel())] = draw(st.sampled_from(NONFINITE_BITS[t.dtype]))
    t.data = bits.numpy().tobytes()


def _mutate_extreme(draw, req):
    """Finite values at the edge of the dtype's range (largest, smallest subnormal)."""
    t = req.hidden_states
    if t.dtype not in ITEMSIZE or not t.data or len(t.data) % ITEMSIZE[t.dtype]:
        return
    x = torch.frombuffer(bytearray(t.data), dtype=BITS[t.dtype]).clone().view(TORCH[t.dtype])
    info = torch.finfo(TORCH[t.dtype])
    for _ in range(draw(st.integers(1, 3))):
        x[_any_index(draw, x.numel())] = draw(st.sampled_from([info.max, -info.max, info.tiny, info.smallest_normal / 4]))
    t.data = x.view(BITS[t.dtype]).numpy().tobytes()


def _mutate_layer(draw, req):
    req.layer = draw(st.one_of(st.sampled_from([1, 3, 4, 100, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)))


def _mutate_token_count(draw, req):
    tokens = _tokens(req)
    n = draw(st.integers(1, min(max(tokens, 0), 4 * MAX_TOKENS) + 8).filter(lambda k: k != tokens))
    del req.token_ids[:]
    req.token_ids.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n)))


def _mutate_many_token_ids(draw, req):
    """Up to a million ids (megabytes of packed varints) for a few tokens."""
    del req.token_ids[:]
    req.token_ids.extend(range(-1, draw(st.integers(1 << 12, 1 << 20))))


def _mutate_token_values(draw, req):
    """Ids of the right count with any int64 value: negative, far out of any vocabulary (accepted)."""
    n = len(req.token_ids)
    del req.token_ids[:]
    # NOTE: Hypothesis draws lists of at most 8192 elements (more is InvalidArgument): a longer count repeats them.
    m = min(n, 8192)
    values = draw(st.lists(st.sampled_from([-1, -(2**63), 2**63 - 1, 2**40, 0]), min_size=m, max_size=m))
    req.token_ids.extend((values * (n // m + 1))[:n] if m else [])


def _mutate_request_id(draw, req):
    req.request_id = draw(st.one_of(st.text(max_size=200), st.just("x" * 100_000)))


MUTATIONS = (_mutate_nonfinite, _mutate_dtype, _mutate_rank, _mutate_negative_dim, _mutate_huge_dim, _mutate_dim_off_by, _mutate_hidden_size,
             _mutate_over_limit, _mutate_truncate, _mutate_extend, _mutate_random_data, _mutate_random_data_exact,
             _mutate_huge_data, _mutate_extreme, _mutate_layer, _mutate_token_count,
             _mutate_many_token_ids, _mutate_token_values, _mutate_request_id)


@st.composite
def malformed_requests(draw) -> pb.ForwardRequest:
    """A valid request with one to three of its fields broken (some mutations leave it valid)."""
    # NOTE: the mutations are drawn first, as an index modulo their count: drawn after the request
    # (or with sampled_from), generation picked the first one for about 40% of cases; the first
    # is still the likeliest, so it is NaN/Inf, which reaches the deepest check.
    chosen = [MUTATIONS[i % len(MUTATIONS)] for i in draw(st.lists(st.integers(0, 2**16 - 1), min_size=1, max_size=3))]
    req = pb.ForwardRequest()
    req.CopyFrom(draw(valid_requests()))
    for mutate in chosen:
        note(mutate.__name__)
        mutate(draw, req)
    return req


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


# Fields of the wrong wire type or number, overlong varints, lengths past the end, bad UTF-8, groups.
CRAFTED = st.sampled_from([
    _tag(3, 1) + b"\x01" * 8,                      # token_ids as fixed64
    _tag(3, 5) + b"\x01" * 4,                      # token_ids as fixed32
    _tag(3, 2) + b"\x03\xff\xff\xff",              # packed token_ids, a truncated varint inside
    _tag(1, 2) + b"\x02ab",                        # layer as bytes
    _tag(1, 0) + _varint(2**40),                   # layer past uint32 (protobuf truncates it)
    _tag(1, 0) + b"\xff" * 11,                     # an overlong varint
    _tag(2, 0) + b"\x05",                          # hidden_states as a varint
    _tag(2, 2) + _varint(2**40) + b"\x00",         # a length far past the end
    _tag(2, 2) + b"\x04" + _tag(1, 2) + b"\x02\xc3\x28",  # hidden_states.dtype with bad UTF-8
    _tag(5, 2) + b"\x02\xff\xfe",                  # request_id with bad UTF-8
    _tag(2, 3) + _tag(2, 4),                       # a group (deprecated wire types)
    _tag(2, 4),                                    # an end-group without a start
    b"\x00",                                       # field number 0
    _tag(2**29 - 1, 0) + b"\x01",                  # the largest field number (unknown: skipped)
    _tag(7, 6) + b"\x00",                          # wire type 6 does not exist
    _tag(2, 2) + b"\x03" + _tag(2, 0) + _varint(2**63),  # a shape dimension as a huge unsigned varint
])


@st.composite
def raw_requests(draw) -> bytes:
    """Bytes sent as the whole request: random; a valid request truncated, flipped, extended; crafted fields."""
    valid = draw(valid_requests()).SerializeToString()
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "appended", "crafted"]))
    note(kind)
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "truncated":
        return valid[: draw(st.integers(0, max(len(valid) - 1, 0)))]
    if kind == "flipped":
        buf = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            if buf:
                buf[_any_index(draw, len(buf))] = draw(st.integers(0, 255))
        return bytes(buf)
    if kind == "appended":
        return valid + draw(st.binary(min_size=1, max_size=64))
    pieces = draw(st.lists(CRAFTED, min_size=1, max_size=2))
    return valid + b"".join(pieces) if draw(st.booleans()) else b"".join(pieces) + valid


# -- the tests -------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=VALID_CASES)
@given(req=valid_requests())
def test_valid_requests_equal_local_moe(target, req) -> None:
    assert expected(req).code == grpc.StatusCode.OK
    _call(target, "valid", req=req)


@settings(FUZZ, max_examples=MALFORMED_CASES)
@given(req=malformed_requests())
# malformed and far over the limit: INVALID_ARGUMENT, never "come back later"
@example(req=pb.ForwardRequest(layer=0, hidden_states=pb.Tensor(dtype="float32", shape=[2**20, 2**20, 1, D])))
@example(req=pb.ForwardRequest(layer=0, hidden_states=pb.Tensor(dtype="float64", shape=[2**20, D])))
def test_malformed_fields_get_their_status(target, req) -> None:
    _call(target, "malformed", req=req)


@settings(FUZZ, max_examples=RAW_CASES)
@given(raw=raw_requests())
@example(raw=b"\xff\xff\xff")  # corrupt wire format
@example(raw=b"\x2a\x02\xff\xfe")  # request_id with bad UTF-8
def test_random_bytes_as_the_request_get_their_status(target, raw) -> None:
    _call(target, "raw", raw=raw)


def test_status_with_a_corrupt_request_is_invalid_argument(target) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _raw(target, "Status")(b"\x0a\xff", timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert re.search(r"'request': not a valid moe.v1.StatusRequest message", info.value.details())
    assert pb.StatusResponse.FromString(_raw(target, "Status")(b"", timeout=CALL_TIMEOUT)).model


def test_after_the_fuzz_memory_is_bounded_and_a_correct_request_succeeds(target) -> None:
    """Runs last: the module's fuzz tests above fill the tally."""
    total = sum(target.tally.values())
    assert total >= 1000, f"only {total} fuzz cases ran (run the whole module): {dict(target.tally)}"
    codes = {code for _, code in target.tally}
    assert codes == {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, dict(target.tally)
    grown = ray.get(target.router.__ray_call__.remote(_rss_bytes)) - target.rss_before
    print(f"fuzz: {total} cases {dict(sorted(target.tally.items()))}; router RSS grew {grown / 2**20:.1f} MiB")
    assert grown < RSS_GROWTH_LIMIT, f"the router's RSS grew {grown / 2**20:.0f} MiB over the fuzz"
    for layer in MOE_LAYERS:
        _assert_serves(target.stub, target.ref, layer, torch.randn(3, 5, D))
