"""GroupCore (expert_workers.group): a group's slots computed against a per-row float64 reference.

The reference takes each row's weights straight from RandomWeights(spec, seed) and
writes the gated FFN out: silu(x W_gate^T) * (x W_up^T) W_down^T, w_in = [W_gate; W_up].
The shared slot is the shared FFN with no gate applied (the router weighs it).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import re
import threading
import time
from typing import Iterator, Sequence

import pytest
import torch

from expert_workers import wire
from expert_workers.errors import ConfigError, InvalidRequestError
from expert_workers.group import SHARED, GroupCore, local_order
from expert_workers.source import SourceSpec
from expert_workers.spec import MoESpec, SharedExpertSpec
from expert_workers.weights import ExpertWeights, RandomWeights

pytestmark = pytest.mark.unit

D, I, E, I_SHARED = 16, 24, 6, 20
SEED = 11
SPEC = MoESpec(
    hidden_size=D,
    intermediate_size=I,
    num_experts=E,
    num_layers=2,
    moe_layers=(0, 1),
    # a sigmoid gate exists, so "unweighted" below is a real claim: the slot must not apply it.
    shared_experts=SharedExpertSpec(count=1, intermediate_size=I_SHARED, sigmoid_gate=True),
)
# deliberately unsorted, shared slot first: the group must put them in slot order itself.
SLOTS = [(0, SHARED), (0, 5), (0, 1), (0, 3), (1, 2), (1, 0)]
ORDER0 = [1, 3, 5, SHARED]
ORDER1 = [0, 2]


def make_core(slots: Sequence[tuple[int, int]] = SLOTS, spec: MoESpec = SPEC) -> GroupCore:
    return GroupCore(SourceSpec(random=spec, seed=SEED), slots, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def core() -> GroupCore:
    return make_core()


def silu64(v: torch.Tensor) -> torch.Tensor:
    return v / (1.0 + torch.exp(-v))


def ffn_row(x_D: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """One row through one gated FFN, in float64."""
    w_in = w.w_in.double()
    half = w_in.shape[0] // 2
    w_gate, w_up, w_down = w_in[:half], w_in[half:], w.w_out.double()
    x = x_D.double()
    a = silu64(w_gate @ x) * (w_up @ x)
    return w_down @ a


def reference(layer: int, experts: Sequence[int], counts: Sequence[int], x_ND: torch.Tensor) -> torch.Tensor:
    src = RandomWeights(SPEC, seed=SEED)
    rows = []
    r = 0
    for e, c in zip(experts, counts):
        w = src.shared(layer).ffn if e == SHARED else src.expert(layer, e)
        for _ in range(c):
            rows.append(ffn_row(x_ND[r], w))
            r += 1
    assert r == x_ND.shape[0]
    return torch.stack(rows) if rows else torch.zeros((0, D), dtype=torch.float64)


def inputs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, D), generator=torch.Generator().manual_seed(seed))


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_slots_are_in_local_order(core: GroupCore) -> None:
    assert core.slots == [(0, 1), (0, 3), (0, 5), (0, SHARED), (1, 0), (1, 2)]
    assert core.layers[0].experts == ORDER0
    assert core.layers[1].experts == ORDER1


@pytest.mark.parametrize(
    "experts, counts",
    [
        (ORDER0, [3, 1, 2, 4]),
        (ORDER0, [0, 0, 0, 5]),  # only shared rows
        (ORDER0, [2, 0, 0, 1]),  # zero-row slots in the middle
        (ORDER0, [1, 1, 1, 1]),
    ],
)
def test_all_slots_match_reference(core: GroupCore, experts: list[int], counts: list[int]) -> None:
    x = inputs(sum(counts), seed=sum(counts))
    out = core.compute(0, experts, counts, x)
    assert out.shape == x.shape and out.dtype == torch.float32
    check(out, reference(0, experts, counts, x))


@pytest.mark.parametrize(
    "layer, experts, counts",
    [
        (0, [3], [4]),
        (0, [5], [1]),
        (0, [1, 5], [2, 3]),
        (0, [SHARED], [3]),
        (0, [3, SHARED], [2, 2]),
        (1, [2], [3]),
        (1, [0, 2], [1, 4]),
        (0, [1, 3], [2, 0]),  # a listed expert with zero rows
    ],
)
def test_subset_of_experts(core: GroupCore, layer: int, experts: list[int], counts: list[int]) -> None:
    x = inputs(sum(counts), seed=7 * layer + len(experts))
    check(core.compute(layer, experts, counts, x), reference(layer, experts, counts, x))


def test_shared_slot_is_the_plain_shared_ffn_without_gate(core: GroupCore) -> None:
    x = inputs(4, seed=3)
    src = RandomWeights(SPEC, seed=SEED)
    shared = src.shared(0)
    assert shared is not None and shared.gate is not None
    out = core.compute(0, [SHARED], [4], x)
    ungated = torch.stack([ffn_row(x[i], shared.ffn) for i in range(4)])
    check(out, ungated)
    gated = torch.sigmoid(x.double() @ shared.gate.double().T) * ungated
    assert not torch.allclose(out.double(), gated, atol=1e-3)


def test_routed_rows_are_not_confused_between_experts(core: GroupCore) -> None:
    # the same row through each hosted expert gives a different answer, each the expert's own.
    x = inputs(1, seed=5).expand(3, D).contiguous()
    out = core.compute(0, [1, 3, 5], [1, 1, 1], x)
    src = RandomWeights(SPEC, seed=SEED)
    for i, e in enumerate([1, 3, 5]):
        check(out[i : i + 1], ffn_row(x[i], src.expert(0, e))[None])
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


@pytest.mark.parametrize("threads", [1, 2])
def test_batches_from_many_threads_compute_on_one_when_torch_has_several(threads: int) -> None:
    """With several torch threads every batch runs on the group's own compute thread (one OpenMP team,
    whichever transport's thread brought it); with one, on the caller's (no hand-off). Answers exact."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        core = make_core()
    finally:
        torch.set_num_threads(before)
    ran_on: set[int] = set()
    grouped = core.layers[0].grouped
    forward = grouped.forward

    def spy(*args, **kwargs):
        ran_on.add(threading.get_ident())
        return forward(*args, **kwargs)

    grouped.forward = spy  # type: ignore[method-assign]
    callers: set[int] = set()
    x = inputs(7, seed=21)
    expected = reference(0, ORDER0, [2, 1, 3, 1], x)
    together = threading.Barrier(4)  # all four alive at once: no thread id is reused

    def call() -> torch.Tensor:
        callers.add(threading.get_ident())
        out = core.compute(0, ORDER0, [2, 1, 3, 1], x)
        together.wait(timeout=30)
        return out

    with cf.ThreadPoolExecutor(4) as pool:
        outs = [f.result() for f in [pool.submit(call) for _ in range(4)]]
    for out in outs:
        check(out, expected)
    assert len(callers) == 4
    if threads == 1:
        assert ran_on == callers
    else:
        assert len(ran_on) == 1 and not ran_on & callers


