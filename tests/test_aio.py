"""shmgrpc.aio: the same offload for grpc.aio clients and servers.

Cross-process, every mix of an aio side with either kind of other side:
aio client x {sync, aio} server and sync client x aio server, all four RPC
shapes, shm and cma, offload proven by the counters of both processes. Then
what only asyncio has: the reader/writer APIs and sync handlers on an aio
server (in one process), a server interceptor of the wrong kind, and calls
cancelled or timed out in the middle of an offloaded stream.

Each aio test body runs in its own event loop (asyncio.run): a grpc.aio
channel belongs to the loop it was made in.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent import futures

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue

import shmgrpc
import shmgrpc.aio
from shmgrpc import wire
from protos import echo_test_pb2 as pb
from protos import echo_test_pb2_grpc as pb_grpc
from tests.conftest import (
    CALL_TIMEOUT,
    MiB,
    KiB,
    client_config,
    counts,
    delta,
    server_env,
    shm_names,
    spawn,
)
from tests.echo_server import GRPC_OPTIONS, EchoLogic, SyncEcho, digest, fingerprint, pattern

# (client kind, server kind): every mix that has an aio side.
MIXES = [("aio", "sync"), ("aio", "aio"), ("sync", "aio")]


def message(seq: int, size: int, **knobs) -> pb.Payload:
    body = pattern(size, seq)
    return pb.Payload(seq=seq, body=body, digest=digest(body), **knobs)


def flags(server_kind: str):
    return ["--aio"] if server_kind == "aio" else []


def drained(pool: dict) -> bool:
    return pool["bytes_in_use"] == 0 and pool["cma_pinned"] == 0


class AioClient:
    """A grpc.aio channel with shmgrpc.aio's interceptors, and its stub.
    Make it inside the loop that uses it."""

    def __init__(self, target: str, config: shmgrpc.Config):
        self.interceptors = shmgrpc.aio.client_interceptors(config)
        self.channel = grpc.aio.insecure_channel(
            target,
            options=[*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)],
            interceptors=self.interceptors,
        )
        self.stub = pb_grpc.EchoStub(self.channel)

    def stats(self) -> dict:
        return self.interceptors[0].stats()  # any of the four: one engine

    async def close(self) -> None:
        await self.channel.close()
        self.interceptors[0].close()


async def eventually(predicate, timeout: float = 5.0):
    """Await until predicate() is true; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


# --- the matrix -----------------------------------------------------------------
#
# One workload, all four shapes, written once per client API. Every message
# at or above the suite's threshold (64 KiB) is offloaded:
#   Unary         1 request, 1 response
#   ServerStream  small request, 3 responses
#   ClientStream  3 requests, 1 response (reply_size sizes the summary)
#   BidiStream    3 requests, 3 responses
REQUESTS, RESPONSES = 7, 8


def unary_request():
    return message(1, 300 * KiB)


def stream_requests():
    return [message(i, 200 * KiB, reply_size=100 * KiB if i == 0 else 0) for i in range(3)]


def bidi_requests():
    return [message(10 + i, 150 * KiB) for i in range(3)]


def check_answers(unary, server_stream, client_stream, bidi):
    assert unary.body == unary_request().body and unary.body_len_seen == 300 * KiB
    assert [(r.seq, r.body) for r in server_stream] == [(i, pattern(200 * KiB, i)) for i in range(3)]
    assert [item.data for item in client_stream.items] == [fingerprint(m) for m in stream_requests()]
    assert client_stream.body == pattern(100 * KiB, 0)
    assert [r.body for r in bidi] == [m.body for m in bidi_requests()]


def sync_workload(stub):
    unary = stub.Unary(unary_request(), timeout=CALL_TIMEOUT)
    server_stream = list(stub.ServerStream(pb.Payload(seq=3, reply_size=200 * KiB), timeout=CALL_TIMEOUT))
    client_stream = stub.ClientStream(iter(stream_requests()), timeout=CALL_TIMEOUT)
    bidi = list(stub.BidiStream(iter(bidi_requests()), timeout=CALL_TIMEOUT))
    return unary, server_stream, client_stream, bidi


