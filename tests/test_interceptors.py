"""Client interceptors of every shape, inside and outside shmgrpc's wrapper
(issue 17).

gRPC lets a client interceptor return what it likes of the right shape: a
generator for a response stream, a future or call of its own for a unary
response (grpc/_interceptor.py passes it through). Everything must work for
all four shapes, with the interceptor inside the wrapper
(shmgrpc.intercept_channel(grpc.intercept_channel(channel, icpt))) or outside
it (grpc.intercept_channel(shmgrpc channel, icpt)), sync and aio (aio:
inside only, through shmgrpc.aio.insecure_channel(interceptors=...); grpc.aio
has no intercept_channel to put one outside).

Each scenario runs twice: plain gRPC (client without shmgrpc, server
without shmgrpc) and shmgrpc (both sides), same interceptors. The calls'
outcomes, what the client interceptor saw (methods, message types), and
what the server's outermost interceptor saw (grpc-interceptor's
ServerInterceptor / AsyncServerInterceptor: methods and request types) must
be equal, and the shmgrpc run must have offloaded large messages both ways.
"""

from __future__ import annotations

import asyncio
from typing import Dict, List

import grpc
import grpc_interceptor
import pytest

import shmgrpc
import shmgrpc.aio
from protos import echo_test_pb2_grpc as pb_grpc
from tests._obs import ObsServers, offloaded, restored, run_aio, run_sync
from tests._diff import differences
from tests.conftest import client_config, suite_env
from tests.echo_server import GRPC_OPTIONS

KINDS = ("sync", "aio")
TRANSPORT = "shm"
OPTIONS = GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def obs():
    servers = ObsServers(suite_env(TRANSPORT))
    servers.start(*[(kind, mode, "gi") for kind in KINDS for mode in (True, False)])
    yield servers
    servers.stop_all()


def _type(obj) -> str:
    return obj.DESCRIPTOR.full_name if hasattr(obj, "DESCRIPTOR") else type(obj).__name__


def new_entry(seen: List, shape: str, method, request=None) -> dict:
    """What a client interceptor saw of one call (request and response types
    are kept per call: a stream's requests and responses interleave as the
    threads run)."""
    method = method.decode() if isinstance(method, bytes) else method
    entry = {"shape": shape, "method": method, "requests": [] if request is None else [_type(request)],
             "responses": []}
    seen.append(entry)
    return entry


# --- sync client interceptors --------------------------------------------------------------


class CallWrapper(grpc.Call, grpc.Future):
    """A call and future of the interceptor's own around gRPC's (what an
    interceptor that adds behaviour to a unary call returns)."""

    def __init__(self, inner, entry: dict):
        self._inner = inner
        self._entry = entry

    def initial_metadata(self):
        return self._inner.initial_metadata()

    def trailing_metadata(self):
        return self._inner.trailing_metadata()

    def code(self):
        return self._inner.code()

    def details(self):
        return self._inner.details()

    def is_active(self):
        return self._inner.is_active()

    def time_remaining(self):
        return self._inner.time_remaining()

    def cancel(self):
        return self._inner.cancel()

    def add_callback(self, callback):
        return self._inner.add_callback(callback)

    def cancelled(self):
        return self._inner.cancelled()

    def running(self):
        return self._inner.running()

    def done(self):
        return self._inner.done()

    def result(self, timeout=None):
        response = self._inner.result(timeout)
        self._entry["responses"].append(_type(response))
        return response

    def exception(self, timeout=None):
        return self._inner.exception(timeout)

    def traceback(self, timeout=None):
        return self._inner.traceback(timeout)

    def add_done_callback(self, fn):
        self._inner.add_done_callback(lambda _: fn(self))


