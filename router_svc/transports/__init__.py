"""Transports from a Router to its expert groups, chosen by name through one registry."""

from router_svc.transports.base import Batch, GroupsDown, Part, Transport, TransportError, ping_answers
from router_svc.transports.grpc_client import GrpcTransport
from router_svc.transports.object_store import ObjectStoreTransport
from router_svc.transports.rdt import DispatchWorker, RdtTransport

TRANSPORTS: dict[str, type[Transport]] = {
    "rdt": RdtTransport,
    "object_store": ObjectStoreTransport,
    "grpc": GrpcTransport,
}
# what each configured mode tries, in order, per batch; `auto` orders by measurement.
FALLBACKS: dict[str, tuple[str, ...]] = {
    "rdt": ("rdt", "object_store", "grpc"),
    "object_store": ("object_store", "grpc"),
    "grpc": ("grpc", "object_store"),
    "auto": ("rdt", "object_store", "grpc"),
}

__all__ = ["Batch", "DispatchWorker", "FALLBACKS", "GroupsDown", "Part", "TRANSPORTS", "Transport", "TransportError", "ping_answers"]
