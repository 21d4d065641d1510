"""Every RPC shape, sizes around the threshold, both transports, both directions.

The client lives in the pytest process, the server is a separate process. Each
test predicts, message by message, which side offloads what (the threshold
applies to the serialized size), and checks the counters of both engines
against that prediction as well as every byte that came back.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

import shmgrpc
from protos import echo_test_pb2 as pb
from shmgrpc import wire
from tests.conftest import CALL_TIMEOUT, MiB, THRESHOLD, Outbox, client_config, counts, delta, payload_of_size
from tests.echo_server import GRPC_OPTIONS, EchoLogic, digest, fingerprint, pattern

SIZES = {
    "small": 1000,
    "below": THRESHOLD - 1,
    "at": THRESHOLD,
    "above": THRESHOLD + 1,
    "1MiB": 1 * MiB,
    "8MiB": 8 * MiB,
}
STREAM_LEN = 4


def other(transport: str) -> str:
    return "cma" if transport == "shm" else "shm"


def server_logic(pid: int) -> EchoLogic:
    """The server's own reply logic, to predict its answers byte for byte."""
    logic = EchoLogic()
    logic.pid = pid
    return logic


def offloaded(messages) -> int:
    return sum(1 for m in messages if m.ByteSize() >= THRESHOLD)


def inline(messages) -> int:
    return sum(1 for m in messages if m.ByteSize() < THRESHOLD)


def check_counters(client, server, before, transport, requests, responses):
    """Exactly the messages at or above the threshold were offloaded, by the
    transport under test, and restored on the other side."""
    mine = client.stats()
    theirs = server.stats()["shmgrpc"]
    up, down = offloaded(requests), offloaded(responses)
    assert counts(mine, transport) == (up, down)
    assert counts(mine, other(transport)) == (0, 0)
    assert mine["inline"]["count"] == inline(requests)
    assert delta(theirs, before, "by_transport", transport, "restored", "count") == up
    assert delta(theirs, before, "by_transport", transport, "offloaded", "count") == down
    assert delta(theirs, before, "by_transport", other(transport), "offloaded", "count") == 0
    assert delta(theirs, before, "inline", "count") == inline(responses)
    assert delta(theirs, before, "restored", "bytes") == sum(
        m.ByteSize() for m in requests if m.ByteSize() >= THRESHOLD
    )
    assert mine["restored"]["bytes"] == sum(m.ByteSize() for m in responses if m.ByteSize() >= THRESHOLD)
    assert not mine["errors"], mine["errors"]
    assert theirs["errors"] == before["errors"], theirs["errors"]


@pytest.mark.parametrize("size", [*SIZES.values(), 32 * MiB], ids=[*SIZES, "32MiB"])
def test_unary(client, echo_server, transport, size):
    before = echo_server.stats()["shmgrpc"]
    request = payload_of_size(size, seq=7, note="unary")
    assert request.ByteSize() == size
    response = client.stub.Unary(request, timeout=CALL_TIMEOUT)

    assert response == server_logic(echo_server.pid).reply(request)
    assert response.body == request.body and response.body_len_seen == len(request.body)
    check_counters(client, echo_server, before, transport, [request], [response])


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_server_stream(client, echo_server, transport, size):
    # The client's learn_route had ServerStream answer large once: its calls
    # carry the hello, small requests too.
    before = echo_server.stats()["shmgrpc"]
    request = payload_of_size(size, seq=STREAM_LEN, note="server stream")
    responses = list(client.stub.ServerStream(request, timeout=CALL_TIMEOUT))

    logic = server_logic(echo_server.pid)
    assert responses == [logic.reply(request, seq=i) for i in range(STREAM_LEN)]
    assert all(r.body == request.body for r in responses)
    check_counters(client, echo_server, before, transport, [request], responses)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_client_stream(client, echo_server, transport, size):
    before = echo_server.stats()["shmgrpc"]
    # The first message asks for a reply body as large as the messages, so
    # the one response crosses the threshold too (or not) with them.
    requests = [
        payload_of_size(size, seq=i, reply_size=size if i == 0 else 0, digest=bytes(32))
        for i in range(STREAM_LEN)
    ]
    for r in requests:
        r.digest = digest(r.body)  # same length as the placeholder: the size holds
        assert r.ByteSize() == size
    response = client.stub.ClientStream(iter(requests), timeout=CALL_TIMEOUT)

    assert response == server_logic(echo_server.pid).summary(requests)
    assert [item.data for item in response.items] == [fingerprint(r) for r in requests]
    assert [list(item.numbers) for item in response.items] == [[r.seq, len(r.body)] for r in requests]
    assert response.body == pattern(size, 0)
    check_counters(client, echo_server, before, transport, requests, [response])


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_bidi_stream(client, echo_server, transport, size):
    before = echo_server.stats()["shmgrpc"]
    requests = [payload_of_size(size, seq=i, note="bidi") for i in range(STREAM_LEN)]
    responses = list(client.stub.BidiStream(iter(requests), timeout=CALL_TIMEOUT))

    logic = server_logic(echo_server.pid)
    assert responses == [logic.reply(r) for r in requests]
    assert [r.body for r in responses] == [r.body for r in requests]
    check_counters(client, echo_server, before, transport, requests, responses)


