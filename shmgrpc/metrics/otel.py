"""shmgrpc's metrics through the OpenTelemetry metrics API (`pip install shmgrpc[otel]`).

    import shmgrpc.metrics.otel
    shmgrpc.metrics.otel.instrument()              # the global MeterProvider
    # or instrument(meter_provider)

Observable instruments (callbacks that read shmgrpc.stats() of this
process at each collection), on the meter "shmgrpc":
shmgrpc.offloaded.messages, shmgrpc.offloaded.bytes (counters; attributes
transport, direction), shmgrpc.inline.messages, shmgrpc.inline.bytes,
shmgrpc.fallbacks (reason), shmgrpc.errors (kind) (counters),
shmgrpc.pool.capacity, shmgrpc.pool.mapped, shmgrpc.pool.in_use,
shmgrpc.pool.segments, shmgrpc.cma.pinned (up-down counters). Only the API
is needed here; the SDK and an exporter are the application's choice.

The handshake is a gRPC call of its own (once per channel); to keep it out
of traces made by opentelemetry-instrumentation-grpc, set
OTEL_PYTHON_GRPC_EXCLUDED_SERVICES=shmgrpc.v1.Handshake.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional

try:
    from opentelemetry import metrics as _metrics
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "shmgrpc.metrics.otel needs the OpenTelemetry API: pip install 'shmgrpc[otel]'"
    ) from err

from .._version import __version__
from . import METRICS, Metric, snapshot

__all__ = ["METER_NAME", "instrument"]

METER_NAME = "shmgrpc"


def _callback(metric: Metric) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, attributes) for attributes, value in metric.samples(snapshot())]

    return observe


def instrument(meter_provider: Optional[MeterProvider] = None) -> List[Any]:
    """Create shmgrpc's observable instruments on the meter "shmgrpc" of
    `meter_provider` (default: the global one) and return them. Call it
    once per provider."""
    meter = (
        _metrics.get_meter(METER_NAME, __version__)
        if meter_provider is None
        else meter_provider.get_meter(METER_NAME, __version__)
    )
    made: List[Any] = []
    for metric in METRICS:
        create = (meter.create_observable_counter if metric.kind == "counter"
                  else meter.create_observable_up_down_counter)
        made.append(create(metric.otel_name, callbacks=[_callback(metric)], unit=metric.unit,
                           description=metric.description))
    return made
