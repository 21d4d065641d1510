"""shmgrpc.aio: the same offload for grpc.aio clients and servers.

Cross-process, every mix of an aio side with either kind of other side:
aio client x {sync, aio} server and sync client x aio server, all four RPC
shapes, shm and cma, offload proven by the counters of both processes. Then
what only asyncio has: the call objects of the aio channel wrapper (their
reader/writer API, cancel() before the channel's handshake finished), the
reader/writer APIs and sync handlers on an aio server (in one process), a
response handle forged by a fake server, interceptors of the wrong kind and
the deprecated client interceptors, and calls cancelled or timed out in the
middle of an offloaded stream.

Each aio test body runs in its own event loop (asyncio.run): a grpc.aio
channel belongs to the loop it was made in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from concurrent import futures

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue

import shmgrpc
import shmgrpc._client
import shmgrpc.aio
from shmgrpc import wire
from protos import echo_test_pb2 as pb
from protos import echo_test_pb2_grpc as pb_grpc
from tests.conftest import (
    CALL_TIMEOUT,
    MiB,
    THRESHOLD,
    KiB,
    client_config,
    counts,
    delta,
    learn_route_aio,
    shm_names,
    spawn,
    suite_env,
)
from tests.echo_server import GRPC_OPTIONS, EchoLogic, SyncEcho, digest, fingerprint, pattern

# (client kind, server kind): every mix that has an aio side.
MIXES = [("aio", "sync"), ("aio", "aio"), ("sync", "aio")]
CHANNEL_OPTIONS = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


def message(seq: int, size: int, **knobs) -> pb.Payload:
    body = pattern(size, seq)
    return pb.Payload(seq=seq, body=body, digest=digest(body), **knobs)


def flags(server_kind: str):
    return ["--aio"] if server_kind == "aio" else []


def drained(pool: dict) -> bool:
    return pool["bytes_in_use"] == 0 and pool["cma_pinned"] == 0


class AioClient:
    """A grpc.aio channel wrapped by shmgrpc.aio (told the channel's options,
    so it knows the raised message-size limits), and its stub. Make it inside
    the loop that uses it.

    `make`: "intercept" wraps a channel of our own with
    shmgrpc.aio.intercept_channel(); "insecure" lets
    shmgrpc.aio.insecure_channel() build it (`interceptors` then run inside
    the wrapper, on the inner channel)."""

    def __init__(self, target: str, config: shmgrpc.Config, make: str = "intercept", interceptors=None):
        if make == "intercept":
            raw = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)
            self.channel = shmgrpc.aio.intercept_channel(raw, config, options=CHANNEL_OPTIONS)
        else:
            self.channel = shmgrpc.aio.insecure_channel(
                target, CHANNEL_OPTIONS, interceptors=interceptors, config=config
            )
        assert isinstance(self.channel, shmgrpc.aio.Channel) and isinstance(self.channel, grpc.aio.Channel)
        self.stub = pb_grpc.EchoStub(self.channel)

    async def learned(self) -> "AioClient":
        """This client, its channel's route learned (see conftest.learn_route)."""
        await learn_route_aio(self.stub, max(THRESHOLD, self.channel._engine.config.threshold))
        return self

    def stats(self) -> dict:
        return self.channel.stats()

    async def close(self) -> None:
        await self.channel.close()  # closes the wrapped channel too