def test_bidi_lockstep(client, echo_server, transport):
    """Each response is read before the next request is written: offload in
    both directions interleaves on one call, and slots are reused."""
    before = echo_server.stats()["shmgrpc"]
    outbox = Outbox()
    call = client.stub.BidiStream(iter(outbox), timeout=CALL_TIMEOUT)
    sent, got = [], []
    logic = server_logic(echo_server.pid)
    for i, size in enumerate([2 * MiB, 100, 3 * MiB, THRESHOLD, 2 * MiB, 5 * MiB]):
        request = payload_of_size(size, seq=i)
        outbox.put(request)
        response = next(call)
        assert response == logic.reply(request)
        sent.append(request)
        got.append(response)
    outbox.close()
    assert list(call) == []
    check_counters(client, echo_server, before, transport, sent, got)


@pytest.mark.parametrize("size", [THRESHOLD - 1, THRESHOLD, THRESHOLD + 1], ids=["T-1", "T", "T+1"])
def test_request_threshold_is_exact(client, echo_server, transport, size):
    """The client offloads a request of exactly the threshold, not one byte less."""
    before = echo_server.stats()["shmgrpc"]
    request = payload_of_size(size, seq=1)
    response = client.stub.Unary(request, timeout=CALL_TIMEOUT)
    assert response.body == request.body
    up = 1 if size >= THRESHOLD else 0
    assert client.stats()["by_transport"][transport]["offloaded"] == {"count": up, "bytes": size * up}
    assert client.stats()["inline"]["count"] == 1 - up
    after = echo_server.stats()["shmgrpc"]
    assert delta(after, before, "by_transport", transport, "restored", "count") == up
    assert delta(after, before, "by_transport", transport, "restored", "bytes") == size * up


@pytest.mark.parametrize("size", [THRESHOLD - 1, THRESHOLD, THRESHOLD + 1], ids=["T-1", "T", "T+1"])
def test_response_threshold_is_exact(client, echo_server, transport, size):
    """The server offloads a response of exactly the threshold, not one byte less."""
    logic = server_logic(echo_server.pid)
    request = None
    for body_len in range(size - 40, size):
        candidate = pb.Payload(seq=2, body=pattern(body_len, 2))
        if logic.reply(candidate).ByteSize() == size:
            request = candidate
            break
    assert request is not None and request.ByteSize() < THRESHOLD  # only the response may cross
    before = echo_server.stats()["shmgrpc"]
    response = client.stub.Unary(request, timeout=CALL_TIMEOUT)
    assert response.ByteSize() == size and response.body == request.body
    down = 1 if size >= THRESHOLD else 0
    after = echo_server.stats()["shmgrpc"]
    assert delta(after, before, "by_transport", transport, "offloaded", "count") == down
    assert delta(after, before, "by_transport", transport, "offloaded", "bytes") == size * down
    assert delta(after, before, "inline", "count") == 1 - down
    assert client.stats()["by_transport"][transport]["restored"] == {"count": down, "bytes": size * down}
    assert client.stats()["by_transport"][transport]["offloaded"]["count"] == 0


def rich_payload(seq: int) -> pb.Payload:
    """Nested, repeated and map fields, all of them large enough to matter."""
    message = pb.Payload(seq=seq, body=pattern(1 * MiB, seq), note="nested ✓ — ünïcode")
    message.inner.data = pattern(200 * 1024, seq + 100)
    message.inner.numbers.extend([-1, 0, 2**62, -(2**63)])
    for i in range(3):
        message.items.add(data=pattern(50_000 + i, seq + 200 + i), numbers=range(i * 1000))
    message.by_name["alpha"].data = pattern(70_000, seq + 300)
    message.by_name["ünï"].numbers.extend([7, 8, 9])
    message.by_name[""].data = b"\x00" * 10
    return message