def test_empty_batch(core: GroupCore) -> None:
    out = core.compute(0, [], [], torch.zeros((0, D)))
    assert out.shape == (0, D)


def test_input_dtype_is_kept(core: GroupCore) -> None:
    x = inputs(3, seed=9)
    out = core.compute(0, [1, SHARED], [2, 1], x.to(torch.float16))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), reference(0, [1, SHARED], [2, 1], x.to(torch.float16).float()), rtol=2e-2, atol=2e-2)


def test_bfloat16_core() -> None:
    core = GroupCore(SourceSpec(random=SPEC, seed=SEED), [(0, 1), (0, 3)], device="cpu", dtype="bfloat16")
    assert core.layers[0].grouped is not None and core.layers[0].grouped.dtype == torch.bfloat16
    x = inputs(4, seed=1)
    out = core.compute(0, [1, 3], [2, 2], x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(0, [1, 3], [2, 2], x), rtol=5e-2, atol=5e-2)


# -- errors -------------------------------------------------------------------


def test_layer_not_hosted() -> None:
    core = make_core([(0, 1), (0, 2)])
    with pytest.raises(InvalidRequestError, match=re.escape("invalid request field 'layer': this group hosts no slot of layer 1")) as info:
        core.compute(1, [1], [1], inputs(1))
    assert info.value.field == "layer"
    with pytest.raises(InvalidRequestError, match="hosts no slot of layer 7"):
        core.compute(7, [1], [1], inputs(1))
    assert core.stats()["batches"] == 0