async def eventually(predicate, timeout: float = 5.0):
    """Await until predicate() is true; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def pool_drained(stats_of) -> dict:
    """The pool of stats_of() once nothing is in use (or its last state)."""
    last = {}

    def check():
        last["pool"] = stats_of()["pool"]
        return drained(last["pool"])

    await eventually(check)
    return last["pool"]


def check_settled(channel, transport: str) -> None:
    status = shmgrpc.channel_status(channel)
    assert status == channel.status()
    assert (status.transport, status.transports, status.settled) == (transport, (transport,), True), status
    # Each way: what carried the large messages (or, before any, what is expected), never inline.
    assert status.sent.via == transport and not status.sent.fallback, status
    assert status.received.via == transport and not status.received.fallback, status
    assert str(status).startswith(f"{transport}: requests "), str(status)
    assert channel.transports == (transport,)


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
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    return unary, server_stream, client_stream, bidi


@pytest.mark.parametrize("client_kind,server_kind", MIXES, ids=[f"{c}-client-{s}-server" for c, s in MIXES])
def test_every_shape_offloads_both_ways(servers, make_client, transport, client_kind, server_kind):
    server = servers.shared(suite_env(transport), flags(server_kind))
    before = server.stats()["interceptor"]
    config = client_config(transport)
    if client_kind == "sync":
        client = make_client(server.unix_target, config)
        answers, stats = sync_workload(client.stub), client.stats()
        check_settled(client.channel, transport)
    else:

        async def run():
            client = await AioClient(server.unix_target, config).learned()
            try:
                answers = await aio_workload(client.stub)
                check_settled(client.channel, transport)
                return answers, client.stats()
            finally:
                await client.close()

        answers, stats = asyncio.run(run())
    check_answers(*answers)
    assert counts(stats, transport) == (REQUESTS, RESPONSES), stats
    assert stats["errors"] == {} and stats["fallbacks"] == {}
    # What the channel's status and stats say they did: every large message each way via the transport.
    (peer,) = stats["peers"]
    for way, moved in (("sent", REQUESTS), ("received", RESPONSES)):
        assert peer[way]["via"] == transport and peer[way]["recent"] == {transport: moved}, peer
    after = server.stats()
    for direction, expected in (("offloaded", RESPONSES), ("restored", REQUESTS)):
        assert delta(after["interceptor"], before, "by_transport", transport, direction, "count") == expected, after
    assert delta(after["interceptor"], before, "fallbacks", "peer_cannot_read") == 0
    # The server says the same of this process's route (shared with other channels of this process: its latest).
    ours = [p for p in after["interceptor"]["peers"] if p["pid"] == os.getpid()]
    assert any(p["sent"]["via"] == p["received"]["via"] == transport for p in ours), ours
    assert any(line.startswith(f"client pid {os.getpid()}: {transport}: requests via {transport}; responses via "
                               f"{transport}") for line in after["peer_status"]), after["peer_status"]


class Methods:
    """Records the method of every call of the channel its `interceptors` are
    installed on (inside the shmgrpc wrapper, so the handshake call too,
    whatever its shape). grpc.aio files an interceptor under its first
    matching kind: one per kind."""

    def __init__(self):
        self.seen = []
        seen = self.seen

        def note(details):
            method = details.method
            seen.append(method.decode() if isinstance(method, bytes) else method)

        class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
            async def intercept_unary_unary(self, continuation, details, request):
                note(details)
                return await continuation(details, request)

        class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
            async def intercept_unary_stream(self, continuation, details, request):
                note(details)
                return await continuation(details, request)

        class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
            async def intercept_stream_unary(self, continuation, details, requests):
                note(details)
                return await continuation(details, requests)

        class StreamStream(grpc.aio.StreamStreamClientInterceptor):
            async def intercept_stream_stream(self, continuation, details, requests):
                note(details)
                return await continuation(details, requests)

        self.interceptors = [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]


def test_concurrent_first_calls_learn_the_route_without_a_handshake(servers, transport):
    """Eight large calls start at once on a new channel. There is no
    handshake call: each carries the hello and goes inline (the channel has
    no route yet), every answer is right, and their trailers settle the
    channel. The interceptors inside the wrapper see only the application's
    calls. The next eight are offloaded both ways."""
    server = servers.shared(suite_env(transport), ["--aio"])
    before = server.stats()["interceptor"]

    async def run():
        methods = Methods()
        client = AioClient(server.unix_target, client_config(transport), make="insecure",
                           interceptors=methods.interceptors)
        try:
            assert client.channel.status().settled is False
            requests = [message(i, 256 * KiB) for i in range(8)]
            answers = await asyncio.gather(*(client.stub.Unary(r, timeout=CALL_TIMEOUT) for r in requests))
            assert [a.body for a in answers] == [r.body for r in requests]
            assert methods.seen == ["/shmgrpc.testing.v1.Echo/Unary"] * 8, methods.seen
            assert counts(client.stats(), transport) == (0, 0)
            after = server.stats()["interceptor"]
            for direction in ("offloaded", "restored"):
                assert delta(after, before, "by_transport", transport, direction, "count") == 0, after
            check_settled(client.channel, transport)

            before_more = server.stats()["interceptor"]
            more = [message(10 + i, 256 * KiB) for i in range(8)]
            answers = await asyncio.gather(*(client.stub.Unary(r, timeout=CALL_TIMEOUT) for r in more))
            assert [a.body for a in answers] == [r.body for r in more]
            assert wire.HANDSHAKE_METHOD not in methods.seen
            assert counts(client.stats(), transport) == (8, 8)
            after = server.stats()["interceptor"]
            for direction in ("offloaded", "restored"):
                assert delta(after, before_more, "by_transport", transport, direction, "count") == 8, after
            stats = client.stats()
            assert stats["errors"] == {} and stats["fallbacks"] == {}
        finally:
            await client.close()

    asyncio.run(run())


# --- the aio wrapper's call objects ---------------------------------------------------------


def test_response_stream_read_and_async_for_through_the_wrapper(servers, transport):
    """A unary-stream call of the wrapper read both ways grpc.aio offers:
    read() until EOF, and async iteration; each offloaded response arrives
    intact, and the call ends OK with the server's metadata."""
    server = servers.shared(suite_env(transport), ["--aio"])

    async def run():
        client = await AioClient(server.unix_target, client_config(transport), make="insecure").learned()
        try:
            call = client.stub.ServerStream(pb.Payload(seq=4, reply_size=300 * KiB), timeout=CALL_TIMEOUT)
            assert isinstance(call, grpc.aio.UnaryStreamCall)
            read = []
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                read.append(response)
            assert [(r.seq, r.body) for r in read] == [(i, pattern(300 * KiB, i)) for i in range(4)]
            assert await call.code() == grpc.StatusCode.OK and call.done()
            assert await call.read() is grpc.aio.EOF  # and it stays at the end
            assert await call.initial_metadata() is not None
            assert await call.trailing_metadata() is not None

            call = client.stub.ServerStream(pb.Payload(seq=3, reply_size=300 * KiB), timeout=CALL_TIMEOUT)
            iterated = [r async for r in call]
            assert [(r.seq, r.body) for r in iterated] == [(i, pattern(300 * KiB, i)) for i in range(3)]
            assert await call.code() == grpc.StatusCode.OK

            # requests: 2 small; responses: 4 + 3
            assert counts(client.stats(), transport) == (0, 7)
            assert client.stats()["errors"] == {}
            assert drained(await pool_drained(client.stats))
        finally:
            await client.close()

    asyncio.run(run())


