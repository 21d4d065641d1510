"""OpenTelemetry's gRPC instrumentation through shmgrpc: differential (issue 17).

The real opentelemetry-instrumentation-grpc and opentelemetry-sdk, spans to
an InMemorySpanExporter in each process:

- global instrumentors: GrpcInstrumentorClient / GrpcAioInstrumentorClient
  (they patch grpc.insecure_channel / grpc.aio.insecure_channel, which
  shmgrpc's own insecure_channel functions call) and GrpcInstrumentorServer /
  GrpcAioInstrumentorServer (they patch grpc.server / grpc.aio.server, which
  shmgrpc.server / shmgrpc.aio.server call);
- explicit interceptors: client_interceptor inside and outside the wrapper,
  aio_client_interceptors inside shmgrpc.aio.insecure_channel,
  server_interceptor / aio_server_interceptor outermost on the server, or
  inside shmgrpc's ServerInterceptor.

They patch grpc globally, so every party is a process of its own
(tests/_otel_client.py, tests/_obs_server.py). Each client process runs the
scenario of tests/_obs.py twice: against a server without shmgrpc through a
channel without shmgrpc (the baseline), then through shmgrpc against a
shmgrpc server, both servers instrumented alike. Responses, status codes,
and the spans of client and server together (names, kinds, status, gRPC
code, count, parent/child structure across the two processes) must be
equal, and the shmgrpc run must have offloaded large messages both ways.

The scenario has a server-streaming call (OTel's sync client interceptor
returns a generator for it) and, for aio, the channel is built after
GrpcAioInstrumentorClient().instrument() (which passes `interceptors` to
grpc.aio.insecure_channel by keyword).
"""

from __future__ import annotations

import json

import pytest

from tests._diff import differences
from tests._obs import ObsServers, offloaded, restored, span_tree
from tests.conftest import run_python, suite_env

TRANSPORT = "shm"

# (client kind, client placement, server kind, server instrumentation): every
# instrumentation kind of both sides at least once, sync and aio crossed.
# Server instrumentation: "otel-global" (the instrumentor), "otel" (the explicit
# interceptor, outermost), "otel-inner" (the explicit interceptor inside
# shmgrpc's: grpc.server(interceptors=[shmgrpc.ServerInterceptor(), otel's])).
CASES = [
    ("sync", "global", "sync", "otel-global"),
    ("aio", "global", "aio", "otel-global"),
    ("aio", "global", "sync", "otel-global"),
    ("sync", "inside", "aio", "otel"),
    ("sync", "outside", "sync", "otel"),
    ("aio", "inside", "sync", "otel"),
    ("sync", "inside", "sync", "otel-inner"),
    ("aio", "inside", "aio", "otel-inner"),
]


@pytest.fixture(scope="module")
def obs():
    servers = ObsServers(suite_env(TRANSPORT))
    servers.start(*{(kind, mode, outer) for _, _, kind, outer in CASES for mode in (False, True)})
    yield servers
    servers.stop_all()


@pytest.mark.parametrize("client_kind,placement,server_kind,server_otel", CASES,
                         ids=[f"{c}-client-{p}-{s}-server-{o}" for c, p, s, o in CASES])
def test_otel_spans_and_responses_equal_plain(obs, client_kind, placement, server_kind, server_otel):
    plain_server = obs.get(server_kind, False, server_otel)
    shm_server = obs.get(server_kind, True, server_otel)
    plain_server.take(), shm_server.take()
    spec = {"kind": client_kind, "placement": placement, "plain": plain_server.target,
            "shm": shm_server.target, "env": suite_env(TRANSPORT)}
    out = run_python("import tests._otel_client as c; c.main()", json.dumps(spec), timeout=90)
    plain_seen, shm_seen = plain_server.take(), shm_server.take()
    base, run = out["plain"], out["shmgrpc"]
    assert base["error"] is None, f"the baseline's channel could not be built: {base['error']}"
    assert base["spans"] and plain_seen["spans"], "the baseline made no spans: the instrumentation is not in place"
    assert all(r["code"] == "OK" for r in base["results"][:-1]), base["results"]

    assert run["error"] is None, f"building the shmgrpc channel raised {run['error']}"
    observed = lambda r, seen: {  # noqa: E731
        "results": r["results"],
        "spans": span_tree(r["spans"], seen["spans"]),
        "client_span_count": len(r["spans"]),
        "server_span_count": len(seen["spans"]),
    }
    diffs = differences(observed(base, plain_seen), observed(run, shm_seen))
    assert not diffs, "the shmgrpc run differs from plain gRPC's:\n" + "\n".join(diffs[:40])
    # Offload really happened, both ways, on both sides.
    assert offloaded(run["stats"]) >= 3 and restored(run["stats"]) >= 3, run["stats"]
    assert offloaded(shm_seen["stats"]) >= 3 and restored(shm_seen["stats"]) >= 3, shm_seen["stats"]