async def aio_workload(stub):
    unary = await stub.Unary(unary_request(), timeout=CALL_TIMEOUT)
    server_stream = [r async for r in stub.ServerStream(pb.Payload(seq=3, reply_size=200 * KiB), timeout=CALL_TIMEOUT)]
    client_stream = await stub.ClientStream(iter(stream_requests()), timeout=CALL_TIMEOUT)  # a sync iterable
    call = stub.BidiStream(timeout=CALL_TIMEOUT)  # the reader/writer API
    bidi = []
    for request in bidi_requests():
        await call.write(request)
        bidi.append(await call.read())
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    return unary, server_stream, client_stream, bidi


@pytest.mark.parametrize("client_kind,server_kind", MIXES, ids=[f"{c}-client-{s}-server" for c, s in MIXES])
def test_every_shape_offloads_both_ways(servers, make_client, transport, client_kind, server_kind):
    server = servers.shared(server_env(transport), flags(server_kind))
    before = server.stats()["interceptor"]
    config = client_config(transport)
    if client_kind == "sync":
        client = make_client(server.unix_target, config)
        answers, stats = sync_workload(client.stub), client.stats()
    else:

        async def run():
            client = AioClient(server.unix_target, config)
            try:
                return await aio_workload(client.stub), client.stats()
            finally:
                await client.close()

        answers, stats = asyncio.run(run())
    check_answers(*answers)
    assert counts(stats, transport) == (REQUESTS, RESPONSES), stats
    assert stats["errors"] == {} and stats["fallbacks"] == {}
    after = server.stats()["interceptor"]
    for direction, expected in (("offloaded", RESPONSES), ("restored", REQUESTS)):
        assert delta(after, before, "by_transport", transport, direction, "count") == expected, after
    assert delta(after, before, "fallbacks", "peer_cannot_read") == 0


def test_concurrent_first_calls_share_one_handshake(servers, transport):
    """Eight calls start at once on a new channel: all wait for the one
    handshake, so even these first large messages are offloaded."""
    server = servers.shared(server_env(transport), ["--aio"])

    async def run():
        client = AioClient(server.unix_target, client_config(transport))
        try:
            requests = [message(i, 256 * KiB) for i in range(8)]
            answers = await asyncio.gather(*(client.stub.Unary(r, timeout=CALL_TIMEOUT) for r in requests))
            assert [a.body for a in answers] == [r.body for r in requests]
            return client.stats()
        finally:
            await client.close()

    assert counts(asyncio.run(run()), transport) == (8, 8)


# --- in one process: the APIs only grpc.aio has ---------------------------------------------

SERVICE = "shmgrpc.testing.AioShapes"


def bytes_handler(factory, fn):
    return factory(fn, request_deserializer=BytesValue.FromString, response_serializer=BytesValue.SerializeToString)


async def pull(request_iterator, context):  # stream-unary, reading with context.read()
    total = []
    while True:
        request = await context.read()
        if request is grpc.aio.EOF:
            break
        total.append(request.value)
    return BytesValue(value=b"".join(total))


async def push(request, context):  # unary-stream, writing with context.write()
    for i in range(3):
        await context.write(BytesValue(value=request.value[i:] + request.value[:i]))


def sync_echo(request, context):  # a sync handler on the aio server: grpc runs it in a thread
    return request


def sync_bidi(request_iterator, context):
    for request in request_iterator:
        yield request


def shapes_handler():
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Pull": bytes_handler(grpc.stream_unary_rpc_method_handler, pull),
            "Push": bytes_handler(grpc.unary_stream_rpc_method_handler, push),
            "SyncEcho": bytes_handler(grpc.unary_unary_rpc_method_handler, sync_echo),
            "SyncBidi": bytes_handler(grpc.stream_stream_rpc_method_handler, sync_bidi),
        },
    )