def test_write_done_writing_read_through_the_wrapper(servers, transport):
    """The reader/writer API of the wrapper's request streams: a client
    stream written with write() and done_writing() then awaited, and a bidi
    stream that writes everything, says done_writing(), then read()s every
    answer until EOF."""
    server = servers.shared(suite_env(transport), ["--aio"])

    async def run():
        client = await AioClient(server.unix_target, client_config(transport)).learned()
        try:
            requests = stream_requests()
            call = client.stub.ClientStream(timeout=CALL_TIMEOUT)
            assert isinstance(call, grpc.aio.StreamUnaryCall)
            for request in requests:
                await call.write(request)
            await call.done_writing()
            summary = await call
            assert [item.data for item in summary.items] == [fingerprint(m) for m in requests]
            assert summary.body == pattern(100 * KiB, 0)
            assert await call.code() == grpc.StatusCode.OK

            call = client.stub.BidiStream(timeout=CALL_TIMEOUT)
            assert isinstance(call, grpc.aio.StreamStreamCall)
            requests = bidi_requests()
            for request in requests:
                await call.write(request)
            await call.done_writing()
            answers = []
            while (response := await call.read()) is not grpc.aio.EOF:
                answers.append(response)
            assert [r.body for r in answers] == [m.body for m in requests]
            assert await call.code() == grpc.StatusCode.OK

            # requests: 3 + 3; responses: 1 summary + 3
            assert counts(client.stats(), transport) == (6, 4)
            assert drained(await pool_drained(client.stats))
        finally:
            await client.close()

    asyncio.run(run())


def test_cancel_the_first_call_of_a_fresh_channel(servers, transport):
    """The first (large) call of a fresh channel is cancelled at once, before
    any answer could bring the route. The call is cancelled as a grpc.aio
    call would be (cancel() True, cancelled(), done(), its done callbacks
    run, awaiting it raises CancelledError), nothing is held, no handshake
    call is ever made, and the channel learns its route from its next calls
    and offloads."""
    server = servers.shared(suite_env(transport), ["--aio"])
    mine_before = set(shm_names(os.getpid()))

    async def run():
        methods = Methods()
        client = AioClient(server.unix_target, client_config(transport), interceptors=methods.interceptors)
        try:
            call = client.stub.Unary(message(1, 1 * MiB), timeout=CALL_TIMEOUT)
            assert isinstance(call, grpc.aio.UnaryUnaryCall)
            done = []
            call.add_done_callback(done.append)
            assert client.channel.status().settled is False
            assert not call.done()
            assert call.cancel() is True
            with pytest.raises(asyncio.CancelledError):
                await call
            assert call.cancelled() and call.done()
            assert done == [call]
            assert client.channel.status().settled is False  # a cancelled call says nothing

            fresh = AioClient(server.unix_target, client_config(transport))
            try:
                bidi = fresh.stub.BidiStream(timeout=CALL_TIMEOUT)
                assert bidi.cancel() is True
                with pytest.raises(asyncio.CancelledError):
                    await bidi.read()
            finally:
                await fresh.close()

            assert counts(client.stats(), transport) == (0, 0)
            assert drained(client.stats()["pool"])
            for seq in (3, 4):  # the first learns the route (inline), the second is offloaded
                request = message(seq, 1 * MiB)
                assert (await client.stub.Unary(request, timeout=CALL_TIMEOUT)).body == request.body
            assert counts(client.stats(), transport) == (1, 1)
            assert wire.HANDSHAKE_METHOD not in methods.seen
            check_settled(client.channel, transport)
            assert drained(await pool_drained(client.stats))
        finally:
            await client.close()

    asyncio.run(run())
    left = set(shm_names(os.getpid())) - mine_before
    assert left == set(), f"this test left {sorted(left)} in /dev/shm"