@pytest.mark.parametrize("experts", [[2], [1, 4], [0, 2]], ids=str)
def test_expert_not_hosted(core: GroupCore, experts: list[int]) -> None:
    missing = [e for e in experts if e not in ORDER0]
    msg = re.escape(f"invalid request field 'experts': layer 0 experts {missing} are not hosted here (hosted: {ORDER0})")
    with pytest.raises(InvalidRequestError, match=msg):
        core.compute(0, experts, [1] * len(experts), inputs(len(experts)))


def test_shared_slot_not_hosted() -> None:
    core = make_core([(0, 1), (0, 2)])
    with pytest.raises(InvalidRequestError, match=re.escape("layer 0 experts [-1] are not hosted here (hosted: [1, 2])")):
        core.compute(0, [1, SHARED], [1, 1], inputs(2))


@pytest.mark.parametrize("experts", [[3, 1], [SHARED, 1], [5, 3, 1], [1, 1], [SHARED, SHARED]], ids=str)
def test_experts_out_of_slot_order(core: GroupCore, experts: list[int]) -> None:
    msg = re.escape(f"invalid request field 'experts': experts {experts} not in slot order {ORDER0}")
    with pytest.raises(InvalidRequestError, match=msg):
        core.compute(0, experts, [1] * len(experts), inputs(len(experts)))


@pytest.mark.parametrize(
    "experts, counts, rows",
    [([1, 3], [2, 2], 3), ([1, 3], [2, 2], 5), ([1, 3], [4], 4), ([1], [1, 1], 2), ([], [], 1)],
)
def test_counts_not_covering_rows(core: GroupCore, experts: list[int], counts: list[int], rows: int) -> None:
    msg = re.escape(f"invalid request field 'counts': {len(experts)} experts, counts {counts} for {rows} rows")
    with pytest.raises(InvalidRequestError, match=msg) as info:
        core.compute(0, experts, counts, inputs(rows))
    assert info.value.field == "counts"


def test_negative_counts_are_rejected() -> None:
    """BUG (expert_workers/group.py, GroupCore.compute): only sum(counts) == rows is checked.

    counts [3, -1] for experts [1, 3] over 2 rows sums to 2 and is accepted: both rows
    are computed with expert 1 (whose slice silently shrinks to the 2 rows there are),
    and stats() records 3 tokens for (0, 1) and -1 for (0, 3). A gRPC client can send it.
    """
    core = make_core()
    with pytest.raises(InvalidRequestError, match="counts"):
        core.compute(0, [1, 3], [3, -1], inputs(2))
    assert core.stats()["batches"] == 0


@pytest.mark.parametrize("experts, counts, field", [
    ([1, 3], [1.5, 1.5], "counts"),   # sums to 3 rows, and int() would make it [1, 1]: a row on the next slot
    ([1, 3], ["1", "2"], "counts"),
    ([1, 3], [True, 2], "counts"),
    ([1.0, 3], [1, 2], "experts"),
    ("13", [1, 2], "experts"),
])
def test_experts_and_counts_must_be_lists_of_integers(core: GroupCore, experts, counts, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=f"field '{field}'"):
        core.compute(0, experts, counts, inputs(3))


@pytest.mark.parametrize("layer", [0.9, "0", None, True])
def test_layer_must_be_an_integer(core: GroupCore, layer) -> None:
    with pytest.raises(InvalidRequestError, match="field 'layer'"):
        core.compute(layer, [1], [1], inputs(1))


