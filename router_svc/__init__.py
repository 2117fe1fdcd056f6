"""Router service: the gate, capacity, planning and combining; LocalMoE, the in-process engine."""

from router_svc.local import LocalMoE, RoutingReport

__all__ = ["LocalMoE", "RoutingReport"]