def test_a_first_call_cancelled_at_once_reports_cancelled(servers):
    """grpc.aio's Call contract, for the first call of a channel cancelled at once:
    code() is CANCELLED and the metadata methods return, as they do for a
    plain grpc.aio call cancelled at once. They must not raise
    CancelledError into a task nobody cancelled."""
    server = servers.shared(suite_env("shm"), ["--aio"])

    async def run():
        plain = grpc.aio.insecure_channel(server.unix_target, options=CHANNEL_OPTIONS)
        client = AioClient(server.unix_target, client_config("shm"))
        try:
            outcomes = []
            for channel in (plain, client.channel):
                call = pb_grpc.EchoStub(channel).Unary(message(1, 1 * MiB), timeout=CALL_TIMEOUT)
                assert call.cancel()
                outcome = {}
                for name in ("code", "details", "initial_metadata", "trailing_metadata"):
                    try:
                        outcome[name] = await getattr(call, name)()
                    except asyncio.CancelledError:
                        outcome[name] = "raised CancelledError"
                outcomes.append(outcome)
            plain_outcome, wrapped = outcomes
            assert plain_outcome["code"] == grpc.StatusCode.CANCELLED
            assert wrapped["code"] == grpc.StatusCode.CANCELLED, wrapped
            for name in ("details", "initial_metadata", "trailing_metadata"):
                assert wrapped[name] != "raised CancelledError", wrapped
        finally:
            await plain.close()
            await client.close()

    asyncio.run(run())


# --- a forged response handle ---------------------------------------------------------------

FORGE = "shmgrpc.testing.Forge"


def _forged_shm(length: int, name: str = "shmgrpc-1-1-0123456789abcdef-1") -> bytes:
    return wire.encode_shm(wire.ShmHandle(length, bytes(16), 1, 0, 0, name))


