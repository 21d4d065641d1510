"""The shape of stats(): plain dicts, typed for checkers.

`shmgrpc.stats()`, `channel.stats()` and `server.shmgrpc.stats()` return a
StatsSnapshot: a new dict each call, safe to keep, to mutate and to turn
into JSON. These TypedDicts only describe it (they cost nothing at run time).
"""

from __future__ import annotations

from typing import Dict, TypedDict


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


class StatsSnapshot(TypedDict):
    """Counters since the process (or the channel or server) started.

    offloaded / restored: every transport together; by_transport: each of
    "memfd", "shm" and "cma"; inline: messages that went through gRPC
    (below the threshold, or a fallback); fallbacks: reason -> messages that
    could have been offloaded but went inline (peer_not_colocated, pool_full,
    shm_no_space, over_limit, side_closed, ...); errors: kind -> handles that
    could not be restored (DataLossError, HandleError, ...) and other
    failures; notes: transport or topic -> why it is not in use, in words;
    pool: the process's pool."""

    offloaded: CountBytes
    restored: CountBytes
    by_transport: Dict[str, TransportCounts]
    inline: CountBytes
    fallbacks: Dict[str, int]
    errors: Dict[str, int]
    notes: Dict[str, str]
    pool: PoolUsage


__all__ = ["CountBytes", "PoolUsage", "StatsSnapshot", "TransportCounts"]