@pytest.mark.parametrize("bad", [[(0, 6)], [(0, -3)], [(2, 1)], [(7, 0)]])
def test_slots_outside_the_model_are_refused_and_the_group_stays_as_it_was(bad) -> None:
    core = make_core()
    before = list(core.slots)
    with pytest.raises(ConfigError, match="slots"):
        core.set_slots([(1, 4), (1, 1)] + bad)
    assert core.slots == before and sorted(core.layers) == [0, 1] and core.layers[1].experts == ORDER1


def test_a_set_slots_that_fails_on_one_layer_changes_no_layer() -> None:
    plain = MoESpec(hidden_size=D, intermediate_size=I, num_experts=E, num_layers=2, moe_layers=(0, 1))
    core = make_core([(0, 1)], spec=plain)
    with pytest.raises(ConfigError, match="no shared experts"):
        core.set_slots([(0, 2), (1, 3), (1, SHARED)])
    assert core.slots == [(0, 1)] and list(core.layers) == [0]


@pytest.mark.parametrize("impl_dtype", ["float32", "bfloat16"])
def test_the_group_keeps_no_second_copy_of_its_weights(impl_dtype: str) -> None:
    """The grouped compute holds its own (packed or stacked) copy; the tensors read from the source are
    freed once it is built, or a group would hold its weights twice."""
    import gc
    import weakref

    core = GroupCore(SourceSpec(random=SPEC, seed=SEED), [(0, 1)], device="cpu", dtype=impl_dtype)
    read = []
    real = core._src.expert

    def watched(layer: int, expert: int) -> ExpertWeights:
        w = real(layer, expert)
        read.extend([weakref.ref(w.w_in), weakref.ref(w.w_out)])
        return w

    core._src.expert = watched
    core.set_slots([(0, 1), (1, 0), (1, 4)])
    gc.collect()
    assert len(read) == 4 and all(r() is None for r in read)
    assert core.compute(1, [0, 4], [2, 1], inputs(3).to(wire.DTYPES[impl_dtype])).shape == (3, D)


def test_errors_leave_stats_untouched() -> None:
    core = make_core()
    bad = [(5, [1], [1], 1), (0, [2], [1], 1), (0, [3, 1], [1, 1], 2), (0, [1], [2], 1)]
    for layer, experts, counts, rows in bad:
        with pytest.raises(InvalidRequestError):
            core.compute(layer, experts, counts, inputs(rows))
    s = core.stats()
    assert s["batches"] == 0 and s["busy_s"] == 0.0
    assert all(n == 0 for _, _, n in s["tokens"])


# -- stats ----------------------------------------------------------------------


def test_stats_count_tokens_per_slot_and_batches() -> None:
    core = make_core()
    calls = [
        (0, [1, 5, SHARED], [2, 3, 5]),
        (0, [3], [4]),
        (1, [0, 2], [1, 6]),
        (0, [1, SHARED], [1, 2]),
    ]
    expected = {slot: 0 for slot in [(0, 1), (0, 3), (0, 5), (0, SHARED), (1, 0), (1, 2)]}
    for layer, experts, counts in calls:
        core.compute(layer, experts, counts, inputs(sum(counts)))
        for e, c in zip(experts, counts):
            expected[(layer, e)] += c
    s = core.stats()
    assert s["batches"] == len(calls)
    assert s["busy_s"] > 0.0
    assert s["tokens"] == [[l, e, n] for (l, e), n in expected.items()]
    assert expected == {(0, 1): 3, (0, 3): 4, (0, 5): 3, (0, SHARED): 7, (1, 0): 1, (1, 2): 6}


def test_fresh_stats_list_every_slot_at_zero() -> None:
    fresh = make_core([(1, 4), (0, 0), (1, SHARED)])
    assert fresh.stats() == {"tokens": [[0, 0, 0], [1, 4, 0], [1, SHARED, 0]], "busy_s": 0.0, "batches": 0}


# -- local_order ------------------------------------------------------------------