# What the fake server answers, by the request's bytes: (frame, status, words in the details).
FORGED = {
    b"bad-magic": (
        wire.frame(wire._COMMON.pack(b"EVIL", wire.KIND_SHM, 0, 100, bytes(16)) + bytes(40)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad magic",
    ),
    b"no-segment": (_forged_shm(100), grpc.StatusCode.DATA_LOSS, "does not exist"),
    b"too-long": (_forged_shm(2**31), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
}
GOOD = BytesValue(value=b"genuine").SerializeToString()


class HandshakeOnly(grpc.aio.ServerInterceptor):
    """A fake shmgrpc server: a genuine shmgrpc engine answers the hello of a
    first contact (its welcome in the trailers: the client's later calls are
    framed and it reads their response frames), but nothing of shmgrpc
    touches the framed calls themselves: their handlers send raw bytes,
    forged frames included."""

    def __init__(self, config: shmgrpc.Config):
        self.shmgrpc = shmgrpc.aio.ServerInterceptor(config, options=GRPC_OPTIONS)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        hello = wire.metadata_value(handler_call_details.invocation_metadata, wire.HELLO_KEY)
        route = self.shmgrpc._engine.server.route(hello) if hello is not None else None
        if handler is None or route is None or route.framed:
            return handler
        return self.shmgrpc.handler_for(handler_call_details, handler)


LEARN = b"learn"  # a request the forge answers large, in genuine bytes


def forge_handler():
    async def unary(request, context):
        if request.startswith(LEARN):
            return BytesValue(value=request).SerializeToString()
        assert wire.metadata_value(context.invocation_metadata(), wire.HELLO_KEY) is not None  # framed
        return FORGED[request][0] if request in FORGED else GOOD

    async def stream(request, context):  # a genuine message first, then the forgery
        if request == LEARN:  # a small request answered large
            yield BytesValue(value=LEARN + bytes(THRESHOLD)).SerializeToString()
            return
        yield GOOD
        yield FORGED[request][0]

    async def bidi(requests, context):
        async for request in requests:
            yield GOOD
            yield FORGED[request][0]

    return grpc.method_handlers_generic_handler(
        FORGE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


def test_a_forged_response_handle_is_an_aio_error_with_its_own_status(tmp_path):
    """A server the client shook hands with answers framed calls with forged
    handles: the aio caller gets an AioRpcError with the failure's own status
    (INVALID_ARGUMENT, DATA_LOSS, RESOURCE_EXHAUSTED) and details starting
    "shmgrpc: " (grpc.aio itself would hand it None with status OK), from
    await, read() and async iteration alike; what was read before is intact,
    nothing is held, and the channel goes on."""
    config = client_config("shm")

    async def run():
        fake = HandshakeOnly(config)
        server = grpc.aio.server(interceptors=[fake], options=GRPC_OPTIONS)
        server.add_generic_rpc_handlers((forge_handler(),))
        target = f"unix:{tmp_path / 'forge.sock'}"
        server.add_insecure_port(target)
        await server.start()
        client = AioClient(target, config)
        channel = client.channel
        ser = dict(request_serializer=None, response_deserializer=BytesValue.FromString)
        unary = channel.unary_unary(f"/{FORGE}/Unary", **ser)
        stream = channel.unary_stream(f"/{FORGE}/Stream", **ser)
        bidi = channel.stream_stream(f"/{FORGE}/Bidi", **ser)
        try:
            # A large request carries the hello and learns the route; Unary and
            # Stream answer large once, so their small calls carry it too.
            learn = LEARN + bytes(THRESHOLD)
            assert (await unary(learn, timeout=CALL_TIMEOUT)).value == learn
            assert [r.value async for r in stream(LEARN, timeout=CALL_TIMEOUT)] == [learn]
            check_settled(channel, "shm")
            assert (await unary(b"hello", timeout=CALL_TIMEOUT)).value == b"genuine"

            def check(err: grpc.aio.AioRpcError, key: bytes):
                _, code, words = FORGED[key]
                assert err.code() == code, (key, err.code(), err.details())
                assert err.details().startswith("shmgrpc: ") and words in err.details(), err.details()

            for key in FORGED:
                call = unary(key, timeout=CALL_TIMEOUT)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                check(info.value, key)
                assert await call.code() == FORGED[key][1]
                assert (await call.details()).startswith("shmgrpc: ")

            call = stream(b"no-segment", timeout=CALL_TIMEOUT)  # read()
            assert (await call.read()).value == b"genuine"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            check(info.value, b"no-segment")
            assert await call.code() == grpc.StatusCode.DATA_LOSS

            got = []
            with pytest.raises(grpc.aio.AioRpcError) as info:  # async for
                async for response in stream(b"bad-magic", timeout=CALL_TIMEOUT):
                    got.append(response.value)
            assert got == [b"genuine"]
            check(info.value, b"bad-magic")

            call = bidi(timeout=CALL_TIMEOUT)  # write() / read()
            await call.write(b"too-long")
            assert (await call.read()).value == b"genuine"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            check(info.value, b"too-long")

            errors = client.stats()["errors"]
            assert errors == {"HandleError": 2, "DataLossError": 2, "HandleTooLarge": 2}, errors
            assert drained(client.stats()["pool"])
            assert (await unary(b"again", timeout=CALL_TIMEOUT)).value == b"genuine"
        finally:
            await client.close()
            await server.stop(None)
            fake.shmgrpc.close()

    asyncio.run(run())


# --- in one process: the APIs only grpc.aio has ---------------------------------------------

SERVICE = "shmgrpc.testing.AioShapes"


def bytes_handler(factory, fn):
    return factory(fn, request_deserializer=BytesValue.FromString, response_serializer=BytesValue.SerializeToString)


def no_hello(context) -> None:
    keys = [key for key, _ in context.invocation_metadata()]
    assert wire.HELLO_KEY not in keys, keys


async def pull(request_iterator, context):  # stream-unary, reading with context.read()
    no_hello(context)
    total = []
    while True:
        request = await context.read()
        if request is grpc.aio.EOF:
            break
        total.append(request.value)
    return BytesValue(value=b"".join(total))


async def push(request, context):  # unary-stream, writing with context.write()
    no_hello(context)
    for i in range(3):
        await context.write(BytesValue(value=request.value[i:] + request.value[:i]))


def sync_echo(request, context):  # a sync handler on the aio server: grpc runs it in a thread
    no_hello(context)
    return request


def sync_bidi(request_iterator, context):
    no_hello(context)
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
    """shmgrpc.aio.server(): handlers that read with context.read() and write
    with context.write(), and sync handlers grpc runs in its thread pool; none
    of them sees shmgrpc's hello in invocation_metadata()."""
    config = client_config(transport)

    async def run():
        server = shmgrpc.aio.server(futures.ThreadPoolExecutor(4), options=GRPC_OPTIONS, config=config)
        interceptor = server.shmgrpc
        assert isinstance(interceptor, shmgrpc.aio.ServerInterceptor)
        server.add_generic_rpc_handlers((shapes_handler(),))
        target = f"unix:{tmp_path / 'shapes.sock'}"
        server.add_insecure_port(target)
        await server.start()
        client = AioClient(target, config)
        try:
            ser = dict(request_serializer=BytesValue.SerializeToString, response_deserializer=BytesValue.FromString)
            channel = client.channel
            parts = [pattern(100 * KiB, i) for i in range(3)]
            body = pattern(150 * KiB, 7)

            async def every_shape():
                pulled = await channel.stream_unary(f"/{SERVICE}/Pull", **ser)(
                    (BytesValue(value=p) for p in parts), timeout=CALL_TIMEOUT
                )
                assert pulled.value == b"".join(parts)
                pushed = [r.value async for r in channel.unary_stream(f"/{SERVICE}/Push", **ser)(BytesValue(value=body))]
                assert pushed == [body[i:] + body[:i] for i in range(3)]
                echoed = await channel.unary_unary(f"/{SERVICE}/SyncEcho", **ser)(BytesValue(value=body))
                assert echoed.value == body
                bidi = channel.stream_stream(f"/{SERVICE}/SyncBidi", **ser)(iter([BytesValue(value=p) for p in parts]))
                assert [r.value async for r in bidi] == parts

            # The first round learns the route (its first call carries the
            # hello, inline) and that Push answers large (its request is small).
            await every_shape()
            mine, theirs = counts(client.stats(), transport), counts(interceptor.stats(), transport)
            await every_shape()
            # requests: 3 pulled + 1 push + 1 echo + 3 bidi; responses: 1 pull + 3 push + 1 echo + 3 bidi
            after_mine, after_theirs = counts(client.stats(), transport), counts(interceptor.stats(), transport)
            assert (after_mine[0] - mine[0], after_mine[1] - mine[1]) == (8, 8)
            assert (after_theirs[0] - theirs[0], after_theirs[1] - theirs[1]) == (8, 8)
            assert client.stats()["errors"] == {} and interceptor.stats()["errors"] == {}
        finally:
            await client.close()
            await server.stop(None)
            interceptor.close()

    asyncio.run(run())


class SwapResponse(grpc.aio.ServerInterceptor):
    """Outermost: answers Echo with another message than the handler's."""

    def __init__(self, replacement: bytes):
        self.replacement = replacement

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.endswith("/Echo"):
            return handler
        inner, replacement = handler.unary_unary, self.replacement

        async def swapped(request, context):
            await inner(request, context)
            return BytesValue(value=replacement)

        return handler._replace(unary_unary=swapped)


def test_large_responses_of_async_handlers_are_serialized_off_the_loop(transport, tmp_path):
    """Once a method of an async handler has answered large, its responses are
    serialized in shmgrpc's thread (not on the event loop, whose malloc arena
    also holds the request: see aio/_server.py _Responses), for a returned
    response and for context.write() alike, and offloaded; an outer
    interceptor that answers with another message gets that one to the
    client, never the one serialized ahead."""
    config = client_config(transport)
    threads = []

    def serialize(message):
        threads.append(threading.current_thread().name)
        return message.SerializeToString()

    async def echo(request, context):
        return request

    async def push(request, context):
        for i in range(2):
            await context.write(BytesValue(value=request.value[i:] + request.value[:i]))

    def handler(factory, fn):
        return factory(fn, request_deserializer=BytesValue.FromString, response_serializer=serialize)

    service = "shmgrpc.testing.OffLoop"
    replacement = pattern(300 * KiB, 9)

    async def run():
        server = shmgrpc.aio.server(interceptors=[SwapResponse(replacement)], options=GRPC_OPTIONS, config=config)
        interceptor = server.shmgrpc
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {
            "Plain": handler(grpc.unary_unary_rpc_method_handler, echo),
            "Echo": handler(grpc.unary_unary_rpc_method_handler, echo),
            "Push": handler(grpc.unary_stream_rpc_method_handler, push),
        }),))
        target = f"unix:{tmp_path / 'offloop.sock'}"
        server.add_insecure_port(target)
        await server.start()
        client = AioClient(target, config)
        ser = dict(request_serializer=BytesValue.SerializeToString, response_deserializer=BytesValue.FromString)
        try:
            channel = client.channel
            body = pattern(200 * KiB, 3)
            plain = channel.unary_unary(f"/{service}/Plain", **ser)
            echoed = channel.unary_unary(f"/{service}/Echo", **ser)
            pushed = channel.unary_stream(f"/{service}/Push", **ser)
            for _ in range(2):  # the first calls learn the route and that each method answers large
                assert (await plain(BytesValue(value=body))).value == body
                assert (await echoed(BytesValue(value=body))).value == replacement
                assert [r.value async for r in pushed(BytesValue(value=body))] == [body, body[1:] + body[:1]]
            threads.clear()
            before = counts(interceptor.stats(), transport)
            for _ in range(3):
                assert (await plain(BytesValue(value=body))).value == body
                assert (await echoed(BytesValue(value=body))).value == replacement
                assert [r.value async for r in pushed(BytesValue(value=body))] == [body, body[1:] + body[:1]]
            after = counts(interceptor.stats(), transport)
            assert (after[0] - before[0], after[1] - before[1]) == (3 * 4, 3 * 3)  # every response and request
            # Plain and Push: 3 + 6 responses, each serialized once, off the loop;
            # Echo: the handler's response off the loop (then dropped), the
            # replacement on the loop when grpc asks for it.
            assert threads.count("MainThread") == 3, threads
            assert all(name.startswith("shmgrpc-serialize") for name in threads if name != "MainThread"), threads
            assert len(threads) == 3 + 3 + 3 + 6, threads
            assert client.stats()["errors"] == {} and interceptor.stats()["errors"] == {}
        finally:
            await client.close()
            await server.stop(None)
            interceptor.close()

    asyncio.run(run())


