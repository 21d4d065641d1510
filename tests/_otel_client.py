"""The client process of test_otel.py: one scenario, twice, with
OpenTelemetry's gRPC instrumentation, spans to memory.

    python -c "from tests._otel_client import main; main()" SPEC

SPEC, JSON:
    kind       "sync" or "aio"
    placement  "global": GrpcInstrumentorClient().instrument() (sync) or
                   GrpcAioInstrumentorClient().instrument() (aio) first, then
                   channels built by grpc.insecure_channel /
                   grpc.aio.insecure_channel (baseline) and by
                   shmgrpc.insecure_channel / shmgrpc.aio.insecure_channel
               "inside": the explicit client_interceptor (sync) or
                   aio_client_interceptors (aio) inside shmgrpc's wrapper
               "outside": client_interceptor around shmgrpc's channel
                   (grpcext.intercept_channel; sync only)
    plain      target of a server without shmgrpc (the baseline's)
    shm        target of a shmgrpc server (the shmgrpc run's)
    env        SHMGRPC_* of the shmgrpc channel's Config

Prints one JSON line: {"plain": RUN, "shmgrpc": RUN}, RUN = {"results"
(tests/_obs.py run_sync / run_aio), "spans" (span_of each), "stats" (the
shmgrpc channel's, null for the baseline), "error" (what building the
channel raised, or null)}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation import grpc as otel_grpc
from opentelemetry.instrumentation.grpc import grpcext
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from protos import echo_test_pb2_grpc as pb_grpc
from tests._obs import run_aio, run_sync, span_of
from tests.echo_server import GRPC_OPTIONS

OPTIONS = GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
TIMEOUT = 30.0


def settled_spans(exporter) -> list:
    """The finished spans, once none has ended for a moment (an aio call's
    span ends in a done callback, after the application has its answer)."""
    seen, quiet_since, deadline = -1, time.monotonic(), time.monotonic() + 3.0
    while time.monotonic() < deadline:
        n = len(exporter.get_finished_spans())
        if n != seen:
            seen, quiet_since = n, time.monotonic()
        elif time.monotonic() - quiet_since > 0.15:
            break
        time.sleep(0.02)
    spans = [span_of(s) for s in exporter.get_finished_spans()]
    exporter.clear()
    return spans


def sync_channel(spec, provider, shm: bool):
    """(channel the stub uses, the shmgrpc wrapper or None, what to close)."""
    import shmgrpc

    placement = spec["placement"]
    target = spec["shm"] if shm else spec["plain"]
    config = shmgrpc.Config.from_env(spec["env"]) if shm else None
    if placement == "global":  # grpc.insecure_channel is patched: shmgrpc's calls it
        if not shm:
            channel = grpc.insecure_channel(target, OPTIONS)
            return channel, None, channel
        channel = shmgrpc.insecure_channel(target, OPTIONS, config=config)
        return channel, channel, channel
    # OTel's client_interceptor is one of its grpcext interceptors: it goes on
    # a channel through grpcext.intercept_channel (what GrpcInstrumentorClient does).
    icpt = otel_grpc.client_interceptor(tracer_provider=provider)
    raw = grpc.insecure_channel(target, OPTIONS)
    if not shm:
        return grpcext.intercept_channel(raw, icpt), None, raw
    if placement == "inside":
        wrapper = shmgrpc.intercept_channel(grpcext.intercept_channel(raw, icpt), config, options=OPTIONS)
        return wrapper, wrapper, wrapper
    wrapper = shmgrpc.intercept_channel(raw, config, options=OPTIONS)
    return grpcext.intercept_channel(wrapper, icpt), wrapper, wrapper


def aio_channel(spec, provider, shm: bool):
    import shmgrpc.aio

    placement = spec["placement"]
    target = spec["shm"] if shm else spec["plain"]
    if placement == "global":  # grpc.aio.insecure_channel is patched: shmgrpc's calls it
        if not shm:
            return grpc.aio.insecure_channel(target, OPTIONS)
        return shmgrpc.aio.insecure_channel(target, OPTIONS, config=shmgrpc.Config.from_env(spec["env"]))
    if placement != "inside":
        raise SystemExit(f"aio placement {placement!r}: grpc.aio has no intercept_channel")
    interceptors = otel_grpc.aio_client_interceptors(tracer_provider=provider)
    if not shm:
        return grpc.aio.insecure_channel(target, OPTIONS, interceptors=interceptors)
    return shmgrpc.aio.insecure_channel(target, OPTIONS, interceptors=interceptors,
                                        config=shmgrpc.Config.from_env(spec["env"]))


def run_one_sync(spec, provider, exporter, shm: bool) -> dict:
    try:
        channel, wrapper, closer = sync_channel(spec, provider, shm)
    except Exception as err:  # noqa: BLE001 - reported, compared
        return {"results": [], "spans": [], "stats": None, "error": f"{type(err).__name__}: {err}"}
    try:
        results = run_sync(pb_grpc.EchoStub(channel), TIMEOUT)
        stats = wrapper.stats() if wrapper is not None else None
    finally:
        closer.close()
    return {"results": results, "spans": settled_spans(exporter), "stats": stats, "error": None}


async def run_one_aio(spec, provider, exporter, shm: bool) -> dict:
    try:
        channel = aio_channel(spec, provider, shm)
    except Exception as err:  # noqa: BLE001
        return {"results": [], "spans": [], "stats": None, "error": f"{type(err).__name__}: {err}"}
    try:
        results = await run_aio(pb_grpc.EchoStub(channel), TIMEOUT)
        stats = channel.stats() if shm else None
    finally:
        await channel.close()
    spans = await asyncio.get_running_loop().run_in_executor(None, settled_spans, exporter)
    return {"results": results, "spans": spans, "stats": stats, "error": None}


def main() -> None:
    spec = json.loads(sys.argv[1])
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    if spec["placement"] == "global":
        trace.set_tracer_provider(provider)
        if spec["kind"] == "aio":
            otel_grpc.GrpcAioInstrumentorClient().instrument()
        else:
            otel_grpc.GrpcInstrumentorClient().instrument()
    out = {}
    for name, shm in (("plain", False), ("shmgrpc", True)):
        if spec["kind"] == "aio":
            out[name] = asyncio.run(run_one_aio(spec, provider, exporter, shm))
        else:
            out[name] = run_one_sync(spec, provider, exporter, shm)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
