"""shmgrpc's metrics: one list of names, two optional exporters.

    import shmgrpc.metrics.prometheus
    shmgrpc.metrics.prometheus.register()          # pip install shmgrpc[prometheus]

    import shmgrpc.metrics.otel
    shmgrpc.metrics.otel.instrument()              # pip install shmgrpc[otel]

Both read shmgrpc.stats() (the whole process: every channel and server)
when they are collected; nothing is counted twice and nothing costs
anything between scrapes. METRICS below is the list both publish, with the
Prometheus name (counters get `_total` in the exposition) and the
OpenTelemetry name of each; the README lists them too.

Labels: transport is memfd, shm or cma; direction is "sent" (this process
offloaded the message) or "received" (it restored one); reason is a fallback
reason of stats()["fallbacks"] (peer_not_colocated, pool_full, shm_no_space,
over_limit, side_closed, too_large, ...); kind is an error kind of
stats()["errors"] (DataLossError, HandleError, HandleTooLarge, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Tuple, cast

from ..transports import NAMES as TRANSPORTS
from .._types import StatsSnapshot

Labels = Dict[str, str]
Sample = Tuple[Labels, float]


@dataclass(frozen=True)
class Metric:
    """One metric as both exporters publish it.

    name: the Prometheus name (a counter's samples are name + "_total");
    otel_name, unit: the OpenTelemetry instrument's name and UCUM unit;
    kind: "counter" (monotonic) or "gauge" (a level: Prometheus gauge,
    OpenTelemetry observable up-down counter)."""

    name: str
    otel_name: str
    kind: str
    unit: str
    description: str
    labels: Tuple[str, ...]
    read: Callable[[StatsSnapshot], Iterator[Sample]]

    def samples(self, snap: StatsSnapshot) -> List[Sample]:
        return list(self.read(snap))


def _by_transport(field: str) -> Callable[[StatsSnapshot], Iterator[Sample]]:
    def read(snap: StatsSnapshot) -> Iterator[Sample]:
        by: Mapping[str, Any] = snap["by_transport"]
        for transport in TRANSPORTS:
            counts = by.get(transport)
            if counts is None:
                continue
            yield {"transport": transport, "direction": "sent"}, float(counts["offloaded"][field])
            yield {"transport": transport, "direction": "received"}, float(counts["restored"][field])

    return read


def _keyed(section: str, label: str) -> Callable[[StatsSnapshot], Iterator[Sample]]:
    def read(snap: StatsSnapshot) -> Iterator[Sample]:
        values: Mapping[str, Any] = cast(Mapping[str, Any], snap)[section]
        for key, value in sorted(values.items()):
            yield {label: str(key)}, float(value)

    return read


def _single(section: str, field: str) -> Callable[[StatsSnapshot], Iterator[Sample]]:
    def read(snap: StatsSnapshot) -> Iterator[Sample]:
        yield {}, float(cast(Mapping[str, Any], snap)[section][field])

    return read


METRICS: Tuple[Metric, ...] = (
    Metric("shmgrpc_offloaded_messages", "shmgrpc.offloaded.messages", "counter", "{message}",
           "Messages that travelled as a handle (sent: offloaded here; received: restored here)",
           ("transport", "direction"), _by_transport("count")),
    Metric("shmgrpc_offloaded_bytes", "shmgrpc.offloaded.bytes", "counter", "By",
           "Serialized bytes of the messages that travelled as a handle",
           ("transport", "direction"), _by_transport("bytes")),
    Metric("shmgrpc_inline_messages", "shmgrpc.inline.messages", "counter", "{message}",
           "Messages sent through gRPC itself (below the threshold, or a fallback)",
           (), _single("inline", "count")),
    Metric("shmgrpc_inline_bytes", "shmgrpc.inline.bytes", "counter", "By",
           "Serialized bytes of the messages sent through gRPC itself",
           (), _single("inline", "bytes")),
    Metric("shmgrpc_fallbacks", "shmgrpc.fallbacks", "counter", "{message}",
           "Messages at or above the threshold that went inline, by reason",
           ("reason",), _keyed("fallbacks", "reason")),
    Metric("shmgrpc_errors", "shmgrpc.errors", "counter", "{error}",
           "Handles that could not be restored and other failures, by kind",
           ("kind",), _keyed("errors", "kind")),
    Metric("shmgrpc_pool_capacity_bytes", "shmgrpc.pool.capacity", "gauge", "By",
           "Most bytes the process's pool may map (SHMGRPC_POOL_SIZE, per pool)",
           (), _single("pool", "capacity")),
    Metric("shmgrpc_pool_mapped_bytes", "shmgrpc.pool.mapped", "gauge", "By",
           "Bytes of shared memory the process's pool holds now",
           (), _single("pool", "bytes_mapped")),
    Metric("shmgrpc_pool_in_use_bytes", "shmgrpc.pool.in_use", "gauge", "By",
           "Bytes of pool slots holding messages not yet released",
           (), _single("pool", "bytes_in_use")),
    Metric("shmgrpc_pool_segments", "shmgrpc.pool.segments", "gauge", "{segment}",
           "Segments (memfd and shm) the process's pool holds now",
           (), _single("pool", "segments")),
    Metric("shmgrpc_cma_pinned_bytes", "shmgrpc.cma.pinned", "gauge", "By",
           "Bytes cma keeps pinned for readers that have not acknowledged",
           (), _single("pool", "cma_pinned")),
)


def snapshot() -> StatsSnapshot:
    """shmgrpc.stats(), the one source of both exporters."""
    from .._core import stats

    return stats()


__all__ = ["METRICS", "Metric", "snapshot"]