# --- interceptors of the wrong kind, and the deprecated client interceptors --------------------


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
    notices it is not on a loop and fails each call with the reason, the
    shmgrpc client's handshake included."""
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[shmgrpc.aio.ServerInterceptor()])
    pb_grpc.add_EchoServicer_to_server(SyncEcho(EchoLogic()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = shmgrpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}"))
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
        assert channel.status().transport == "inline"
    finally:
        channel.close()
        server.stop(None)


def test_client_interceptors_of_the_wrong_kind_fail_at_construction():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(TypeError):
            grpc.intercept_channel(grpc.insecure_channel("127.0.0.1:1"), *shmgrpc.aio.client_interceptors())

        async def build():
            grpc.aio.insecure_channel("127.0.0.1:1", interceptors=[shmgrpc.ClientInterceptor()])

        with pytest.raises(ValueError):
            asyncio.run(build())


def test_deprecated_aio_client_interceptors_pass_through_and_warn(servers, monkeypatch, caplog):
    """shmgrpc.aio.client_interceptors() and the four aio interceptor classes
    still build and run, but offload nothing: calls through them are plain
    gRPC (the server restores and offloads nothing), each construction warns
    (DeprecationWarning) and the process logs one WARNING naming the fix."""
    server = servers.shared(suite_env("shm"), ["--aio"])
    monkeypatch.setattr(shmgrpc._client, "_warned", False)
    caplog.set_level(logging.WARNING, logger="shmgrpc")
    with pytest.warns(DeprecationWarning, match="intercept_channel") as warned:
        interceptors = shmgrpc.aio.client_interceptors(client_config("shm"))
        others = [
            shmgrpc.aio.UnaryStreamClientInterceptor(),
            shmgrpc.aio.StreamUnaryClientInterceptor(),
            shmgrpc.aio.StreamStreamClientInterceptor(),
        ]
    assert len([w for w in warned if issubclass(w.category, DeprecationWarning)]) == 4
    logged = [r for r in caplog.records if r.name.startswith("shmgrpc") and r.levelno == logging.WARNING]
    assert len(logged) == 1 and "shmgrpc.aio.intercept_channel" in logged[0].getMessage()
    assert isinstance(interceptors[0], shmgrpc.aio.UnaryUnaryClientInterceptor)
    before = server.stats()["interceptor"]

    async def run():
        channel = grpc.aio.insecure_channel(
            server.unix_target, options=CHANNEL_OPTIONS, interceptors=[*interceptors, *others]
        )
        try:
            stub = pb_grpc.EchoStub(channel)
            request = message(1, 1 * MiB)
            assert (await stub.Unary(request, timeout=CALL_TIMEOUT)).body == request.body
            got = [r async for r in stub.ServerStream(pb.Payload(seq=2, reply_size=1 * MiB), timeout=CALL_TIMEOUT)]
            assert [r.body for r in got] == [pattern(1 * MiB, i) for i in range(2)]
            summary = await stub.ClientStream(iter([request]), timeout=CALL_TIMEOUT)
            assert [item.data for item in summary.items] == [fingerprint(request)]
            assert [r.body async for r in stub.BidiStream(iter([request]), timeout=CALL_TIMEOUT)] == [request.body]
        finally:
            await channel.close()

    asyncio.run(run())
    after = server.stats()["interceptor"]
    assert delta(after, before, "offloaded", "count") == 0
    assert delta(after, before, "restored", "count") == 0
    for icpt in [*interceptors, *others]:
        assert icpt.transports == () and icpt.stats()["offloaded"]["count"] == 0
        assert "deprecated" in icpt.stats()["notes"]
        icpt.close()
    assert len([r for r in caplog.records if r.name.startswith("shmgrpc") and r.levelno == logging.WARNING]) == 1


# --- calls that end in the middle of an offloaded stream ------------------------------------


@pytest.mark.parametrize("server_kind", ["aio", "sync"])
def test_cancel_and_deadline_mid_stream_leave_nothing_held(fresh_server, transport, server_kind):
    """Default lease (60 s): nothing here waits for it. The aio client frees
    its requests' slots and pins when the call ends; the aio server frees its
    responses' when the call is cancelled. (A sync server leaves its own to
    the lease: see test_lifetime.py.) Then no /dev/shm name is left."""
    server = fresh_server(suite_env(transport), flags(server_kind))
    mine_before = set(shm_names(os.getpid()))

    async def run():
        client = await AioClient(server.unix_target, client_config(transport)).learned()
        try:
            await client.stub.Unary(pb.Payload(), timeout=CALL_TIMEOUT)  # handshake

            # 1. A server stream, cancelled after two of its 1 MiB answers.
            call = client.stub.ServerStream(pb.Payload(seq=40, reply_size=1 * MiB, delay=0.02), timeout=CALL_TIMEOUT)
            got = []
            async for response in call:
                got.append(response)
                if len(got) == 2:
                    break
            assert call.cancel()
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
            pool = await pool_drained(client.stats)
            assert drained(pool), pool
            if server_kind == "aio":
                pool = await pool_drained(lambda: server.stats()["interceptor"])
                assert drained(pool), pool

            # Still serving, both ways.
            request = message(99, 2 * MiB)
            assert (await client.stub.Unary(request, timeout=CALL_TIMEOUT)).body == request.body
            assert counts(client.stats(), transport) == (offloaded + 1, restored + 1)
        finally:
            await client.close()

    asyncio.run(run())
    # Nothing new is left. Names may only go away: an engine of an earlier
    # test can be garbage-collected meanwhile, and its finalizer rightly
    # unlinks what its node made.
    left = set(shm_names(os.getpid())) - mine_before
    assert left == set(), f"this test left {sorted(left)} in /dev/shm"
    pid = server.pid
    server.stop()
    assert shm_names(pid) == []


def test_an_ended_call_does_not_free_its_slots_next_use(servers):
    """Call A's request slot is acknowledged, taken back and handed to call B
    while A still runs; A's end must not free it under B, whose message the
    server reads only after A ended (the slot's generation tells them apart)."""
    server = servers.shared(suite_env("shm"), ["--aio"])

    async def run():
        client = await AioClient(server.unix_target, client_config("shm", segment_size="1MiB")).learned()
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
        suite_env("shm", LEASE="0.15s", POOL_SIZE="8MiB", SEGMENT_SIZE="1MiB", CMA_MAX_PINNED="5MiB"),
        ["--aio"],
    )

    async def run():
        client = await AioClient(server.unix_target, client_config("shm")).learned()
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
            details = info.value.details()
            assert details.startswith("shmgrpc: ") and "reused" in details, details
            assert await call.code() == grpc.StatusCode.DATA_LOSS
            for i, response in enumerate(got):
                assert response.seq == i and response.body == pattern(2 * MiB, i)
            assert client.stats()["errors"] == {"DataLossError": 1}, client.stats()
        finally:
            await client.close()

    asyncio.run(run())


