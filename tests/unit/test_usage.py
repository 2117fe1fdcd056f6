"""Usage counts (router_svc/usage.py): requests are queued and added up in bulk; the totals must
equal adding each request up on its own, whenever they are read, from any thread."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

from expert_workers.spec import RoutingSpec
from router_svc import usage as usage_mod
from router_svc.gate import GateInput, route
from router_svc.usage import Usage

pytestmark = pytest.mark.unit

E = 8


def _requests(n: int, seed: int = 0) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = i % 13  # includes empty requests
        a = route(GateInput(logits_TE=torch.randn(t, E, generator=gen)), RoutingSpec(top_k=2))
        ids = torch.randint(0, 40, (t,), generator=gen) if i % 3 else None
        out.append((a, ids))
    return out


def _reference(reqs: list[tuple]) -> dict:
    """Each request added on its own (what the counts meant before queuing)."""
    tokens, co = torch.zeros(E, dtype=torch.int64), torch.zeros(E, E, dtype=torch.int64)
    probs, seen, ids = torch.zeros(E, dtype=torch.float64), 0, [Counter() for _ in range(E)]
    for a, tok in reqs:
        t = int(a.logits_TE.shape[0])
        seen += t
        tokens += torch.bincount(a.expert_N, minlength=E)
        if t:
            probs += a.probs_TE.to(torch.float64).sum(0)
            onehot = torch.zeros(t, E)
            onehot[a.token_N, a.expert_N] = 1.0
            co += (onehot.t() @ onehot).round().long()
        if tok is not None:
            for x, e in zip(tok[a.token_N].tolist(), a.expert_N.tolist()):
                ids[e][x] += 1
    return {"tokens": tokens, "co": co, "probs": probs, "seen": seen, "ids": ids}


def _check(u: Usage, ref: dict) -> None:
    assert torch.equal(u.tokens[0], ref["tokens"])
    assert torch.equal(u.coactivation[0], ref["co"])
    assert u.seen[0] == ref["seen"]
    torch.testing.assert_close(u.prob_sums[0], ref["probs"], rtol=1e-12, atol=1e-12)
    assert [dict(c) for c in u._ids[0]] == [dict(c) for c in ref["ids"]]


@pytest.mark.parametrize("n", [0, 1, 5, usage_mod.FOLD_EVERY - 1, usage_mod.FOLD_EVERY, 3 * usage_mod.FOLD_EVERY + 7])
def test_queued_counts_equal_each_request_added_alone(n: int) -> None:
    reqs = _requests(n)
    u = Usage([0], E)
    for a, ids in reqs:
        u.record(0, a, ids)
    _check(u, _reference(reqs))


def test_reads_between_records_see_every_request_recorded_before() -> None:
    reqs = _requests(50, seed=1)
    u = Usage([0], E)
    for i, (a, ids) in enumerate(reqs):
        u.record(0, a, ids)
        if i % 7 == 0:
            assert torch.equal(u.tokens[0], _reference(reqs[: i + 1])["tokens"])
    _check(u, _reference(reqs))
    snap = u.snapshot()
    assert snap["expert_tokens"][0] == _reference(reqs)["tokens"].tolist()
    assert u.counts()[0][0] == snap["expert_tokens"][0]


def test_the_queue_is_folded_without_a_reader() -> None:
    u = Usage([0], E)
    for a, ids in _requests(usage_mod.FOLD_EVERY):
        u.record(0, a, ids)
    assert u._queued[0] == []  # added up at FOLD_EVERY, nobody having read


def test_a_reader_thread_and_the_recorder_never_lose_a_request() -> None:
    reqs = _requests(400, seed=2)
    u = Usage([0], E)
    stop = threading.Event()
    totals: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            totals.append(int(u.tokens[0].sum()))

    th = threading.Thread(target=reader)
    th.start()
    for a, ids in reqs:
        u.record(0, a, ids)
    stop.set()
    th.join()
    assert totals == sorted(totals)  # counts only grow
    _check(u, _reference(reqs))
