"""Deployments recorded in Ray's GCS key-value store, so `moe-serve status|down` find what `up` made."""

from __future__ import annotations

from typing import Any

import msgpack
from ray.experimental import internal_kv

KV_NAMESPACE = "moe-serve"
PREFIX = "deployment:"


def record(name: str, entry: dict[str, Any]) -> None:
    internal_kv._internal_kv_put(f"{PREFIX}{name}", msgpack.packb(entry, use_bin_type=True), overwrite=True, namespace=KV_NAMESPACE)


def lookup(name: str) -> dict[str, Any] | None:
    raw = internal_kv._internal_kv_get(f"{PREFIX}{name}", namespace=KV_NAMESPACE)
    return None if raw is None else msgpack.unpackb(raw, raw=False)


def names() -> list[str]:
    keys = internal_kv._internal_kv_list(PREFIX, namespace=KV_NAMESPACE)
    return sorted(k.decode()[len(PREFIX):] if isinstance(k, bytes) else k[len(PREFIX):] for k in keys)


def forget(name: str) -> None:
    internal_kv._internal_kv_del(f"{PREFIX}{name}", namespace=KV_NAMESPACE)
