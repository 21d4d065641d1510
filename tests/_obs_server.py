"""An Echo server process with one *outermost* interceptor that observes
what reaches the server from the wire (for test_wire_silence.py,
test_interceptors.py and test_otel.py):

    python -m tests._obs_server SPEC

SPEC, JSON:
    kind     "sync" or "aio"
    shmgrpc  true: shmgrpc.server / shmgrpc.aio.server (SHMGRPC_* from the
             environment), the observer passed in `interceptors` (so it is
             outside shmgrpc's); false: grpc.server / grpc.aio.server
    outer    what observes, outermost:
               "record"       records every call's method and invocation
                              metadata keys, before anything else runs
               "gi"           a grpc-interceptor ServerInterceptor (sync) or
                              AsyncServerInterceptor (aio) that records the
                              method and the type of what the handler got
               "otel"         opentelemetry's server_interceptor /
                              aio_server_interceptor, spans to memory
               "otel-global"  GrpcInstrumentorServer / GrpcAioInstrumentorServer
                              instrumented before the server is built (so
                              grpc.server / grpc.aio.server are patched, and
                              shmgrpc.server calls the patched function)
               "otel-inner"   not outermost: grpc.server(interceptors=[
                              shmgrpc's ServerInterceptor, otel's]) (the
                              aio flavours likewise), OTel inside shmgrpc
    path     unix socket path to listen on
    parent   pid: stop when it is no longer our parent

It prints READY + {"pid": ...} once serving, and stops on SIGTERM.

Besides the Echo service of protos/echo_test.proto (tests/echo_server.py's
SyncEcho / AioEcho) it serves /obs.Control/Take (raw bytes): JSON
{"records", "spans", "stats"}: what the observer saw since the last Take
(calls of obs.Control itself left out), the finished spans (see
tests/_obs.py span_of), and server.shmgrpc.stats() (null when plain). Take
first waits until no span has ended for a moment: a server span ends after
the client already has its answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc import aio

from protos import echo_test_pb2_grpc as pb_grpc
from tests._obs import CONTROL_PREFIX, READY, span_of
from tests.echo_server import GRPC_OPTIONS, AioEcho, EchoLogic, SyncEcho

_lock = threading.Lock()
RECORDS = []
EXPORTER = None  # the InMemorySpanExporter, when spans are made
PROVIDER = None


def record(entry: dict) -> None:
    if not entry["method"].startswith(CONTROL_PREFIX):
        with _lock:
            RECORDS.append(entry)


def keys_of(metadata) -> list:
    return [item[0] if isinstance(item, (tuple, list)) else item.key for item in (metadata or ())]


class Record(grpc.ServerInterceptor):
    def intercept_service(self, continuation, details):
        record({"method": details.method, "metadata": keys_of(details.invocation_metadata)})
        return continuation(details)


class AioRecord(aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        record({"method": details.method, "metadata": keys_of(details.invocation_metadata)})
        return await continuation(details)


def _described(obj) -> str:
    if hasattr(obj, "DESCRIPTOR"):
        return obj.DESCRIPTOR.full_name
    if hasattr(obj, "__next__") or hasattr(obj, "__anext__"):
        return "iterator"
    return type(obj).__name__


def gi_interceptors(kind: str):
    from grpc_interceptor import AsyncServerInterceptor, ServerInterceptor

    class GiRecord(ServerInterceptor):
        def intercept(self, method, request_or_iterator, context, method_name):
            record({"method": method_name, "request": _described(request_or_iterator)})
            return method(request_or_iterator, context)

    class AioGiRecord(AsyncServerInterceptor):
        async def intercept(self, method, request_or_iterator, context, method_name):
            record({"method": method_name, "request": _described(request_or_iterator)})
            response_or_iterator = method(request_or_iterator, context)
            if hasattr(response_or_iterator, "__aiter__"):
                return response_or_iterator
            return await response_or_iterator

    return [AioGiRecord() if kind == "aio" else GiRecord()]


def otel_setup(outer: str, kind: str):
    """The observer interceptors for "otel" (explicit) and "otel-global" (none:
    the instrumentor adds its own)."""
    global EXPORTER, PROVIDER
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    EXPORTER = InMemorySpanExporter()
    PROVIDER = TracerProvider()
    PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
    from opentelemetry.instrumentation import grpc as otel_grpc

    if outer == "otel-global":
        trace.set_tracer_provider(PROVIDER)
        if kind == "aio":
            otel_grpc.GrpcAioInstrumentorServer().instrument()
        else:
            otel_grpc.GrpcInstrumentorServer().instrument()
        return []
    if kind == "aio":
        return [otel_grpc.aio_server_interceptor(tracer_provider=PROVIDER)]
    return [otel_grpc.server_interceptor(tracer_provider=PROVIDER)]


def observers(spec) -> list:
    outer, kind = spec["outer"], spec["kind"]
    if outer == "record":
        return [AioRecord() if kind == "aio" else Record()]
    if outer == "gi":
        return gi_interceptors(kind)
    if outer in ("otel", "otel-global"):
        return otel_setup(outer, kind)
    if outer == "otel-inner":
        return otel_setup("otel", kind)
    if outer in (None, "none"):
        return []
    raise SystemExit(f"_obs_server: unknown outer {outer!r}")


def take(stats) -> bytes:
    spans = []
    if EXPORTER is not None:
        seen, quiet_since, deadline = -1, time.monotonic(), time.monotonic() + 3.0
        while time.monotonic() < deadline:
            n = len(EXPORTER.get_finished_spans())
            if n != seen:
                seen, quiet_since = n, time.monotonic()
            elif time.monotonic() - quiet_since > 0.15:
                break
            time.sleep(0.02)
        spans = [span_of(s) for s in EXPORTER.get_finished_spans() if CONTROL_PREFIX.strip("/") not in s.name]
        EXPORTER.clear()
    with _lock:
        records = list(RECORDS)
        RECORDS.clear()
    return json.dumps({"records": records, "spans": spans, "stats": stats()}).encode()


def control(take_handler) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        CONTROL_PREFIX.strip("/"), {"Take": grpc.unary_unary_rpc_method_handler(take_handler)}
    )


def ready(pid: int) -> None:
    print(READY + json.dumps({"pid": pid}), flush=True)


def serve_sync(spec, stop: threading.Event) -> None:
    executor = futures.ThreadPoolExecutor(max_workers=16)
    outer = observers(spec)
    if spec["shmgrpc"] and spec["outer"] == "otel-inner":
        import shmgrpc

        icpt = shmgrpc.ServerInterceptor(options=GRPC_OPTIONS)
        server = grpc.server(executor, interceptors=[icpt, *outer], options=GRPC_OPTIONS)
    elif spec["shmgrpc"]:
        import shmgrpc

        server = shmgrpc.server(executor, interceptors=outer, options=GRPC_OPTIONS)
        icpt = server.shmgrpc
    else:
        server, icpt = grpc.server(executor, interceptors=outer, options=GRPC_OPTIONS), None
    pb_grpc.add_EchoServicer_to_server(SyncEcho(EchoLogic(icpt)), server)
    stats = (lambda: icpt.stats()) if icpt is not None else (lambda: None)
    server.add_generic_rpc_handlers((control(lambda request, context: take(stats)),))
    server.add_insecure_port(f"unix:{spec['path']}")
    server.start()
    ready(os.getpid())
    while not stop.wait(0.5):
        pass
    server.stop(1.0).wait()
    if icpt is not None:
        icpt.close()


async def serve_aio(spec, stop: threading.Event) -> None:
    outer = observers(spec)
    if spec["shmgrpc"] and spec["outer"] == "otel-inner":
        import shmgrpc.aio

        icpt = shmgrpc.aio.ServerInterceptor(options=GRPC_OPTIONS)
        server = aio.server(interceptors=[icpt, *outer], options=GRPC_OPTIONS)
    elif spec["shmgrpc"]:
        import shmgrpc.aio

        server = shmgrpc.aio.server(interceptors=outer, options=GRPC_OPTIONS)
        icpt = server.shmgrpc
    else:
        server, icpt = aio.server(interceptors=outer, options=GRPC_OPTIONS), None
    pb_grpc.add_EchoServicer_to_server(AioEcho(EchoLogic(icpt)), server)
    stats = (lambda: icpt.stats()) if icpt is not None else (lambda: None)

    async def take_handler(request, context):
        return await asyncio.get_running_loop().run_in_executor(None, take, stats)

    server.add_generic_rpc_handlers((control(take_handler),))
    server.add_insecure_port(f"unix:{spec['path']}")
    await server.start()
    ready(os.getpid())
    while not stop.is_set():
        await asyncio.sleep(0.2)
    await server.stop(1.0)
    if icpt is not None:
        icpt.close()


def main() -> int:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:%(name)s:%(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = spec.get("parent")

    def watch():
        while not stop.wait(0.5):
            if parent and os.getppid() != parent:
                stop.set()

    threading.Thread(target=watch, daemon=True).start()
    if spec["kind"] == "aio":
        asyncio.run(serve_aio(spec, stop))
    else:
        serve_sync(spec, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
