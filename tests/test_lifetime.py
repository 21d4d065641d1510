"""Slot and pin lifetimes: a reader that comes too late, calls that end early,
a long stream through a small pool. The invariant everywhere: a reader gets
the right bytes or DATA_LOSS, never other bytes, and nothing stays pinned
once its call is over and its lease has run out."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from protos import echo_test_pb2 as pb
from tests.conftest import CALL_TIMEOUT, MiB, client_config, counts, delta, suite_env
from tests.conftest import wait_until as conftest_wait_until
from tests.echo_server import digest, fingerprint, pattern

RECLAIM_WAIT = 10.0  # seconds to wait for leases to run out and pools to drain


def message(seq: int, size: int, **knobs) -> pb.Payload:
    body = pattern(size, seq)
    return pb.Payload(seq=seq, body=body, digest=digest(body), **knobs)


def wait_until(predicate, timeout: float = RECLAIM_WAIT, interval: float = 0.1):
    return conftest_wait_until(predicate, timeout, interval)


def pool_drained(pool: dict) -> bool:
    return pool["bytes_in_use"] == 0 and pool["cma_pinned"] == 0


# --- (a) a reader slower than the lease ---------------------------------------------


def test_slow_reader_gets_data_loss_never_wrong_bytes(make_client, echo_server, transport):
    """The client's lease (0.2 s) runs out long before the server pulls the
    second message (it sleeps 1.5 s after the first), and the client's small
    pool must reuse that message's slot (or pin budget) for later ones. The
    server then sees DATA_LOSS; whatever it did read was intact."""
    config = client_config(
        transport,
        lease="0.2s",
        pool_size="4MiB",  # three 1.25 MiB slots
        segment_size="1MiB",  # one slot per segment
        cma_max_pinned="3MiB",  # about two unacknowledged 1 MiB messages
        peer_share="1",  # the one peer may fill them
    )
    client = make_client(echo_server.unix_target, config)
    before = echo_server.stats()
    count = 12

    def paced():
        for i in range(count):
            yield message(i, 1 * MiB, delay=1.5 if i == 0 else 0.0)
            time.sleep(0.15)

    sent = [message(i, 1 * MiB, delay=1.5 if i == 0 else 0.0) for i in range(count)]
    try:
        summary = client.stub.ClientStream(paced(), timeout=CALL_TIMEOUT)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        summary, code, details = None, err.code(), err.details()

    after = echo_server.stats()
    assert after["echo"]["corrupt"] == before["echo"]["corrupt"], "the server was handed wrong bytes"
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.DATA_LOSS), (code, details)
    if summary is not None:
        assert [item.data for item in summary.items] == [fingerprint(m) for m in sent]
    # The timing above makes reuse certain: message 1's slot or pin is taken
    # back ~0.45 s in, the server reads it at ~1.5 s.
    assert code == grpc.StatusCode.DATA_LOSS, "the late read was expected to fail"
    assert "reused" in details and "lease" in details, details
    assert delta(after["shmgrpc"], before["shmgrpc"], "errors", "DataLossError") == 1
    # The server keeps serving, and the client recovers its pool.
    ok = client.stub.Unary(message(99, 2 * MiB), timeout=CALL_TIMEOUT)
    assert ok.body == pattern(2 * MiB, 99)
    assert wait_until(lambda: pool_drained(client.stats()["pool"]))


# --- (b) calls that end in the middle of an offloaded stream ----------------------------


@pytest.fixture
def short_lease_server(servers, transport):
    """A server whose unacknowledged slots and pins expire after 1 s."""
    return servers.shared(suite_env(transport, LEASE="1s"))


def learn_server_stream(client) -> None:
    """One ServerStream call answered with a large message (inline: the
    method had not answered this channel large before). From then on the
    method's calls carry the hello, so their large answers are offloaded.
    (make_client has already settled the channel's route.)"""
    got = list(client.stub.ServerStream(pb.Payload(seq=1, reply_size=1 * MiB), timeout=CALL_TIMEOUT))
    assert len(got) == 1 and got[0].body == pattern(1 * MiB, 0)


def assert_all_released(client, server):
    client_pool = wait_until(lambda: (lambda p: p if pool_drained(p) else None)(client.stats()["pool"]))
    assert client_pool, client.stats()["pool"]
    server_pool = wait_until(
        lambda: (lambda p: p if pool_drained(p) else None)(server.stats()["shmgrpc"]["pool"])
    )
    assert server_pool, server.stats()["shmgrpc"]["pool"]


def assert_still_serving(client, server, transport):
    """A new offloaded call works both ways. (The server's own offload count
    is not exact here: a cancelled handler may still be producing.)"""
    before, mine = server.stats()["shmgrpc"], counts(client.stats(), transport)
    request = message(7, 3 * MiB)
    assert client.stub.Unary(request, timeout=CALL_TIMEOUT).body == request.body
    after = server.stats()["shmgrpc"]
    assert delta(after, before, "by_transport", transport, "restored", "count") == 1
    assert counts(client.stats(), transport) == (mine[0] + 1, mine[1] + 1)


def test_cancel_in_the_middle_of_a_server_stream(make_client, short_lease_server, transport):
    server = short_lease_server
    client = make_client(server.unix_target, client_config(transport, lease="1s"))
    learn_server_stream(client)
    before, mine = server.stats()["shmgrpc"], counts(client.stats(), transport)
    call = client.stub.ServerStream(pb.Payload(seq=50, reply_size=2 * MiB, delay=0.02), timeout=CALL_TIMEOUT)
    for i in range(3):
        response = next(call)
        assert response.seq == i and response.body == pattern(2 * MiB, i)
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert counts(client.stats(), transport)[1] - mine[1] == 3
    assert delta(server.stats()["shmgrpc"], before, "offloaded", "count") >= 3
    assert_all_released(client, server)
    assert_still_serving(client, server, transport)


def test_deadline_in_the_middle_of_a_client_stream(make_client, short_lease_server, transport):
    """The server pulls one message, then sleeps past the deadline while the
    client has more offloaded messages on the way."""
    server = short_lease_server
    client = make_client(server.unix_target, client_config(transport, lease="1s"))
    requests = [message(i, 2 * MiB, delay=3.0 if i == 0 else 0.0) for i in range(5)]
    with pytest.raises(grpc.RpcError) as info:
        client.stub.ClientStream(iter(requests), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert counts(client.stats(), transport)[0] >= 2
    assert_all_released(client, server)
    assert_still_serving(client, server, transport)


def test_cancel_in_the_middle_of_a_bidi_stream(make_client, short_lease_server, transport):
    server = short_lease_server
    client = make_client(server.unix_target, client_config(transport, lease="1s"))

    def requests():
        for i in range(100):
            yield message(i, 1 * MiB, reply_size=1 * MiB, delay=0.01)

    call = client.stub.BidiStream(requests(), timeout=CALL_TIMEOUT)
    for i in range(4):
        response = next(call)
        assert response.seq == i and response.body == pattern(1 * MiB, i)
    call.cancel()
    off, restored = counts(client.stats(), transport)
    assert off >= 4 and restored == 4
    assert_all_released(client, server)
    assert_still_serving(client, server, transport)


# --- (c) a long stream through a small pool ------------------------------------------


def test_long_stream_through_a_small_pool(servers, make_client, transport):
    """200 messages of 8 MiB each way, 64 MiB of pool (or pin budget) on each
    side: everything arrives intact, most of it offloaded, and no pool ever
    holds more than its capacity."""
    # One peer may use the whole budget: this is about the caps (a peer's
    # share of them is tests/test_pressure.py's).
    budget = {"POOL_SIZE": "64MiB", "CMA_MAX_PINNED": "64MiB", "PEER_SHARE": "1"}
    server = servers.shared(suite_env(transport, **budget))
    client = make_client(server.unix_target, client_config(transport, **budget))
    before = server.stats()
    count, size = 200, 8 * MiB
    peak = {"bytes_mapped": 0, "bytes_in_use": 0, "cma_pinned": 0}

    def requests():
        for i in range(count):
            for key, value in client.stats()["pool"].items():
                if key in peak:
                    peak[key] = max(peak[key], value)
            yield message(i, size)

    got = 0
    for response in client.stub.BidiStream(requests(), timeout=120):
        assert response.seq == got and response.body == pattern(size, got), f"message {got}"
        got += 1
    assert got == count

    after = server.stats()
    assert after["echo"]["corrupt"] == before["echo"]["corrupt"]
    assert after["echo"]["checked"] - before["echo"]["checked"] == count
    off, restored = counts(client.stats(), transport)
    assert off >= 0.9 * count, f"only {off} of {count} requests offloaded: {client.stats()['fallbacks']}"
    assert restored >= 0.9 * count, f"only {restored} of {count} responses offloaded"
    limit = 64 * MiB
    assert peak["bytes_mapped"] <= limit and peak["cma_pinned"] <= limit, peak
    server_peak = after["echo"]["peak_pool"]
    assert server_peak["bytes_mapped"] <= limit and server_peak["cma_pinned"] <= limit, server_peak
    if transport == "shm":
        assert client.stats()["pool"]["capacity"] == limit
        assert server_peak["capacity"] == limit


# --- slots of ended calls ------------------------------------------------------------


def test_an_ended_call_does_not_free_its_slots_next_use(make_client, servers):
    """Call A's request slot is acknowledged, taken back and handed to call B
    while A is still running; when A ends, releasing "its" slot must not touch
    B's message, which the server has not read yet."""
    config = client_config("shm", segment_size="1MiB")  # one 1.25 MiB slot per segment
    echo_server = servers.shared(suite_env("shm"))
    client = make_client(echo_server.unix_target, config)
    before = echo_server.stats()["shmgrpc"]

    # A: the server reads (and acknowledges) the request at once, answers after 1 s.
    a = client.stub.Unary.future(message(1, 1 * MiB, delay=1.0), timeout=CALL_TIMEOUT)
    assert wait_until(lambda: delta(echo_server.stats()["shmgrpc"], before, "restored", "count") == 1, 5.0)
    # B: its second message takes A's slot again (the only one of its class,
    # acknowledged), and the server reads it only after A has ended.
    b_requests = [message(10, 100, delay=2.0), message(11, 1 * MiB)]
    b = client.stub.ClientStream.future(iter(b_requests), timeout=CALL_TIMEOUT)

    assert a.result().body == pattern(1 * MiB, 1)
    summary = b.result()
    assert [item.data for item in summary.items] == [fingerprint(m) for m in b_requests]
    assert client.stats()["pool"]["segments"] == 1  # B really reused A's slot


def test_slow_client_reader_of_a_server_stream(servers, make_client, transport):
    """The response direction of the slow-reader case: the server's lease
    (0.15 s) and pool run out while the client sleeps after the first
    message; a reused response slot or pin reaches the client as DATA_LOSS,
    and everything it was handed before that is intact."""
    server = servers.shared(
        suite_env(transport, LEASE="0.15s", POOL_SIZE="8MiB", SEGMENT_SIZE="1MiB", CMA_MAX_PINNED="5MiB")
    )
    client = make_client(server.unix_target, client_config(transport))
    learn_server_stream(client)
    call = client.stub.ServerStream(pb.Payload(seq=30, reply_size=2 * MiB, delay=0.1), timeout=CALL_TIMEOUT)
    got = [next(call)]
    time.sleep(2.0)
    with pytest.raises(grpc.RpcError) as info:
        for response in call:
            got.append(response)
    for i, response in enumerate(got):
        assert response.seq == i and response.body == pattern(2 * MiB, i), f"message {i} is wrong"
    assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value
    assert "reused" in info.value.details()
    assert client.stats()["errors"] == {"DataLossError": 1}
    # Still serving (this server's pool is tiny and partly held by the
    # cancelled stream's last message until its lease ends: no exact counts).
    request = message(8, 1 * MiB)
    assert client.stub.Unary(request, timeout=CALL_TIMEOUT).body == request.body


# --- a request resent by gRPC's retries --------------------------------------------


def retry_options(attempts: int) -> list:
    """Retry every Echo call that ends OUT_OF_RANGE (what the echo server
    answers to a corrupt body), `attempts` attempts in all."""
    policy = {
        "maxAttempts": attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "0.1s",
        "backoffMultiplier": 1,
        "retryableStatusCodes": ["OUT_OF_RANGE"],
    }
    config = {"methodConfig": [{"name": [{"service": "shmgrpc.testing.v1.Echo"}], "retryPolicy": policy}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


def corrupt_request(seq: int, size: int) -> pb.Payload:
    body = pattern(size, seq)
    return pb.Payload(seq=seq, body=body, digest=digest(body[:-1] + b"?"))


def test_a_retried_request_handle_is_read_again(make_client, echo_server, transport):
    """gRPC retries resend the request's bytes, the handle among them: every
    attempt reads the offloaded request again (the client holds it until the
    call ends), and the answer is the server's, not a shmgrpc error."""
    client = make_client(echo_server.unix_target, client_config(transport), options=retry_options(3))
    before = echo_server.stats()
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Unary(corrupt_request(1, 2 * MiB), timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE, info.value
    assert "echo_server: corrupt body" in info.value.details()
    after = echo_server.stats()
    assert after["echo"]["corrupt"] - before["echo"]["corrupt"] == 3  # each attempt read the request
    assert delta(after["shmgrpc"], before["shmgrpc"], "by_transport", transport, "restored", "count") == 3
    assert after["shmgrpc"]["errors"] == before["shmgrpc"]["errors"]
    assert counts(client.stats(), transport) == (1, 0)  # offloaded once, read three times
    assert wait_until(lambda: pool_drained(client.stats()["pool"]))


def test_a_retried_request_survives_stats_between_attempts(make_client, echo_server, transport):
    """The same, with a thread reading the channel's stats() meanwhile (a
    metrics exporter would): the request stays readable until its call ends."""
    client = make_client(echo_server.unix_target, client_config(transport), options=retry_options(5))
    before = echo_server.stats()
    stop = threading.Event()

    def monitor():
        while not stop.is_set():
            client.stats()
            time.sleep(0.001)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    try:
        with pytest.raises(grpc.RpcError) as info:
            client.stub.Unary(corrupt_request(2, 2 * MiB), timeout=CALL_TIMEOUT)
    finally:
        stop.set()
        watcher.join()
    after = echo_server.stats()
    outcome = (info.value.code(), info.value.details())
    assert outcome[0] == grpc.StatusCode.OUT_OF_RANGE, outcome
    assert outcome[1].startswith("echo_server: corrupt body"), outcome
    assert after["echo"]["corrupt"] - before["echo"]["corrupt"] == 5
    assert after["shmgrpc"]["errors"] == before["shmgrpc"]["errors"]
