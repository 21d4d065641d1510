"""Metrics exporters after real offloaded calls: the Prometheus collector read
through prometheus_client's text exposition, the OpenTelemetry instruments
through the SDK's InMemoryMetricReader. Both read shmgrpc.stats() of this
process, which other tests also move: every check is on a difference."""

from __future__ import annotations

from typing import Dict, Tuple

import pytest

import shmgrpc
from protos import echo_test_pb2 as pb
from tests.conftest import CALL_TIMEOUT, KiB, client_config, suite_env
from tests.echo_server import pattern

SIZE = 256 * KiB
CALLS = 3

Key = Tuple[str, Tuple[Tuple[str, str], ...]]


def exercise(make_client, servers) -> None:
    """CALLS echoes offloaded both ways through shm, one small call (inline),
    one large message that cannot be offloaded (a pool too small for it)."""
    server = servers.shared(suite_env("auto"))
    client = make_client(server.unix_target, client_config("shm"))
    for i in range(CALLS):
        reply = client.stub.Unary(pb.Payload(seq=i, body=pattern(SIZE, i), reply_size=SIZE), timeout=CALL_TIMEOUT)
        assert reply.body == pattern(SIZE, i)
    client.stub.Unary(pb.Payload(seq=9, body=b"small"), timeout=CALL_TIMEOUT)
    tiny = make_client(server.unix_target, client_config("shm", pool_size="64KiB", segment_size="64KiB"))
    assert tiny.stub.Unary(pb.Payload(body=pattern(SIZE, 7)), timeout=CALL_TIMEOUT).body == pattern(SIZE, 7)
    assert tiny.stats()["fallbacks"] == {"pool_too_small": 1}


def test_prometheus_collector_through_text_exposition(make_client, servers):
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    import shmgrpc.metrics.prometheus as shmgrpc_prometheus

    registry = prometheus_client.CollectorRegistry()
    collector = shmgrpc_prometheus.register(registry)
    assert shmgrpc_prometheus.register(registry) is collector  # once per registry

    def scrape() -> Tuple[Dict[Key, float], str]:
        text = prometheus_client.generate_latest(registry).decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples, text

    before, _ = scrape()
    exercise(make_client, servers)
    after, text = scrape()

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in after, f"{key} not exposed:\n{text}"
        return after[key] - before.get(key, 0.0)

    assert "# TYPE shmgrpc_offloaded_messages_total counter" in text
    assert "# TYPE shmgrpc_pool_in_use_bytes gauge" in text
    assert grew("shmgrpc_offloaded_messages_total", transport="shm", direction="sent") == CALLS
    # (+1: the answer to the message that did not fit came back offloaded)
    assert grew("shmgrpc_offloaded_messages_total", transport="shm", direction="received") == CALLS + 1
    assert grew("shmgrpc_offloaded_messages_total", transport="memfd", direction="sent") == 0
    assert grew("shmgrpc_offloaded_bytes_total", transport="shm", direction="sent") >= CALLS * SIZE
    assert grew("shmgrpc_offloaded_bytes_total", transport="shm", direction="received") >= CALLS * SIZE
    assert grew("shmgrpc_inline_messages_total") == 2  # the small call and the one that did not fit
    assert grew("shmgrpc_inline_bytes_total") >= SIZE
    assert grew("shmgrpc_fallbacks_total", reason="pool_too_small") == 1
    for name in ("shmgrpc_pool_capacity_bytes", "shmgrpc_pool_mapped_bytes", "shmgrpc_pool_in_use_bytes",
                 "shmgrpc_pool_segments", "shmgrpc_cma_pinned_bytes"):
        assert (name, ()) in after, name
    assert after[("shmgrpc_pool_capacity_bytes", ())] >= 64 * KiB  # the clients' pools are open
    assert after[("shmgrpc_pool_mapped_bytes", ())] > 0
    assert "# HELP shmgrpc_errors_total " in text

    pool = shmgrpc.stats()["pool"]
    assert after[("shmgrpc_pool_capacity_bytes", ())] == pool["capacity"]


def test_otel_instruments_through_in_memory_reader(make_client, servers):
    pytest.importorskip("opentelemetry.metrics")
    sdk_metrics = pytest.importorskip("opentelemetry.sdk.metrics")
    export = pytest.importorskip("opentelemetry.sdk.metrics.export")

    import shmgrpc.metrics.otel as shmgrpc_otel

    reader = export.InMemoryMetricReader()
    provider = sdk_metrics.MeterProvider(metric_readers=[reader])
    instruments = shmgrpc_otel.instrument(provider)
    assert len(instruments) == 11

    def read() -> Dict[Key, float]:
        points: Dict[Key, float] = {}
        data = reader.get_metrics_data()
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                assert scope.scope.name == "shmgrpc" and scope.scope.version == shmgrpc.__version__
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        attributes = tuple(sorted((k, str(v)) for k, v in (point.attributes or {}).items()))
                        points[(metric.name, attributes)] = point.value
        return points

    before = read()
    exercise(make_client, servers)
    after = read()

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in after, f"{key} not observed: {sorted(after)}"
        return after[key] - before.get(key, 0.0)

    assert grew("shmgrpc.offloaded.messages", transport="shm", direction="sent") == CALLS
    assert grew("shmgrpc.offloaded.messages", transport="shm", direction="received") == CALLS + 1
    assert grew("shmgrpc.offloaded.bytes", transport="shm", direction="sent") >= CALLS * SIZE
    assert grew("shmgrpc.inline.messages") == 2
    assert grew("shmgrpc.fallbacks", reason="pool_too_small") == 1
    assert after[("shmgrpc.pool.capacity", ())] >= 64 * KiB
    for name in ("shmgrpc.pool.mapped", "shmgrpc.pool.in_use", "shmgrpc.pool.segments", "shmgrpc.cma.pinned"):
        assert (name, ()) in after, name
    provider.shutdown()


def test_metric_names_are_documented():
    """Every name both exporters publish is in the README."""
    from shmgrpc.metrics import METRICS
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    for metric in METRICS:
        exposed = metric.name + ("_total" if metric.kind == "counter" else "")
        assert exposed in readme, exposed
        assert metric.otel_name in readme, metric.otel_name
    assert "shmgrpc makes no call of its own" in readme  # nothing to exclude from traces