def test_nested_repeated_and_map_fields_round_trip(client, echo_server, transport):
    before = echo_server.stats()["shmgrpc"]
    logic = server_logic(echo_server.pid)
    request = rich_payload(1)
    response = client.stub.Unary(request, timeout=CALL_TIMEOUT)
    assert response == logic.reply(request)
    response.ClearField("server_pid")
    response.ClearField("body_len_seen")
    assert response == request
    assert response.SerializeToString(deterministic=True) == request.SerializeToString(deterministic=True)

    requests = [rich_payload(i) for i in range(3)]
    responses = list(client.stub.BidiStream(iter(requests), timeout=CALL_TIMEOUT))
    assert responses == [logic.reply(r) for r in requests]
    summary = client.stub.ClientStream(iter(requests), timeout=CALL_TIMEOUT)
    assert [item.data for item in summary.items] == [fingerprint(r) for r in requests]

    mine = client.stats()
    assert counts(mine, transport) == (1 + 3 + 3, 1 + 3)
    after = echo_server.stats()["shmgrpc"]
    assert delta(after, before, "by_transport", transport, "restored", "count") == 7


def test_generic_method_with_raw_bytes(client, echo_server, transport):
    """A caller that uses no protobuf (de)serializers on the intercepted
    channel, as generic proxies do, gets the response's own bytes: never a
    handle in their place."""
    generic = client.channel.unary_unary(
        "/shmgrpc.testing.v1.Echo/Unary", request_serializer=None, response_deserializer=None
    )
    client.stub.Unary(pb.Payload(seq=1), timeout=CALL_TIMEOUT)  # handshake
    request = payload_of_size(1 * MiB, seq=4)
    raw = generic(request.SerializeToString(), timeout=CALL_TIMEOUT)
    assert isinstance(raw, bytes)
    assert not wire.is_frame(raw), f"the caller was handed a {len(raw)}-byte shmgrpc frame"
    assert pb.Payload.FromString(raw) == server_logic(echo_server.pid).reply(request)


def test_the_servers_content_check_works(client, echo_server, transport):
    """The other tests rely on the server noticing wrong bytes: it does."""
    before = echo_server.stats()["echo"]
    body = pattern(1 * MiB, 1)
    bad = pb.Payload(seq=1, body=body, digest=digest(body[:-1] + b"?"))
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Unary(bad, timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "echo_server: corrupt body in message seq 1" in info.value.details()
    after = echo_server.stats()["echo"]
    assert after["corrupt"] == before["corrupt"] + 1
    assert after["checked"] == before["checked"] + 1
    good = pb.Payload(seq=2, body=body, digest=digest(body))
    assert client.stub.Unary(good, timeout=CALL_TIMEOUT).body == body
    assert echo_server.stats()["echo"]["corrupt"] == after["corrupt"]


def test_the_application_sees_its_own_metadata_only(tmp_path):
    """shmgrpc's hello travels in the call's metadata, but the server
    application's context.invocation_metadata() does not show it."""
    seen = []

    def echo(request, context):
        seen.append(tuple(context.invocation_metadata()))
        return request

    config = client_config("shm")
    methods = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    handler = grpc.method_handlers_generic_handler("test.Meta", methods)
    server = shmgrpc.server(
        futures.ThreadPoolExecutor(2), handlers=[handler], options=GRPC_OPTIONS, config=config
    )
    target = f"unix:{tmp_path}/meta.sock"
    assert server.add_insecure_port(target)
    server.start()
    channel = shmgrpc.insecure_channel(target, GRPC_OPTIONS, config=config)
    try:
        body = pattern(2 * THRESHOLD, 3)
        echo_call = channel.unary_unary("/test.Meta/Echo")
        for _ in range(2):  # the first carries the hello and learns the route; the second is framed
            assert echo_call(body, metadata=[("app-key", "v")], timeout=CALL_TIMEOUT) == body
        assert channel.status().transport == "shm"
        assert counts(channel.stats(), "shm") == (1, 1)  # the second call: both ways offloaded
        assert len(seen) == 2
        for metadata in seen:
            keys = [key for key, _ in metadata]
            assert "app-key" in keys
            assert wire.HELLO_KEY not in keys, metadata
    finally:
        channel.close()
        server.stop(None)
        server.shmgrpc.close()
