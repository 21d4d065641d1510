"""shmgrpc's metrics for prometheus_client (`pip install shmgrpc[prometheus]`).

    import shmgrpc.metrics.prometheus
    shmgrpc.metrics.prometheus.register()        # into prometheus_client.REGISTRY
    # or register(my_registry)

A collector, not counters of its own: each scrape reads shmgrpc.stats() of
this process. The names are in shmgrpc.metrics.METRICS (and the README):
shmgrpc_offloaded_messages_total{transport,direction},
shmgrpc_offloaded_bytes_total{transport,direction},
shmgrpc_inline_messages_total, shmgrpc_inline_bytes_total,
shmgrpc_fallbacks_total{reason}, shmgrpc_errors_total{kind},
shmgrpc_pool_capacity_bytes, shmgrpc_pool_mapped_bytes,
shmgrpc_pool_in_use_bytes, shmgrpc_pool_segments, shmgrpc_cma_pinned_bytes.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Iterator, List, Optional

try:
    from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "shmgrpc.metrics.prometheus needs prometheus_client: pip install 'shmgrpc[prometheus]'"
    ) from err

from .._types import StatsSnapshot
from . import METRICS, Metric, snapshot

__all__ = ["ShmgrpcCollector", "register"]


def _family(metric: Metric, with_samples: bool, snap: Optional[StatsSnapshot]) -> Any:
    labels = list(metric.labels)
    family: Any
    if metric.kind == "counter":
        family = CounterMetricFamily(metric.name, metric.description, labels=labels)
    else:
        family = GaugeMetricFamily(metric.name, metric.description, labels=labels)
    if with_samples and snap is not None:
        for sample_labels, value in metric.samples(snap):
            family.add_metric([sample_labels[label] for label in labels], value)
    return family


class ShmgrpcCollector(Collector):
    """A prometheus_client collector of shmgrpc.stats() (or of `source`, a
    function returning a stats dict: a channel's or server's .stats)."""

    def __init__(self, source: Optional[Callable[[], StatsSnapshot]] = None) -> None:
        self._source = source if source is not None else snapshot

    def describe(self) -> List[Any]:
        # Names only: registering never has to read the counters.
        return [_family(metric, False, None) for metric in METRICS]

    def collect(self) -> Iterator[Any]:
        snap = self._source()
        for metric in METRICS:
            yield _family(metric, True, snap)


_lock = threading.Lock()
_registered: "weakref.WeakKeyDictionary[CollectorRegistry, ShmgrpcCollector]" = weakref.WeakKeyDictionary()


def register(registry: Optional[CollectorRegistry] = None) -> ShmgrpcCollector:
    """Register shmgrpc's collector (process-wide stats) in `registry`
    (default: prometheus_client.REGISTRY) and return it. Registering twice
    in the same registry returns the collector registered first."""
    target = REGISTRY if registry is None else registry
    with _lock:
        existing = _registered.get(target)
        if existing is not None:
            return existing
        collector = ShmgrpcCollector()
        target.register(collector)
        _registered[target] = collector
        return collector