def test_reader_writer_and_sync_handlers_on_an_aio_server(transport, tmp_path):
    config = client_config(transport)

    async def run():
        interceptor = shmgrpc.aio.ServerInterceptor(config)
        server = grpc.aio.server(
            futures.ThreadPoolExecutor(4), interceptors=[interceptor], options=GRPC_OPTIONS
        )
        server.add_generic_rpc_handlers((shapes_handler(),))
        target = f"unix:{tmp_path / 'shapes.sock'}"
        server.add_insecure_port(target)
        await server.start()
        client = AioClient(target, config)
        try:
            ser = dict(request_serializer=BytesValue.SerializeToString, response_deserializer=BytesValue.FromString)
            channel = client.channel
            parts = [pattern(100 * KiB, i) for i in range(3)]
            pulled = await channel.stream_unary(f"/{SERVICE}/Pull", **ser)(
                (BytesValue(value=p) for p in parts), timeout=CALL_TIMEOUT
            )
            assert pulled.value == b"".join(parts)
            body = pattern(150 * KiB, 7)
            pushed = [r.value async for r in channel.unary_stream(f"/{SERVICE}/Push", **ser)(BytesValue(value=body))]
            assert pushed == [body[i:] + body[:i] for i in range(3)]
            echoed = await channel.unary_unary(f"/{SERVICE}/SyncEcho", **ser)(BytesValue(value=body))
            assert echoed.value == body
            bidi = channel.stream_stream(f"/{SERVICE}/SyncBidi", **ser)(iter([BytesValue(value=p) for p in parts]))
            assert [r.value async for r in bidi] == parts
            # requests: 3 pulled + 1 push + 1 echo + 3 bidi; responses: 1 pull + 3 push + 1 echo + 3 bidi
            assert counts(client.stats(), transport) == (8, 8)
            assert counts(interceptor.stats(), transport) == (8, 8)
        finally:
            await client.close()
            await server.stop(None)
            interceptor.close()

    asyncio.run(run())


# --- a server interceptor of the wrong kind --------------------------------------------


def test_sync_interceptor_on_an_aio_server_fails_at_construction():
    """grpc.aio checks the kind itself, before anything serves (its message
    does not name the culprit: grpc/aio/_server.py formats no placeholder)."""

    async def build():
        grpc.aio.server(interceptors=[shmgrpc.ServerInterceptor()])

    with pytest.raises(ValueError, match="Interceptor must be ServerInterceptor"):
        asyncio.run(build())


