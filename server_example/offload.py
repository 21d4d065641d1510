"""The only place the server touches shmgrpc: build its interceptor, and
summarise shmgrpc.stats() for StatusReply.offload.

The server always installs the interceptor: clients that never handshake
(plain gRPC, other hosts) are served inline by it, so one server serves both.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Tuple

import shmgrpc

MiB = 1024 * 1024


def server_interceptor(aio: bool) -> Tuple[Optional[Any], str]:
    """(interceptor, description); interceptor is None if this shmgrpc has none.

    The Config comes from SHMGRPC_* variables, read now (not at import), so a
    bad value stops the server at start with shmgrpc's own ConfigError.
    """
    module = _module("shmgrpc.aio") if aio else shmgrpc
    factory = getattr(module, "ServerInterceptor", None) if module else None
    name = "shmgrpc.aio.ServerInterceptor" if aio else "shmgrpc.ServerInterceptor"
    if factory is None:
        return None, f"{name} not available: serving plain gRPC only"
    config = shmgrpc.Config.from_env()
    interceptor = factory(config)
    transport = getattr(interceptor, "transport", config.transport)
    return interceptor, f"shmgrpc on (transport {transport}, threshold {config.threshold} B)"


def close(interceptor: Optional[Any]) -> None:
    closer = getattr(interceptor, "close", None)
    if closer is not None:
        closer()


def stats_summary(installed: bool) -> str:
    """One line from shmgrpc.stats(); tolerant of fields this version lacks."""
    if not installed:
        return "off (shmgrpc server interceptor not available)"
    stats_fn = getattr(shmgrpc, "stats", None)
    if stats_fn is None:
        return "on (shmgrpc.stats() not available)"
    stats = stats_fn()

    def count(key: str) -> str:
        entry = stats.get(key) or {}
        return f"{entry.get('count', 0)} ({entry.get('bytes', 0) / MiB:.1f} MiB)"

    by_transport = ", ".join(
        f"{name} {sum((entry.get(kind) or {}).get('count', 0) for kind in ('offloaded', 'restored'))}"
        for name, entry in sorted((stats.get("by_transport") or {}).items())
    )
    fallbacks = ", ".join(f"{reason} {n}" for reason, n in sorted((stats.get("fallbacks") or {}).items()))
    pool = stats.get("pool") or {}
    return (
        f"offloaded {count('offloaded')}, restored {count('restored')}, inline {count('inline')}; "
        f"by transport: {by_transport or 'none'}; fallbacks: {fallbacks or 'none'}; "
        f"pool {pool.get('bytes_in_use', 0) / MiB:.1f}/{pool.get('capacity', 0) / MiB:.0f} MiB "
        f"in {pool.get('segments', 0)} segments"
    )


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
