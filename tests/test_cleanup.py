"""Nothing stays in /dev/shm: owners unlink what they made when they close,
exit or are collected, and whatever a SIGKILLed process left is removed by
the next shmgrpc process that sets up."""

from __future__ import annotations

import gc
import os
import signal

from protos import echo_test_pb2 as pb
from shmgrpc import shmdir
from tests.conftest import (
    CALL_TIMEOUT,
    SHM_DIR,
    MiB,
    client_config,
    counts,
    data_segments,
    learn_route,
    run_client,
    run_python,
    shm_names,
    suite_env,
)
from tests.echo_server import pattern


def exercise(make_client, server, transport: str) -> None:
    """Offload both ways, so the server owns what the transport makes."""
    client = make_client(server.unix_target, client_config(transport))
    request = pb.Payload(seq=1, body=pattern(4 * MiB, 1))
    assert client.stub.Unary(request, timeout=CALL_TIMEOUT).body == request.body
    assert counts(client.stats(), transport) == (1, 1)
    client.close()


def test_server_that_exits_normally_leaves_nothing(fresh_server, make_client, transport):
    server = fresh_server(suite_env(transport))
    exercise(make_client, server, transport)
    names = shm_names(server.pid)
    assert any(n.endswith("-id") for n in names)
    if transport == "shm":
        assert data_segments(server.pid)  # its pool, holding the response
    assert server.stop(signal.SIGTERM) == 0
    assert shm_names(server.pid) == []


def test_sigkilled_server_is_reaped_by_the_next_process(fresh_server, make_client, servers, transport):
    server = fresh_server(suite_env(transport))
    bystander = servers.shared(suite_env(transport))  # alive: must keep its names
    exercise(make_client, server, transport)
    exercise(make_client, bystander, transport)
    left = shm_names(server.pid)
    assert left
    assert server.kill() == -signal.SIGKILL
    assert shm_names(server.pid) == left  # nobody cleaned up after it yet

    # The next process that sets up an engine removes them.
    out = run_client(
        {
            "target": bystander.unix_target,
            "env": suite_env(transport),
            "calls": 1,
            "size": 1 * MiB,
        }
    )
    assert out["ok"] == 1
    assert shm_names(server.pid) == []
    assert any(n.endswith("-id") for n in shm_names(bystander.pid))
    assert shm_names(out["pid"]) == []  # and that client cleaned up at exit


def test_client_process_exiting_without_close_leaves_nothing(echo_server, transport):
    """No close(): the exit handler unlinks the process's pool and id segment."""
    out = run_python(
        """
import json, os, sys
import grpc, shmgrpc
from protos import echo_test_pb2 as pb, echo_test_pb2_grpc as pb_grpc
from tests.echo_server import GRPC_OPTIONS, pattern
channel = shmgrpc.intercept_channel(
    grpc.insecure_channel(sys.argv[1], options=GRPC_OPTIONS),
    shmgrpc.Config.from_env({"SHMGRPC_TRANSPORT": sys.argv[2], "SHMGRPC_THRESHOLD": "64KiB", "SHMGRPC_CMA_THRESHOLD": "64KiB"}),
    options=GRPC_OPTIONS,
)
stub = pb_grpc.EchoStub(channel)
body = pattern(3 * 1024 * 1024, 5)
# The channel's first large call goes inline and settles its route; the
# second is offloaded (so the pool has something in it).
assert stub.Unary(pb.Payload(seq=4, body=body), timeout=30).body == body
assert stub.Unary(pb.Payload(seq=5, body=body), timeout=30).body == body
mine = sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"shmgrpc-{os.getpid()}-"))
print(json.dumps({"pid": os.getpid(), "names": mine}))
""",
        echo_server.unix_target,
        transport,
    )
    assert any(n.endswith("-id") for n in out["names"])
    if transport == "shm":
        assert any(not n.endswith("-id") for n in out["names"])
    assert shm_names(out["pid"]) == []


def test_close_unlinks_at_once_and_twice_is_fine(make_client, echo_server, transport):
    mine_before = set(shm_names(os.getpid()))
    client = make_client(echo_server.unix_target, client_config(transport))
    request = pb.Payload(seq=1, body=pattern(2 * MiB, 1))
    assert client.stub.Unary(request, timeout=CALL_TIMEOUT).body == request.body
    made = set(shm_names(os.getpid())) - mine_before
    assert made and (transport == "cma" or any(not n.endswith("-id") for n in made))
    assert counts(client.stats(), transport) == (1, 1)

    client.wrapper.close()
    client.wrapper.close()
    assert set(shm_names(os.getpid())) - mine_before == set()
    # Closed: nothing offloads any more (for a call on it, see the next test).
    assert client.wrapper.status().transport == "inline"
    assert client.wrapper.transports == ()


# A wrapped channel is used, closed, and used again: the call must fail as
# it does on a closed grpc channel (ValueError), not take the process down.
CALL_AFTER_CLOSE = """
import json, sys
import grpc, shmgrpc
from protos import echo_test_pb2 as pb, echo_test_pb2_grpc as pb_grpc
from tests.echo_server import GRPC_OPTIONS, pattern
channel = shmgrpc.intercept_channel(
    grpc.insecure_channel(sys.argv[1], options=GRPC_OPTIONS),
    shmgrpc.Config.from_env({"SHMGRPC_TRANSPORT": sys.argv[2], "SHMGRPC_THRESHOLD": "64KiB", "SHMGRPC_CMA_THRESHOLD": "64KiB"}),
    options=GRPC_OPTIONS,
)
stub = pb_grpc.EchoStub(channel)
body = pattern(2 * 1024 * 1024, 1)
assert stub.Unary(pb.Payload(seq=1, body=body), timeout=30).body == body
channel.close()
try:
    stub.Unary(pb.Payload(seq=2, body=body), timeout=30)
    error = None
except ValueError as err:
    error = str(err)
print(json.dumps({"error": error}))
"""


def test_a_call_after_close_fails_like_grpc(echo_server, transport):
    try:
        out = run_python(CALL_AFTER_CLOSE, echo_server.unix_target, transport)
    finally:
        shmdir.reap(SHM_DIR)  # what a child that crashed left behind
    assert out["error"] == "Cannot invoke RPC on closed channel!"


def test_collected_wrapper_unlinks(echo_server, transport):
    """A wrapper dropped without close() (its channel closed by hand) lets go
    of shared memory when it is collected."""
    import grpc

    import shmgrpc
    from protos import echo_test_pb2_grpc as pb_grpc
    from tests.echo_server import GRPC_OPTIONS

    mine_before = set(shm_names(os.getpid()))
    channel = grpc.insecure_channel(echo_server.unix_target, options=GRPC_OPTIONS)
    wrapper = shmgrpc.intercept_channel(channel, client_config(transport), options=GRPC_OPTIONS)
    stub = pb_grpc.EchoStub(wrapper)
    learn_route(stub)
    request = pb.Payload(seq=1, body=pattern(2 * MiB, 1))
    assert stub.Unary(request, timeout=CALL_TIMEOUT).body == request.body
    assert counts(wrapper.stats(), transport) == (1, 1)
    assert set(shm_names(os.getpid())) - mine_before
    channel.close()
    del stub, wrapper
    gc.collect()
    assert set(shm_names(os.getpid())) - mine_before == set()