def test_aio_interceptor_on_a_sync_server_fails_every_call_at_once():
    """A sync grpc.server gives an interceptor no hook before the first call,
    and would choke on the coroutine of an `async def intercept_service`
    (its serving thread dies, calls hang until their deadline). Ours
    notices it is not on a loop and fails each call with the reason."""
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[shmgrpc.aio.ServerInterceptor()])
    pb_grpc.add_EchoServicer_to_server(SyncEcho(EchoLogic()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}"), shmgrpc.ClientInterceptor())
    try:
        stub = pb_grpc.EchoStub(channel)
        calls = [
            lambda: stub.Unary(pb.Payload(), timeout=10),
            lambda: list(stub.ServerStream(pb.Payload(seq=1), timeout=10)),
            lambda: stub.ClientStream(iter([pb.Payload()]), timeout=10),
            lambda: list(stub.BidiStream(iter([pb.Payload()]), timeout=10)),
        ]
        for call in calls:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert time.monotonic() - start < 5
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "grpc.aio.server()" in info.value.details()
            assert "shmgrpc.ServerInterceptor" in info.value.details()
    finally:
        channel.close()
        server.stop(None)


def test_client_interceptors_of_the_wrong_kind_fail_at_construction():
    with pytest.raises(TypeError):
        grpc.intercept_channel(grpc.insecure_channel("127.0.0.1:1"), *shmgrpc.aio.client_interceptors())

    async def build():
        grpc.aio.insecure_channel("127.0.0.1:1", interceptors=[shmgrpc.ClientInterceptor()])

    with pytest.raises(ValueError):
        asyncio.run(build())


# --- calls that end in the middle of an offloaded stream ------------------------------------


@pytest.mark.parametrize("server_kind", ["aio", "sync"])
def test_cancel_and_deadline_mid_stream_leave_nothing_held(fresh_server, transport, server_kind):
    """Default lease (60 s): nothing here waits for it. The aio client frees
    its requests' slots and pins when the call ends; the aio server frees its
    responses' when the call is cancelled. (A sync server leaves its own to
    the lease: see test_lifetime.py.) Then no /dev/shm name is left."""
    server = fresh_server(server_env(transport), flags(server_kind))
    mine_before = set(shm_names(os.getpid()))

    async def run():
        client = AioClient(server.unix_target, client_config(transport))
        try:
            await client.stub.Unary(pb.Payload(), timeout=CALL_TIMEOUT)  # handshake

            # 1. A server stream, cancelled after two of its 1 MiB answers.
            call = client.stub.ServerStream(pb.Payload(seq=40, reply_size=1 * MiB, delay=0.02), timeout=CALL_TIMEOUT)
            got = []
            async for response in call:
                got.append(response)
                if len(got) == 2:
                    break
            call.cancel()
            assert [r.body for r in got] == [pattern(1 * MiB, i) for i in range(2)]

            # 2. A bidi stream past its deadline: the server sleeps after each
            # message while the client's offloaded requests pile up.
            async def requests():
                for i in range(40):
                    yield message(i, 1 * MiB, delay=0.3)

            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in client.stub.BidiStream(requests(), timeout=1.0):
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

            # 3. A client stream past its deadline: the server sleeps on the first.
            slow = [message(i, 1 * MiB, delay=3.0 if i == 0 else 0.0) for i in range(6)]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.stub.ClientStream(iter(slow), timeout=1.0)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

            offloaded, restored = counts(client.stats(), transport)
            assert offloaded >= 3 and restored >= 2
            pool = await eventually(lambda: (lambda p: p if drained(p) else None)(client.stats()["pool"]))
            assert pool, client.stats()["pool"]
            if server_kind == "aio":
                pool = await eventually(
                    lambda: (lambda p: p if drained(p) else None)(server.stats()["interceptor"]["pool"])
                )
                assert pool, server.stats()["interceptor"]["pool"]

            # Still serving, both ways.
            request = message(99, 2 * MiB)
            assert (await client.stub.Unary(request, timeout=CALL_TIMEOUT)).body == request.body
            assert counts(client.stats(), transport) == (offloaded + 1, restored + 1)
        finally:
            await client.close()

    asyncio.run(run())
    # Nothing new is left. Names may only go away: an interceptor of an
    # earlier test can be garbage-collected meanwhile, and its finalizer
    # rightly unlinks its id segment.
    left = set(shm_names(os.getpid())) - mine_before
    assert left == set(), f"this test left {sorted(left)} in /dev/shm"
    pid = server.pid
    server.stop()
    assert shm_names(pid) == []


def test_an_ended_call_does_not_free_its_slots_next_use(servers):
    """Call A's request slot is acknowledged, taken back and handed to call B
    while A still runs; A's end must not free it under B, whose message the
    server reads only after A ended (the slot's generation tells them apart)."""
    server = servers.shared(server_env("shm"), ["--aio"])

    async def run():
        client = AioClient(server.unix_target, client_config("shm", segment_size="1MiB"))
        try:
            await client.stub.Unary(pb.Payload(), timeout=CALL_TIMEOUT)  # handshake
            before = server.stats()["interceptor"]
            a = asyncio.ensure_future(client.stub.Unary(message(1, 1 * MiB, delay=1.0), timeout=CALL_TIMEOUT))
            assert await eventually(
                lambda: delta(server.stats()["interceptor"], before, "restored", "count") == 1
            )
            b_requests = [message(10, 100, delay=2.0), message(11, 1 * MiB)]
            b = asyncio.ensure_future(client.stub.ClientStream(iter(b_requests), timeout=CALL_TIMEOUT))
            assert (await a).body == pattern(1 * MiB, 1)
            summary = await b
            assert [item.data for item in summary.items] == [fingerprint(m) for m in b_requests]
            assert client.stats()["pool"]["segments"] == 1  # B really reused A's slot
        finally:
            await client.close()

    asyncio.run(run())


def test_a_reused_response_slot_is_data_loss_as_an_aio_error(servers):
    """A restore that fails reaches the aio caller as an AioRpcError with the
    failure's status; everything read before it is intact."""
    server = servers.shared(
        server_env("shm", LEASE="0.15s", POOL_SIZE="8MiB", SEGMENT_SIZE="1MiB", CMA_MAX_PINNED="5MiB"),
        ["--aio"],
    )

    async def run():
        client = AioClient(server.unix_target, client_config("shm"))
        try:
            await client.stub.Unary(pb.Payload(), timeout=CALL_TIMEOUT)  # handshake
            call = client.stub.ServerStream(pb.Payload(seq=30, reply_size=2 * MiB, delay=0.1), timeout=CALL_TIMEOUT)
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for response in call:
                    got.append(response)
                    if len(got) == 1:
                        await asyncio.sleep(2.0)
            assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value
            assert "reused" in info.value.details()
            for i, response in enumerate(got):
                assert response.seq == i and response.body == pattern(2 * MiB, i)
            assert client.stats()["errors"] == {"DataLossError": 1}
        finally:
            await client.close()

    asyncio.run(run())


@pytest.mark.parametrize("server_kind", ["aio", "sync"])
def test_server_restart_behind_the_same_address(fresh_server, server_kind, tmp_path):
    """The aio channel reconnects to a new server process on the same socket.
    Its first cma request there is keyed for the old server: refused with the
    retry mark, resent inline, and offload resumes with the new server."""
    path = str(tmp_path / "echo.sock")
    first = fresh_server(server_env("cma"), flags(server_kind), tcp=False, socket_path=path)

    async def call(client, seq):
        request = message(seq, 1 * MiB)
        response = await client.stub.Unary(request, timeout=CALL_TIMEOUT, wait_for_ready=True)
        assert response.body == request.body
        return response.server_pid

    async def run():
        client = AioClient(f"unix:{path}", client_config("cma"))
        try:
            assert await call(client, 1) == first.pid
            assert first.stop() == 0
            second = fresh_server(server_env("cma"), flags(server_kind), tcp=False, socket_path=path)
            assert [await call(client, 10 + i) for i in range(3)] == [second.pid] * 3
            # 1 + the refused one + 2 after the new welcome; responses: 1 + 2
            assert counts(client.stats(), "cma") == (4, 3)
            assert delta(second.stats()["interceptor"], {}, "by_transport", "cma", "restored", "count") == 2
        finally:
            await client.close()

    asyncio.run(run())


def test_a_bad_handle_ends_an_aio_call_with_its_own_status(servers, make_client):
    """A malformed handle, from a client that shook hands: the aio server
    aborts that call with INVALID_ARGUMENT and the reason (not grpc's
    INTERNAL "Exception deserializing request!"), for a unary request and
    for a message of a request stream, and keeps serving."""
    server = servers.shared(server_env("shm"), ["--aio"])
    client = make_client(server.unix_target, client_config("shm"))
    client.stub.Unary(pb.Payload(), timeout=CALL_TIMEOUT)  # the handshake
    hello = client.interceptor._engine.client_metadata()
    bad = wire.frame(wire._COMMON.pack(b"EVIL", wire.KIND_SHM, 100, bytes(16)) + bytes(40))
    raw = dict(request_serializer=None, response_deserializer=None)
    unary = client.raw_channel.unary_unary("/shmgrpc.testing.v1.Echo/Unary", **raw)
    stream = client.raw_channel.stream_unary("/shmgrpc.testing.v1.Echo/ClientStream", **raw)
    for send in (lambda: unary(bad, metadata=[hello], timeout=CALL_TIMEOUT),
                 lambda: stream(iter([b"", bad]), metadata=[hello], timeout=CALL_TIMEOUT)):
        with pytest.raises(grpc.RpcError) as info:
            send()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert info.value.details().startswith("shmgrpc: ") and "bad magic" in info.value.details()
    request = message(5, 1 * MiB)
    assert client.stub.Unary(request, timeout=CALL_TIMEOUT).body == request.body


# --- the loop-stall measurement the README cites -------------------------------------------


def test_loopstall_script_runs():
    """`python -m shmgrpc.aio._loopstall` (small, two modes): it proves each
    mode really offloaded, and reports stalls for both processes."""
    proc = spawn(
        [sys.executable, "-m", "shmgrpc.aio._loopstall", "--size", "1MiB", "--calls", "1", "--modes", "shm,cma", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert [r["mode"] for r in report["results"]] == ["shm", "cma"]
    for r in report["results"]:
        assert r["client"]["max"] >= 0 and r["server"]["max"] >= 0
