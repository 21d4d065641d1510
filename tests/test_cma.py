"""The cma transport in particular: no payload in /dev/shm, what happens when
the kernel forbids process_vm_readv for real (seccomp), and a sender that dies
before the receiver pulls its bytes. Forged cma handles are in
test_bad_input.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from protos import echo_test_pb2 as pb
from shmgrpc.transports import _vm as cma
from shmgrpc._core import AUTO_ORDER
from tests.conftest import (
    Outbox,
    CALL_TIMEOUT,
    MiB,
    SESSION_PIDS,
    SHM_DIR,
    THRESHOLD,
    client_config,
    counts,
    data_segments,
    delta,
    read_line,
    run_client,
    shm_names,
    spawn,
    stop_process,
    suite_env,
)
from tests.echo_server import pattern

pytestmark = pytest.mark.skipif(not cma.available(), reason="process_vm_readv needs Linux")

CALLS = 3
SIZE = 2 * MiB


def test_cma_puts_no_payload_in_dev_shm(servers, make_client):
    server = servers.shared(suite_env("cma"))
    client = make_client(server.unix_target, client_config("cma"))
    before = server.stats()["shmgrpc"]

    def no_data_segments():
        assert data_segments(server.pid) == [] and data_segments(os.getpid()) == []

    request = pb.Payload(seq=1, body=pattern(8 * MiB, 1))
    assert client.stub.Unary(request, timeout=CALL_TIMEOUT).body == request.body
    no_data_segments()
    requests = [pb.Payload(seq=i, body=pattern(SIZE, i)) for i in range(4)]
    call = client.stub.BidiStream(iter(requests), timeout=CALL_TIMEOUT)
    for i, response in enumerate(call):
        assert response.body == requests[i].body
        no_data_segments()  # in the middle of the stream too

    # Both sides did offload, with cma alone, and hold only their id segments.
    assert counts(client.stats(), "cma") == (5, 5)
    assert counts(client.stats(), "shm") == (0, 0)
    after = server.stats()["shmgrpc"]
    assert delta(after, before, "by_transport", "cma", "restored", "count") == 5
    assert delta(after, before, "by_transport", "shm", "offloaded", "count") == 0
    for pool in (client.stats()["pool"], after["pool"]):
        assert pool["segments"] == 0 and pool["bytes_mapped"] == 0 and pool["capacity"] == 0
    for pid in (server.pid, os.getpid()):
        names = shm_names(pid)
        assert names and all(name.endswith("-id") for name in names), names
    assert all(os.stat(os.path.join(SHM_DIR, name)).st_size == 4096 for name in shm_names(server.pid))


@pytest.mark.parametrize(
    "client_transport, server_transport",
    [("cma", "cma"), ("auto", "auto")],
    ids=["explicit-cma", "auto"],
)
def test_client_denied_process_vm_readv(servers, client_transport, server_transport):
    """A client process under a seccomp filter that makes process_vm_readv
    fail with EPERM, as a locked-down host would. It cannot pull responses:
    with explicit cma they come inline; with auto the next rung carries them
    (memfd or shm: auto's ladder without cma), both ways. The
    server can still pull the client's requests. Calls succeed either way, and
    the reason is in the stats note and in exactly one log line: a WARNING
    when cma was asked for explicitly, an INFO line under auto (another rung
    serves)."""
    server = servers.shared(suite_env(server_transport))
    before = server.stats()["shmgrpc"]
    out = run_client(
        {
            "target": server.unix_target,
            "env": suite_env(client_transport),
            "calls": CALLS,
            "size": SIZE,
            "reply_size": SIZE,
            "deny": True,
        }
    )
    assert out["ok"] == CALLS and out["bad"] == []
    stats = out["stats"]
    note = stats["notes"]["cma"]
    assert "not permitted" in note and "EPERM" in note, note
    warnings = [r for r in out["log"] if r["level"] == "WARNING"]
    # The channel's one INFO line when it settles carries its status, which
    # says why responses come inline; apart from it, one line says it.
    about_cma = [r for r in out["log"] if "cma" in r["message"] and "not permitted" in r["message"]
                 and not r["message"].startswith("channel ")]
    assert len(about_cma) == 1, out["log"]
    if client_transport == "cma":
        assert warnings == about_cma, out["log"]
    else:
        assert warnings == [], out["log"]
        assert about_cma[0]["level"] == "INFO", out["log"]
    # auto: the first rung of the ladder that is not cma carries both ways
    rung = "cma" if client_transport == "cma" else next(t for t in AUTO_ORDER if t != "cma")
    settled = [r for r in out["log"] if r["message"].startswith("channel ")]
    assert [r["level"] for r in settled] == ["INFO"], out["log"]  # the channel settles once
    assert f"via {rung}" in settled[0]["message"], out["log"]
    assert not stats["errors"]
    after = server.stats()["shmgrpc"]

    if client_transport == "cma":
        assert counts(stats, "cma") == (CALLS, 0)  # requests pulled by the server
        assert counts(stats, "shm") == (0, 0)
        assert stats["inline"]["count"] == 0
        assert delta(after, before, "by_transport", "cma", "restored", "count") == CALLS
        assert delta(after, before, "offloaded", "count") == 0
        assert delta(after, before, "inline", "count") == CALLS  # responses inline,
        assert delta(after, before, "fallbacks", "peer_cannot_read") == CALLS  # and why
    else:
        assert counts(stats, rung) == (CALLS, CALLS)
        assert counts(stats, "cma") == (0, 0)
        assert delta(after, before, "by_transport", rung, "offloaded", "count") == CALLS


# The client that dies: it starts a client stream whose first message tells
# the server to sleep, sends a cma-offloaded second message, forks a child that
# keeps the connection open (the server must see the handle, not a broken
# connection), prints its pid and the child's, and waits to be killed.
DYING_CLIENT = """
import json, os, sys, time
import grpc, shmgrpc
from protos import echo_test_pb2 as pb, echo_test_pb2_grpc as pb_grpc
from tests.echo_server import GRPC_OPTIONS, digest, pattern
target, threshold = sys.argv[1], sys.argv[2]
options = GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
channel = shmgrpc.intercept_channel(
    grpc.insecure_channel(target, options=options),
    shmgrpc.Config.from_env({"SHMGRPC_TRANSPORT": "cma", "SHMGRPC_THRESHOLD": threshold, "SHMGRPC_CMA_THRESHOLD": threshold}),
    options=options,
)
stub = pb_grpc.EchoStub(channel)
stub.Unary(pb.Payload(seq=0, body=b"r" * int(threshold)), timeout=30)  # carries the hello: learns the route

def requests():
    yield pb.Payload(seq=0, body=b"wait", delay=2.0)
    body = pattern(2 * 1024 * 1024, 1)
    yield pb.Payload(seq=1, body=body, digest=digest(body))
    time.sleep(0.5)  # the handle is on the wire by now
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    print(json.dumps({"pid": os.getpid(), "child": child,
                      "offloaded": channel.stats()["by_transport"]["cma"]["offloaded"]["count"]}), flush=True)
    time.sleep(60)

call = stub.ClientStream.future(requests(), timeout=60)
time.sleep(60)
"""


def test_sender_killed_before_its_message_is_read(fresh_server, make_client):
    server = fresh_server(suite_env("cma"))
    before = server.stats()
    proc = spawn(
        [sys.executable, "-c", DYING_CLIENT, server.unix_target, str(THRESHOLD)],
        {"GRPC_ENABLE_FORK_SUPPORT": "0"},
        stdout=subprocess.PIPE,
    )
    child = None
    try:
        line = read_line(proc, 30)
        assert line, "the client did not get going"
        info = json.loads(line)
        child = info["child"]
        SESSION_PIDS.add(child)
        assert info["offloaded"] == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

        # The server wakes up, pulls the handle and finds its sender gone.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            stats = server.stats()
            failures = stats["echo"]["failures"][len(before["echo"]["failures"]) :]
            if failures:
                break
            time.sleep(0.2)
        assert failures, "the server never finished the call"
        assert failures[0]["method"] == "ClientStream"
        assert failures[0]["code"] == "DATA_LOSS", failures[0]
        assert f"pid {info['pid']}" in failures[0]["details"] and "ESRCH" in failures[0]["details"]
        assert delta(stats["shmgrpc"], before["shmgrpc"], "errors", "CmaPeerGone") == 1
        assert stats["echo"]["corrupt"] == 0
    finally:
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop_process(proc, signal.SIGKILL)

    # It keeps serving.
    client = make_client(server.unix_target, client_config("cma"))
    request = pb.Payload(seq=3, body=pattern(SIZE, 3))
    assert client.stub.Unary(request, timeout=CALL_TIMEOUT).body == request.body
    assert counts(client.stats(), "cma") == (1, 1)

    # The killed client's id segment goes with the next engine that sets up
    # (the client above did): reaping, not luck.
    assert shm_names(info["pid"]) == []


def test_cma_carries_nothing_below_its_threshold(servers, make_client):
    """SHMGRPC_CMA_THRESHOLD (512 KiB by default): a cma read costs four
    calls into the peer, so a smaller message goes inline (counted as the
    fallback below_cma_threshold on the side that sent it) and a larger one
    via cma, both ways."""
    server = servers.shared(suite_env("cma", CMA_THRESHOLD="512KiB"))
    client = make_client(server.unix_target, client_config("cma", CMA_THRESHOLD="512KiB"))
    assert client.stub.Unary(pb.Payload(seq=0, body=b"x"), timeout=CALL_TIMEOUT).body == b"x"  # the handshake
    before_server, before_client = server.stats()["shmgrpc"], client.stats()
    for size in (256 * 1024, 511 * 1024):
        reply = client.stub.Unary(pb.Payload(seq=1, body=pattern(size, 1), reply_size=size), timeout=CALL_TIMEOUT)
        assert reply.body == pattern(size, 1)
    reply = client.stub.Unary(pb.Payload(seq=2, body=pattern(MiB, 2), reply_size=MiB), timeout=CALL_TIMEOUT)
    assert reply.body == pattern(MiB, 2)
    after_server, after_client = server.stats()["shmgrpc"], client.stats()
    assert counts(after_client, "cma") == (1, 1)
    assert delta(after_client, before_client, "fallbacks", "below_cma_threshold") == 2
    assert delta(after_server, before_server, "by_transport", "cma", "offloaded", "count") == 1
    assert delta(after_server, before_server, "fallbacks", "below_cma_threshold") == 2


def test_requests_of_a_committed_stream_are_unpinned_once_read(servers, make_client):
    """A request stays pinned until its call ends while gRPC may resend it;
    once a response has arrived the call is committed (no resend any more),
    so later requests are let go as soon as the server has read them: a
    ping-pong stream of 8 x 1 MiB keeps about one message pinned, not eight."""
    server = servers.shared(suite_env("cma"))
    client = make_client(server.unix_target, client_config("cma"))
    assert client.stub.Unary(pb.Payload(seq=0, body=b"x"), timeout=CALL_TIMEOUT).body == b"x"  # the handshake
    outbox = Outbox()
    call = client.stub.BidiStream(iter(outbox), timeout=CALL_TIMEOUT)
    pinned = []
    for i in range(8):
        outbox.put(pb.Payload(seq=i, body=pattern(MiB, i)))
        assert next(call).body == pattern(MiB, i)
        pinned.append(client.stats()["pool"]["cma_pinned"])
    outbox.close()
    assert list(call) == []
    assert counts(client.stats(), "cma")[0] >= 8
    # The first request was sent before any response: it stays pinned until
    # the call ends; each later one is let go once read.
    assert max(pinned) <= 2 * MiB, pinned
    assert client.stats()["pool"]["cma_pinned"] == 0