@pytest.mark.parametrize(
    "experts, expected",
    [
        ([5, SHARED, 0, 3], [0, 3, 5, SHARED]),
        ([SHARED], [SHARED]),
        ([], []),
        ([2, 1], [1, 2]),
        ([SHARED, 7, 2], [2, 7, SHARED]),
        ((4, 0), [0, 4]),
    ],
)
def test_local_order(experts: Sequence[int], expected: list[int]) -> None:
    assert local_order(experts) == expected


def test_shared_slot_on_a_model_without_shared_experts_is_refused() -> None:
    plain = MoESpec(hidden_size=D, intermediate_size=I, num_experts=E, num_layers=1, moe_layers=(0,))
    with pytest.raises((AssertionError, ValueError), match="no shared experts"):
        make_core([(0, 1), (0, SHARED)], spec=plain)


@contextlib.contextmanager
def _held_batch(core: GroupCore) -> Iterator[list[torch.Tensor]]:
    """A batch of layer 0 (3 rows, expert 1) computing in a thread, held inside its expert FFN until the
    block ends (and it returned); yields the list its output lands in."""
    ls = core.layers[0]
    inside, release = threading.Event(), threading.Event()
    real = ls.grouped.forward

    def held(x, counts):
        inside.set()
        assert release.wait(30), "never released"
        return real(x, counts)

    ls.grouped.forward = held
    out: list[torch.Tensor] = []
    t = threading.Thread(target=lambda: out.append(core.compute(0, [1], [3], inputs(3))))
    t.start()
    try:
        assert inside.wait(30)
        yield out
    finally:
        release.set()
        t.join(30)
        del ls.grouped.forward


def test_computing_for_counts_only_while_a_batch_computes() -> None:
    """The health check's reading: 0 while idle, the running batch's age while one computes (here held
    inside the expert FFN), 0 again once it returned, and once it raised."""
    core = make_core()
    assert core.computing_for() == 0.0
    with _held_batch(core) as out:
        first = core.computing_for()
        assert first > 0.0
        time.sleep(0.05)
        assert core.computing_for() > first  # it grows while the batch is held
    check(out[0], reference(0, [1], [3], inputs(3)))
    assert core.computing_for() == 0.0

    def broken(x, counts):
        raise RuntimeError("kernel failed")

    core.layers[0].grouped.forward = broken
    with pytest.raises(RuntimeError, match="kernel failed"):
        core.compute(0, [1], [3], inputs(3))
    assert core.computing_for() == 0.0


def test_ping_answers_false_past_the_compute_timeout_and_true_once_the_batch_returns() -> None:
    from expert_workers.group import ExpertGroup

    group = ExpertGroup.__new__(ExpertGroup)  # the actor's methods on a plain instance, no Ray
    group.name, group.core, group._stall_logged = "g", make_core(), False
    group.core.compute_timeout_s = 0.05
    assert group.ping() is True
    with _held_batch(group.core):
        time.sleep(0.1)
        assert group.ping() is False and group.ping() is False
        group.core.compute_timeout_s = None  # never
        assert group.ping() is True
        group.core.compute_timeout_s = 0.05
        assert group.ping() is False
    assert group.ping() is True
    assert group.core.longest_s == 0.0  # the batch taken for hung sets no floor


def test_ping_never_reads_a_batch_as_hung_before_4x_the_longest_finished_one() -> None:
    """A group whose honest batches take about the timeout is not taken for hung: the limit is at least
    LONGEST_FACTOR x the longest batch it finished."""
    from expert_workers.group import LONGEST_FACTOR, ExpertGroup

    group = ExpertGroup.__new__(ExpertGroup)
    group.name, group.core, group._stall_logged = "g", make_core(), False
    group.core.compute_timeout_s = 0.5
    with _held_batch(group.core):
        time.sleep(0.3)  # a slow batch that finishes within the limit: the floor becomes >= 4 x 0.3 s
    assert group.core.longest_s >= 0.3 and LONGEST_FACTOR == 4.0
    with _held_batch(group.core):
        time.sleep(0.7)
        assert group.ping() is True  # past compute_timeout_s, inside 4 x the longest (>= 1.2 s)
        time.sleep(4 * group.core.longest_s)
        assert group.ping() is False
