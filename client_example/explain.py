"""What the demo's shmgrpc counters mean, printed under them: the server's
"offloaded 189, restored 186" and each fallback reason that appeared."""

from __future__ import annotations

import re
from typing import Iterable, List

# Every reason shmgrpc counts in stats()["fallbacks"] (shmgrpc/_core.py, and
# the pool and cma pin table it asks for room): a message at or above the
# threshold that went through gRPC itself instead. tests/test_demo.py keeps
# this in step with the library's source.
FALLBACKS = {
    "below_cma_threshold": "the cma transport carries nothing below SHMGRPC_CMA_THRESHOLD (512 KiB): "
                           "at that size the socket is faster than cma's four calls into the peer",
    "peer_without_shmgrpc": "the server has no shmgrpc (it answered the handshake UNIMPLEMENTED): plain gRPC",
    "peer_not_colocated": "the peer could not prove it shares this host, /dev/shm or side socket and uid",
    "peer_cannot_read": "no transport in effect with this peer could carry it (see shmgrpc.channel_status)",
    "too_large": "larger than SHMGRPC_MAX_MESSAGE",
    "over_limit": "above gRPC's message-size limit of one side: inline, gRPC accepts or refuses it itself",
    "side_closed": "the memfd side connection to the peer was closed",
    "side_budget": "the peer holds all the memfd segments its share of descriptors allows (it grants more "
                   "on request, while it has room)",
    "side_busy": "the peer's side connection queue was full (it is not reading it): nothing waits for it",
    "pool_full": "the pool is at SHMGRPC_POOL_SIZE with its slots still in use",
    "pool_too_small": "the message needs more than all of SHMGRPC_POOL_SIZE",
    "pool_closed": "the pool was closing (the channel or server was being closed)",
    "shm_no_space": "the shm directory (/dev/shm) had no room for a new segment",
    "memfd_no_space": "the kernel gave no memory for a new memfd segment",
    "cma_pinned_full": "SHMGRPC_CMA_MAX_PINNED bytes were already pinned for readers that had not acknowledged",
    "cma_entries_full": "the cma pin table had no free entry (too many messages unread at once)",
    "peer_share_full": "the messages for this one peer already held its share of the pool "
                       "(SHMGRPC_PEER_SHARE of SHMGRPC_POOL_SIZE): unread, or kept for gRPC to resend",
    "cma_peer_share_full": "the messages for this one peer already held its share of the pin budget "
                           "(SHMGRPC_PEER_SHARE of SHMGRPC_CMA_MAX_PINNED)",
    "resent_inline": "a unary request the server could not read (another server process) was resent inline",
}


def explain(summary: str, reasons: Iterable[str] = ()) -> str:
    """Lines under "server shmgrpc: <summary>" (server_example/offload.py's
    stats_summary): what its counters mean, and each fallback reason seen
    there or in `reasons` (the tables' "fell back to inline" notes)."""
    lines: List[str] = [
        "  what the server's counts mean:",
        "    offloaded: messages it sent as a handle, their bytes through shared memory"
        " (answers: Echo, Get, Download chunks)",
        "    restored: messages it received as a handle and read back out of shared memory"
        " (requests: Echo, Put, Upload chunks)",
        "    the two differ because not every call is large both ways: Put is large only in, Get only out,"
        " and Download sends back 512 KiB chunks where Upload sent 1 MiB ones",
        "    inline: messages that went through gRPC itself: below the threshold (SHMGRPC_THRESHOLD), or a fallback",
        "    by transport: offloaded plus restored, per transport (every client's shmgrpc channels together)",
    ]
    seen = set(reasons)
    listed = re.search(r"fallbacks: (.*?);", summary)
    if listed and listed.group(1) != "none":
        seen.update(part.rsplit(" ", 1)[0] for part in listed.group(1).split(", "))
    if seen:
        lines.append("    fallbacks: messages at or above the threshold that went inline anyway, by reason:")
        for reason in sorted(seen):
            meaning = FALLBACKS.get(reason, "see the README, \"Metrics\" (shmgrpc_fallbacks_total)")
            lines.append(f"      {reason}: {meaning}")
    return "\n".join(lines)
