"""What shmgrpc puts on the wire, seen from outside it (issue 17).

- No handshake RPC: an interceptor placed outermost on the server (before
  shmgrpc's own, or on a server without shmgrpc) sees exactly the calls the
  application made, method by method; shmgrpc.v1.Handshake/Hello never.
- Hello metadata only on calls that may carry a handle: a unary request at
  or above the threshold, a call of a method that answered large before on
  this channel, every request-streaming call. Anything else carries no
  shmgrpc metadata at all.
- Metadata the application is handed back (initial and trailing) never holds
  a shmgrpc key, whatever the call shape.
- A fresh channel's first call costs no extra round trip.

Servers are tests/_obs_server.py processes (real processes, real sockets);
clients run in the test process, sync and aio.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from collections import deque
from typing import List

import grpc
import pytest

import shmgrpc
import shmgrpc.aio
from protos import echo_test_pb2 as pb
from protos import echo_test_pb2_grpc as pb_grpc
from shmgrpc import wire
from tests._obs import (
    ECHO,
    LARGE,
    SCENARIO,
    SMALL,
    ObsServers,
    expected_methods,
    offloaded,
    restored,
    run_aio,
    run_sync,
)
from tests.conftest import client_config, suite_env
from tests.echo_server import GRPC_OPTIONS, digest, pattern

KINDS = ("sync", "aio")
TRANSPORT = "shm"
SHM_PREFIX = wire.HELLO_KEY.split("-")[0]  # "shmgrpc": every key shmgrpc puts in metadata starts so
OPTIONS = GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def obs():
    servers = ObsServers(suite_env(TRANSPORT))
    servers.start(*[(kind, mode, "record") for kind in KINDS for mode in (True, False)])
    yield servers
    servers.stop_all()


def shm_keys(metadata) -> List[str]:
    return [k for k, _ in (metadata or ()) if k.lower().startswith(SHM_PREFIX)]


def payload(seq: int, size: int, **fields) -> pb.Payload:
    body = pattern(size, seq)
    return pb.Payload(seq=seq, body=body, digest=digest(body), **fields)


def scenario(kind: str, target: str):
    """The shared scenario through a fresh shmgrpc channel: (results, the
    channel's stats)."""
    if kind == "sync":
        channel = shmgrpc.insecure_channel(target, OPTIONS, config=client_config(TRANSPORT))
        try:
            return run_sync(pb_grpc.EchoStub(channel), TIMEOUT), channel.stats()
        finally:
            channel.close()

    async def main():
        channel = shmgrpc.aio.insecure_channel(target, OPTIONS, config=client_config(TRANSPORT))
        try:
            return await run_aio(pb_grpc.EchoStub(channel), TIMEOUT), channel.stats()
        finally:
            await channel.close()

    return asyncio.run(main())


def assert_scenario_ok(results) -> None:
    codes = {r["label"]: r["code"] for r in results}
    expected = {label: "OK" for label, _ in SCENARIO}
    expected["unary_error"] = "OUT_OF_RANGE"
    assert codes == expected, results


# --- (a) an outermost server interceptor sees exactly the application's calls -------------


@pytest.mark.parametrize("client_kind", KINDS)
@pytest.mark.parametrize("server_kind", KINDS)
@pytest.mark.parametrize("server_mode", ["shmgrpc", "plain"])
def test_outer_interceptor_sees_only_application_calls(obs, server_kind, client_kind, server_mode):
    server = obs.get(server_kind, server_mode == "shmgrpc", "record")
    server.take()
    results, client_stats = scenario(client_kind, server.target)
    seen = server.take()
    assert_scenario_ok(results)
    methods = [r["method"] for r in seen["records"]]
    assert wire.HANDSHAKE_METHOD not in methods, f"the server saw shmgrpc's handshake call: {methods}"
    assert methods == expected_methods(), "the outermost interceptor saw other calls than the application made"
    if server_mode == "shmgrpc":
        # Offload happened, both ways, or this test proves nothing.
        assert restored(seen["stats"]) >= 3, seen["stats"]
        assert offloaded(seen["stats"]) >= 3, seen["stats"]
        assert offloaded(client_stats) >= 3 and restored(client_stats) >= 3, client_stats
    else:
        assert offloaded(client_stats) == 0, client_stats


# --- (b) calls that cannot carry a handle carry no shmgrpc metadata ---------------------------


def _metadata_sequence_sync(target: str) -> List[str]:
    """The calls of test_hello_only_where_a_handle_may_travel, in order;
    returns their labels."""
    channel = shmgrpc.insecure_channel(target, OPTIONS, config=client_config(TRANSPORT))
    stub = pb_grpc.EchoStub(channel)
    try:
        stub.Unary(payload(1, SMALL), timeout=TIMEOUT)
        stub.Unary.with_call(payload(2, SMALL), timeout=TIMEOUT)
        stub.Unary.future(payload(3, SMALL), timeout=TIMEOUT).result()
        list(stub.ServerStream(payload(2, SMALL), timeout=TIMEOUT))
        stub.Unary(payload(5, LARGE), timeout=TIMEOUT)
        stub.Unary(payload(6, LARGE), timeout=TIMEOUT)
        stub.ClientStream(iter([payload(4, SMALL)]), timeout=TIMEOUT)
        list(stub.ServerStream(payload(2, SMALL), timeout=TIMEOUT))
        stub.Unary(payload(7, SMALL), timeout=TIMEOUT)
        return channel.stats()
    finally:
        channel.close()


async def _metadata_sequence_aio(target: str):
    channel = shmgrpc.aio.insecure_channel(target, OPTIONS, config=client_config(TRANSPORT))
    stub = pb_grpc.EchoStub(channel)
    try:
        await stub.Unary(payload(1, SMALL), timeout=TIMEOUT)
        call = stub.Unary(payload(2, SMALL), timeout=TIMEOUT)
        await call
        await call.trailing_metadata()
        await stub.Unary(payload(3, SMALL), timeout=TIMEOUT)
        [r async for r in stub.ServerStream(payload(2, SMALL), timeout=TIMEOUT)]
        await stub.Unary(payload(5, LARGE), timeout=TIMEOUT)
        await stub.Unary(payload(6, LARGE), timeout=TIMEOUT)
        await stub.ClientStream(iter([payload(4, SMALL)]), timeout=TIMEOUT)
        [r async for r in stub.ServerStream(payload(2, SMALL), timeout=TIMEOUT)]
        await stub.Unary(payload(7, SMALL), timeout=TIMEOUT)
        return channel.stats()
    finally:
        await channel.close()


# (what, method, carries the hello towards a shmgrpc server, towards a plain one):
# True must, False must not, None either way (a channel that learnt its server
# has no shmgrpc may stop sending it).
SEQUENCE = [
    ("small unary", "Unary", False, False),
    ("small unary with_call", "Unary", False, False),
    ("small unary future (aio: awaited)", "Unary", False, False),
    ("server stream, small request", "ServerStream", False, False),
    ("large unary (the channel's first that may carry a handle)", "Unary", True, True),
    ("large unary", "Unary", True, None),
    ("client stream, small request (request-streaming)", "ClientStream", True, None),
    ("server stream, small request, never answered large", "ServerStream", False, False),
    ("small unary of a method that answered large", "Unary", True, None),
]


@pytest.mark.parametrize("client_kind", KINDS)
@pytest.mark.parametrize("server_mode", ["plain", "shmgrpc"])
def test_hello_only_where_a_handle_may_travel(obs, client_kind, server_mode):
    """A server's outermost interceptor records every call's invocation
    metadata: small calls to methods that never answered large carry no key
    of shmgrpc's, before and after the route is known; a large unary request
    and a request stream carry the hello (towards a server without shmgrpc
    too: the client cannot know before it asked)."""
    server = obs.get("sync", server_mode == "shmgrpc", "record")
    server.take()
    if client_kind == "sync":
        stats = _metadata_sequence_sync(server.target)
    else:
        stats = asyncio.run(_metadata_sequence_aio(server.target))
    records = server.take()["records"]
    problems = []
    if any(r["method"] == wire.HANDSHAKE_METHOD for r in records):
        problems.append(f"the server saw shmgrpc's handshake call {wire.HANDSHAKE_METHOD}")
        records = [r for r in records if r["method"] != wire.HANDSHAKE_METHOD]
    methods = [r["method"] for r in records]
    assert methods == [ECHO + m for _, m, _, _ in SEQUENCE], f"calls seen: {methods}"
    for (what, _, towards_shmgrpc, towards_plain), record in zip(SEQUENCE, records):
        keys = shm_keys([(k, "") for k in record["metadata"]])
        hello = towards_shmgrpc if server_mode == "shmgrpc" else towards_plain
        if hello is False and keys:
            problems.append(f"{what}: carries {keys}")
        if hello is True and wire.HELLO_KEY not in keys:
            problems.append(f"{what}: carries no {wire.HELLO_KEY} (keys: {record['metadata']})")
    assert not problems, "\n".join(problems)
    if server_mode == "shmgrpc":
        assert offloaded(stats) >= 1, stats  # the second large unary at least


# --- (c) metadata handed back to the application ----------------------------------------------


def _returned_metadata_sync(target: str):
    """(initial and trailing metadata of every call shape, the channel's stats)."""
    channel = shmgrpc.insecure_channel(target, OPTIONS, config=client_config(TRANSPORT))
    stub = pb_grpc.EchoStub(channel)
    seen = {}
    try:
        for label, size in (("with_call first, large", LARGE), ("with_call large", LARGE),
                            ("with_call small", SMALL)):
            _, call = stub.Unary.with_call(payload(1, size), timeout=TIMEOUT)
            seen[label] = (call.initial_metadata(), call.trailing_metadata())
        future = stub.Unary.future(payload(2, LARGE), timeout=TIMEOUT)
        future.result()
        seen["future"] = (future.initial_metadata(), future.trailing_metadata())
        stream = stub.ServerStream(payload(3, SMALL, reply_size=LARGE), timeout=TIMEOUT)
        list(stream)
        seen["server stream"] = (stream.initial_metadata(), stream.trailing_metadata())
        _, call = stub.ClientStream.with_call(iter([payload(4, LARGE), payload(5, LARGE)]), timeout=TIMEOUT)
        seen["client stream with_call"] = (call.initial_metadata(), call.trailing_metadata())
        future = stub.ClientStream.future(iter([payload(4, LARGE)]), timeout=TIMEOUT)
        future.result()
        seen["client stream future"] = (future.initial_metadata(), future.trailing_metadata())
        bidi = stub.BidiStream(iter([payload(6, LARGE), payload(7, LARGE)]), timeout=TIMEOUT)
        list(bidi)
        seen["bidi"] = (bidi.initial_metadata(), bidi.trailing_metadata())
        with pytest.raises(grpc.RpcError) as info:
            stub.Unary(pb.Payload(seq=9, body=pattern(LARGE, 9), digest=b"wrong"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        seen["error"] = (info.value.initial_metadata(), info.value.trailing_metadata())
        return seen, channel.stats()
    finally:
        channel.close()


async def _returned_metadata_aio(target: str):
    channel = shmgrpc.aio.insecure_channel(target, OPTIONS, config=client_config(TRANSPORT))
    stub = pb_grpc.EchoStub(channel)
    seen = {}
    try:
        for label, size in (("first, large", LARGE), ("large", LARGE), ("small", SMALL)):
            call = stub.Unary(payload(1, size), timeout=TIMEOUT)
            await call
            seen[label] = (await call.initial_metadata(), await call.trailing_metadata())
        stream = stub.ServerStream(payload(3, SMALL, reply_size=LARGE), timeout=TIMEOUT)
        [r async for r in stream]
        seen["server stream"] = (await stream.initial_metadata(), await stream.trailing_metadata())
        call = stub.ClientStream(iter([payload(4, LARGE), payload(5, LARGE)]), timeout=TIMEOUT)
        await call
        seen["client stream"] = (await call.initial_metadata(), await call.trailing_metadata())
        bidi = stub.BidiStream(iter([payload(6, LARGE), payload(7, LARGE)]), timeout=TIMEOUT)
        [r async for r in bidi]
        seen["bidi"] = (await bidi.initial_metadata(), await bidi.trailing_metadata())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Unary(pb.Payload(seq=9, body=pattern(LARGE, 9), digest=b"wrong"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        seen["error"] = (info.value.initial_metadata(), info.value.trailing_metadata())
        return seen, channel.stats()
    finally:
        await channel.close()


@pytest.mark.parametrize("client_kind", KINDS)
@pytest.mark.parametrize("server_kind", KINDS)
def test_returned_metadata_has_no_shmgrpc_keys(obs, server_kind, client_kind):
    server = obs.get(server_kind, True, "record")
    server.take()
    if client_kind == "sync":
        seen, stats = _returned_metadata_sync(server.target)
    else:
        seen, stats = asyncio.run(_returned_metadata_aio(server.target))
    leaks = {}
    for label, (initial, trailing) in seen.items():
        assert trailing is not None, f"{label}: no trailing metadata"
        keys = shm_keys(initial) + shm_keys(trailing)
        if keys:
            leaks[label] = keys
    assert not leaks, f"shmgrpc keys reached the application: {leaks}"
    assert offloaded(stats) >= 3 and restored(stats) >= 3, stats
    assert offloaded(server.take()["stats"]) >= 3


# --- (d) the first call of a channel costs no extra round trip ---------------------------------


class DelayProxy:
    """127.0.0.1:<port> -> a unix socket, every chunk held back DELAY seconds
    in each direction (order kept): a round trip costs 2 * DELAY more, so one
    extra round trip stands out of any scheduling noise."""

    DELAY = 0.010

    def __init__(self, unix_path: str):
        self.unix_path = unix_path
        self._closed = threading.Event()
        self._sockets = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX)
            up.connect(self.unix_path)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [conn, up]
            for src, dst in ((conn, up), (up, conn)):
                queue: deque = deque()
                ready = threading.Condition()
                threading.Thread(target=self._read, args=(src, queue, ready), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, queue, ready), daemon=True).start()

    def _read(self, src, queue, ready) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            with ready:
                queue.append((time.monotonic() + self.DELAY, data))
                ready.notify()
            if not data:
                return

    def _write(self, dst, queue, ready) -> None:
        while True:
            with ready:
                while not queue:
                    ready.wait()
                due, data = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass


def _first_call_sync(target: str, wrapped: bool) -> float:
    """Seconds of a fresh, connected channel's first (small) call."""
    options = OPTIONS + [("grpc.so_reuseport", 0)]
    raw = grpc.insecure_channel(target, options)
    grpc.channel_ready_future(raw).result(timeout=TIMEOUT)  # connection set up: only the call is timed
    channel = shmgrpc.intercept_channel(raw, client_config(TRANSPORT), options=options) if wrapped else raw
    stub = pb_grpc.EchoStub(channel)
    try:
        start = time.perf_counter()
        stub.Unary(payload(1, SMALL), timeout=TIMEOUT)
        return time.perf_counter() - start
    finally:
        channel.close()


async def _first_call_aio(target: str, wrapped: bool) -> float:
    raw = grpc.aio.insecure_channel(target, OPTIONS)
    await asyncio.wait_for(raw.channel_ready(), TIMEOUT)
    channel = shmgrpc.aio.intercept_channel(raw, client_config(TRANSPORT), options=OPTIONS) if wrapped else raw
    stub = pb_grpc.EchoStub(channel)
    try:
        start = time.perf_counter()
        await stub.Unary(payload(1, SMALL), timeout=TIMEOUT)
        return time.perf_counter() - start
    finally:
        await channel.close()


@pytest.mark.parametrize("client_kind", KINDS)
def test_first_call_costs_no_extra_round_trip(obs, client_kind):
    """Fresh channels, connected, through a proxy that adds DELAY each way:
    the median first call of a shmgrpc channel is within 50% + 2 ms of a
    plain channel's (a handshake round trip first would add 2 * DELAY, about
    100% more)."""
    server = obs.get("sync", True, "record")
    proxy = DelayProxy(server.path)
    times = {True: [], False: []}
    try:
        for _ in range(5):
            for wrapped in (False, True):  # interleaved: noise hits both alike
                if client_kind == "sync":
                    times[wrapped].append(_first_call_sync(proxy.address, wrapped))
                else:
                    times[wrapped].append(asyncio.run(_first_call_aio(proxy.address, wrapped)))
    finally:
        proxy.close()
    server.take()
    plain, shm = statistics.median(times[False]), statistics.median(times[True])
    ms = lambda xs: [round(x * 1000, 1) for x in xs]  # noqa: E731
    assert shm <= plain * 1.5 + 0.002, (
        f"first call: shmgrpc median {shm * 1000:.1f} ms vs plain {plain * 1000:.1f} ms "
        f"(shmgrpc {ms(times[True])}, plain {ms(times[False])}; one round trip = {2 * DelayProxy.DELAY * 1000:.0f} ms)"
    )
