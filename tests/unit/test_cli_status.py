"""`moe-serve status` renders routers, groups and experts (busiest first) as tables."""

from __future__ import annotations

import pytest
from rich.console import Console

from cluster.cli import status_tables

pytestmark = pytest.mark.unit


def test_status_tables_show_groups_experts_and_down_routers() -> None:
    d = {"name": "dep", "gateways": ["127.0.0.1:5"], "status": [
        {"model": "mixtral", "routing_table_version": 3,
         "routers": [{"name": "dep-router-0", "address": "127.0.0.1:5", "transports": ["grpc", "object_store"], "requests": 5, "batches": 2,
                      "rdt": "unavailable: Ray did not place the router's RDT peer"}],
         "groups": [{"name": "dep-group-0", "node_id": "abcdef0123456789", "alive": True, "device": "cpu", "slots": 4, "tokens_per_s": 10.0},
                    {"name": "dep-group-1", "node_id": "", "alive": False, "device": "", "slots": 4, "tokens_per_s": 0.0, "scaled": True}],
         "experts": [{"layer": 0, "expert": 1, "replicas": 1, "tokens_per_s": 5.0, "groups": ["dep-group-0"]},
                     {"layer": 0, "expert": 2, "replicas": 2, "tokens_per_s": 50.0, "groups": ["dep-group-0", "dep-group-1"]}]},
        {"name": "dep-router-1", "error": "actor died"}]}
    console = Console(record=True, width=200)
    for table in status_tables(d):
        console.print(table)
    text = console.export_text()
    assert "routing table v3" in text and "grpc > object_store" in text
    assert "unavailable: Ray did not place" in " ".join(text.split())  # the router's RDT state, wrapped or not
    assert "dep-group-0" in text and "abcdef012345" in text and "NO" in text
    # busiest expert first
    assert text.index("dep-group-0, dep-group-1") < text.index("│      1 │")
    assert "dep-router-1 DOWN" in text.replace("\n", " ") or "DOWN" in text
