"""The shape of stats(): plain dicts, typed for checkers.

`shmgrpc.stats()`, `channel.stats()` and `server.shmgrpc.stats()` return a
StatsSnapshot: a new dict each call, safe to keep, to mutate and to turn
into JSON. These TypedDicts only describe it (they cost nothing at run time).
"""

from __future__ import annotations

from typing import Dict, List, Optional, TypedDict


class CountBytes(TypedDict):
    """Messages, and their serialized bytes."""

    count: int
    bytes: int


class TransportCounts(TypedDict):
    """One transport: what this side offloaded (sent as a handle) and
    restored (received as a handle)."""

    offloaded: CountBytes
    restored: CountBytes


class PoolUsage(TypedDict):
    """The shared memory of the process's pool (memfd and shm segments) and
    the bytes cma keeps pinned for readers that have not acknowledged."""

    capacity: int
    bytes_mapped: int
    bytes_in_use: int
    segments: int
    cma_pinned: int


class DirectionRecord(TypedDict):
    """What the large messages (at or above the threshold) one way did
    lately (shmgrpc.Direction as data): `via` the transport that carried the
    latest, or "inline" (before any, with messages 0: what is expected);
    `reason` why inline, in words; `fallback` the latest inline one's reason
    among the recent ones ("inline": only its sender knows why); `messages`
    how many so far; `recent` transport or reason -> count over the last 32."""

    via: str
    reason: str
    fallback: str
    messages: int
    recent: Dict[str, int]


class PeerRecord(TypedDict):
    """One peer route: `of` the channel's target (or "server"), `peer` in
    words ("server pid 4242", "client pid 77"), its pid, the transport that
    carries its large messages or "inline", the reason in words, and each
    direction: `sent` from this process, `received` by it."""

    of: str
    peer: str
    pid: Optional[int]
    transport: str
    reason: str
    sent: DirectionRecord
    received: DirectionRecord


class StatsSnapshot(TypedDict):
    """Counters since the process (or the channel or server) started.

    offloaded / restored: every transport together; by_transport: each of
    "memfd", "shm" and "cma"; inline: messages that went through gRPC
    (below the threshold, or a fallback); fallbacks: reason -> messages that
    could have been offloaded but went inline (peer_not_colocated, pool_full,
    shm_no_space, over_limit, side_closed, ...); errors: kind -> handles that
    could not be restored (DataLossError, HandleError, ...) and other
    failures; notes: transport or topic -> why it is not in use, in words;
    peers: what large messages to and from each peer did lately (a
    channel's: its server; a server's: each client route; the process's:
    every live channel's and server's); pool: the process's pool."""

    offloaded: CountBytes
    restored: CountBytes
    by_transport: Dict[str, TransportCounts]
    inline: CountBytes
    fallbacks: Dict[str, int]
    errors: Dict[str, int]
    notes: Dict[str, str]
    peers: List[PeerRecord]
    pool: PoolUsage


__all__ = ["CountBytes", "DirectionRecord", "PeerRecord", "PoolUsage", "StatsSnapshot", "TransportCounts"]