class Shapes(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Unary responses: a CallWrapper. Response streams: a generator.
    `seen`: one entry per call, with the types of its requests and of the
    responses the application pulled through the interceptor."""

    def __init__(self):
        self.seen: List = []

    @staticmethod
    def _requests(entry, request_iterator):
        for request in request_iterator:
            entry["requests"].append(_type(request))
            yield request

    @staticmethod
    def _responses(entry, responses):
        for response in responses:
            entry["responses"].append(_type(response))
            yield response

    def intercept_unary_unary(self, continuation, details, request):
        entry = new_entry(self.seen, "unary_unary", details.method, request)
        return CallWrapper(continuation(details, request), entry)

    def intercept_unary_stream(self, continuation, details, request):
        entry = new_entry(self.seen, "unary_stream", details.method, request)
        return self._responses(entry, continuation(details, request))

    def intercept_stream_unary(self, continuation, details, request_iterator):
        entry = new_entry(self.seen, "stream_unary", details.method)
        return CallWrapper(continuation(details, self._requests(entry, request_iterator)), entry)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        entry = new_entry(self.seen, "stream_stream", details.method)
        return self._responses(entry, continuation(details, self._requests(entry, request_iterator)))


class GiClient(grpc_interceptor.ClientInterceptor):
    """grpc-interceptor's ClientInterceptor, as its documentation shows it."""

    def __init__(self):
        self.seen: List = []

    def intercept(self, method, request_or_iterator, call_details):
        new_entry(self.seen, "call", call_details.method)
        return method(request_or_iterator, call_details)


SYNC_INTERCEPTORS = {"shapes": Shapes, "grpc-interceptor": GiClient}


def sync_run(target: str, icpt_name: str, placement: str):
    """(results, what the interceptor saw, client stats or None)."""
    icpt = SYNC_INTERCEPTORS[icpt_name]()
    raw = grpc.insecure_channel(target, OPTIONS)
    if placement == "plain":
        channel, wrapper = grpc.intercept_channel(raw, icpt), None
    elif placement == "inside":
        channel = wrapper = shmgrpc.intercept_channel(grpc.intercept_channel(raw, icpt), client_config(TRANSPORT),
                                                      options=OPTIONS)
    else:
        wrapper = shmgrpc.intercept_channel(raw, client_config(TRANSPORT), options=OPTIONS)
        channel = grpc.intercept_channel(wrapper, icpt)
    try:
        results = run_sync(pb_grpc.EchoStub(channel), TIMEOUT)
        return results, icpt.seen, wrapper.stats() if wrapper is not None else None
    finally:
        (wrapper or raw).close()


# --- aio client interceptors, one class per shape --------------------------------------------


def aio_interceptors(seen: List) -> list:
    aio = grpc.aio

    class UnaryUnary(aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            entry = new_entry(seen, "unary_unary", details.method, request)
            call = await continuation(details, request)
            response = await call  # the response itself instead of the call (grpc.aio allows it here)
            entry["responses"].append(_type(response))
            return response

    class UnaryStream(aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            entry = new_entry(seen, "unary_stream", details.method, request)
            call = await continuation(details, request)

            async def responses():  # an async generator instead of the call
                async for response in call:
                    entry["responses"].append(_type(response))
                    yield response

            return responses()

    class StreamUnary(aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, details, request_iterator):
            new_entry(seen, "stream_unary", details.method)
            return await continuation(details, request_iterator)  # the call (grpc.aio wants one here)

    class StreamStream(aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, details, request_iterator):
            entry = new_entry(seen, "stream_stream", details.method)
            call = await continuation(details, request_iterator)

            async def responses():
                async for response in call:
                    entry["responses"].append(_type(response))
                    yield response

            return responses()

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]


async def aio_run(target: str, placement: str):
    seen: List = []
    if placement == "plain":
        channel = grpc.aio.insecure_channel(target, OPTIONS, interceptors=aio_interceptors(seen))
        stats = None
    else:
        channel = shmgrpc.aio.insecure_channel(target, OPTIONS, interceptors=aio_interceptors(seen),
                                               config=client_config(TRANSPORT))
    try:
        results = await run_aio(pb_grpc.EchoStub(channel), TIMEOUT)
        stats = channel.stats() if placement != "plain" else None
        return results, seen, stats
    finally:
        await channel.close()


# --- the comparison -----------------------------------------------------------------------------


_BASELINES: Dict[tuple, dict] = {}


def observe(obs, client_kind: str, icpt_name: str, placement: str, server_kind: str) -> dict:
    plain = placement == "plain"
    server = obs.get(server_kind, not plain, "gi")
    server.take()
    if client_kind == "sync":
        results, seen, stats = sync_run(server.target, icpt_name, placement)
    else:
        results, seen, stats = asyncio.run(aio_run(server.target, placement))
    taken = server.take()
    return {"results": results, "client_interceptor": seen, "server_interceptor": taken["records"],
            "_client_stats": stats, "_server_stats": taken["stats"]}


def compare(obs, client_kind: str, icpt_name: str, placement: str, server_kind: str) -> None:
    key = (client_kind, icpt_name, server_kind)
    if key not in _BASELINES:
        _BASELINES[key] = observe(obs, client_kind, icpt_name, "plain", server_kind)
    base = _BASELINES[key]
    run = observe(obs, client_kind, icpt_name, placement, server_kind)
    assert all(r["code"] == "OK" for r in base["results"][:-1]), base["results"]  # the baseline itself is sane
    diffs = differences({k: v for k, v in base.items() if not k.startswith("_")},
                        {k: v for k, v in run.items() if not k.startswith("_")})
    assert not diffs, "the shmgrpc run differs from plain gRPC's:\n" + "\n".join(diffs[:30])
    # Offload really happened, both ways.
    assert offloaded(run["_client_stats"]) >= 3 and restored(run["_client_stats"]) >= 3, run["_client_stats"]
    assert offloaded(run["_server_stats"]) >= 3 and restored(run["_server_stats"]) >= 3, run["_server_stats"]


@pytest.mark.parametrize("server_kind", KINDS)
@pytest.mark.parametrize("placement", ["inside", "outside"])
@pytest.mark.parametrize("icpt_name", list(SYNC_INTERCEPTORS))
def test_sync_client_interceptor(obs, icpt_name, placement, server_kind):
    compare(obs, "sync", icpt_name, placement, server_kind)


@pytest.mark.parametrize("server_kind", KINDS)
def test_aio_client_interceptors_inside(obs, server_kind):
    compare(obs, "aio", "aio-shapes", "inside", server_kind)


def test_aio_client_interceptors_outside():
    pytest.skip("grpc.aio has no intercept_channel: an aio interceptor cannot be put around a channel object")