@pytest.mark.parametrize("server_kind", ["aio", "sync"])
def test_server_restart_behind_the_same_address(fresh_server, server_kind, tmp_path):
    """The aio channel reconnects to a new server process on the same socket.
    Its first cma request there is keyed for the old server: refused with the
    retry mark, resent inline, and offload resumes with the new server."""
    path = str(tmp_path / "echo.sock")
    first = fresh_server(suite_env("cma"), flags(server_kind), tcp=False, socket_path=path)

    async def call(client, seq):
        request = message(seq, 1 * MiB)
        response = await client.stub.Unary(request, timeout=CALL_TIMEOUT, wait_for_ready=True)
        assert response.body == request.body
        return response.server_pid

    async def run():
        client = await AioClient(f"unix:{path}", client_config("cma")).learned()
        try:
            assert await call(client, 1) == first.pid
            assert first.stop() == 0
            second = fresh_server(suite_env("cma"), flags(server_kind), tcp=False, socket_path=path)
            assert [await call(client, 10 + i) for i in range(3)] == [second.pid] * 3
            # 1 + the refused one + 2 after the new welcome; responses: 1 + 2
            assert counts(client.stats(), "cma") == (4, 3)
            assert client.stats()["fallbacks"] == {"resent_inline": 1}
            assert delta(second.stats()["interceptor"], {}, "by_transport", "cma", "restored", "count") == 2
        finally:
            await client.close()

    asyncio.run(run())


def test_a_bad_handle_ends_an_aio_call_with_its_own_status(servers, make_client):
    """A malformed handle, from a client that shook hands: the aio server
    aborts that call with INVALID_ARGUMENT and the reason (not grpc's
    INTERNAL "Exception deserializing request!"), for a unary request and
    for a message of a request stream, and keeps serving."""
    server = servers.shared(suite_env("shm"), ["--aio"])
    client = make_client(server.unix_target, client_config("shm"))
    client.stub.Unary(pb.Payload(), timeout=CALL_TIMEOUT)  # the handshake
    state = client.engine.client.call_state()
    assert state is not None and state[1] is not None  # a hello that names the server
    hello = state[0]
    bad = wire.frame(wire._COMMON.pack(b"EVIL", wire.KIND_SHM, 0, 100, bytes(16)) + bytes(40))
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
    """`python -m shmgrpc.tools.loopstall` (small, two modes): it proves each
    mode really offloaded, and reports stalls for both processes."""
    proc = spawn(
        [sys.executable, "-m", "shmgrpc.tools.loopstall", "--size", "1MiB", "--calls", "1", "--modes", "shm,cma", "--json"],
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
