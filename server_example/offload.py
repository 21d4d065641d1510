"""The only place the server touches shmgrpc: build the gRPC server with
shmgrpc installed, and summarise its stats() for StatusReply.offload.

shmgrpc.server() / shmgrpc.aio.server() take grpc.server's / grpc.aio.server's
arguments plus a Config, and install shmgrpc's interceptor innermost, told
the server's options (so offloaded messages meet the same size limits as
inline ones). Clients that never handshake (plain gRPC, other hosts) are
served untouched, so one server serves both.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import shmgrpc
import shmgrpc.aio

MiB = 1024 * 1024


def make_server(aio: bool, options: Sequence[Tuple[str, Any]], thread_pool=None) -> Tuple[Any, str]:
    """(server, description): a grpc.Server (or grpc.aio.Server) with shmgrpc.

    The Config comes from SHMGRPC_* variables, read now (not at import), so a
    bad value stops the server at start with shmgrpc's own ConfigError.
    """
    config = shmgrpc.Config.from_env()
    if aio:
        server = shmgrpc.aio.server(thread_pool, options=options, config=config)
    else:
        server = shmgrpc.server(thread_pool, options=options, config=config)
    return server, f"shmgrpc on (transport {server.shmgrpc.transport}, threshold {config.threshold} B)"


def close(server: Optional[Any]) -> None:
    """Let go of the server's shared memory; after the server has stopped."""
    interceptor = getattr(server, "shmgrpc", None)
    if interceptor is not None:
        interceptor.close()


def stats_summary(server: Any) -> str:
    """One line from the server's shmgrpc stats()."""
    stats = server.shmgrpc.stats()

    def count(key: str) -> str:
        entry = stats.get(key) or {}
        return f"{entry.get('count', 0)} ({entry.get('bytes', 0) / MiB:.1f} MiB)"

    by_transport = ", ".join(
        f"{name} {sum((entry.get(kind) or {}).get('count', 0) for kind in ('offloaded', 'restored'))}"
        for name, entry in sorted((stats.get("by_transport") or {}).items())
    )
    fallbacks = ", ".join(f"{reason} {n}" for reason, n in sorted((stats.get("fallbacks") or {}).items()))
    errors = ", ".join(f"{reason} {n}" for reason, n in sorted((stats.get("errors") or {}).items()))
    pool = stats.get("pool") or {}
    return (
        f"offloaded {count('offloaded')}, restored {count('restored')}, inline {count('inline')}; "
        f"by transport: {by_transport or 'none'}; fallbacks: {fallbacks or 'none'}; "
        f"errors: {errors or 'none'}; "
        f"pool {pool.get('bytes_in_use', 0) / MiB:.1f}/{pool.get('capacity', 0) / MiB:.0f} MiB "
        f"in {pool.get('segments', 0)} segments"
    )
