"""Everything that is not a proven co-located shmgrpc pair gets plain gRPC,
and the call still succeeds with the right bytes."""

from __future__ import annotations

import os
import types
import warnings

import grpc
import pytest

import shmgrpc
from protos import echo_test_pb2_grpc as pb_grpc
from tests.conftest import (
    CALL_TIMEOUT,
    MiB,
    THRESHOLD,
    client_config,
    delta,
    payload_of_size,
    run_client,
    run_python,
    suite_env,
)
from tests.echo_server import GRPC_OPTIONS, pattern

NOBODY = 65534  # the conventional uid of "nobody"
SIZE = 2 * MiB


def echo_all_shapes(client, size: int = SIZE):
    """One call of each shape with large messages; all must come back right."""
    stub = client.stub
    request = payload_of_size(size, seq=3)
    assert stub.Unary(request, timeout=CALL_TIMEOUT).body == request.body
    assert [r.body for r in stub.ServerStream(request, timeout=CALL_TIMEOUT)] == [request.body] * 3
    requests = [payload_of_size(size, seq=i) for i in range(3)]
    assert stub.ClientStream(iter(requests), timeout=CALL_TIMEOUT).body_len_seen == sum(
        len(r.body) for r in requests
    )
    assert [r.body for r in stub.BidiStream(iter(requests), timeout=CALL_TIMEOUT)] == [
        r.body for r in requests
    ]


def assert_nothing_offloaded(stats: dict) -> None:
    assert stats["offloaded"] == {"count": 0, "bytes": 0}
    assert stats["restored"] == {"count": 0, "bytes": 0}
    assert stats["pool"]["segments"] == 0 and stats["pool"]["cma_pinned"] == 0


def assert_server_untouched(after: dict, before: dict) -> None:
    for key in ("offloaded", "restored"):
        assert delta(after, before, key, "count") == 0


def test_shmgrpc_client_plain_server(servers, make_client, transport):
    server = servers.shared(flags=["--plain"])
    assert not server.offload
    client = make_client(server.unix_target, client_config(transport))
    echo_all_shapes(client)
    stats = client.stats()
    assert_nothing_offloaded(stats)
    assert "answered our hello without a welcome" in stats["notes"]["server"]
    assert client.wrapper.status().settled and client.wrapper.status().transport == "inline"


def test_plain_client_shmgrpc_server(make_client, echo_server):
    before = echo_server.stats()["shmgrpc"]
    client = make_client(echo_server.unix_target, None)
    echo_all_shapes(client)
    after = echo_server.stats()["shmgrpc"]
    assert_server_untouched(after, before)
    assert delta(after, before, "inline", "count") == 0  # no hello: the server steps aside entirely


def test_transport_off_on_the_client(make_client, echo_server):
    before = echo_server.stats()["shmgrpc"]
    client = make_client(echo_server.unix_target, client_config("off"))
    assert client.interceptor.transport == "off"
    echo_all_shapes(client)
    stats = client.stats()
    assert_nothing_offloaded(stats)
    assert stats["notes"]["disabled"] == "SHMGRPC_TRANSPORT=off"
    assert_server_untouched(echo_server.stats()["shmgrpc"], before)


def test_transport_off_on_the_server(servers, make_client, transport):
    server = servers.shared({"SHMGRPC_TRANSPORT": "off"})
    before = server.stats()["shmgrpc"]
    client = make_client(server.unix_target, client_config(transport))
    echo_all_shapes(client)
    stats = client.stats()
    assert_nothing_offloaded(stats)
    assert "answered our hello without a welcome" in stats["notes"]["server"]
    assert client.wrapper.status().settled and client.wrapper.status().transport == "inline"
    after = server.stats()["shmgrpc"]
    assert_server_untouched(after, before)
    assert after["notes"].get("disabled") == "SHMGRPC_TRANSPORT=off"
    assert after["pool"]["segments"] == 0


def test_peer_in_another_shm_directory_is_not_colocated(make_client, echo_server, transport, tmp_path):
    """A client whose id segment the server cannot find (another tmpfs, as
    in another container) gets plain gRPC; the server counts why."""
    before = echo_server.stats()["shmgrpc"]
    client = make_client(echo_server.unix_target, client_config(transport, shm_dir=str(tmp_path)))
    echo_all_shapes(client)
    assert_nothing_offloaded(client.stats())
    assert "cannot prove it shares this host" in client.stats()["notes"]["server"]
    after = echo_server.stats()["shmgrpc"]
    assert_server_untouched(after, before)
    assert delta(after, before, "fallbacks", "peer_not_colocated") >= 1
    if "not_colocated" not in before["notes"]:  # the note keeps the first reason only
        assert "does not exist" in after["notes"]["not_colocated"]


@pytest.mark.skipif(os.geteuid() != 0, reason="a client of another uid needs root to drop to it")
def test_client_of_another_uid_gets_plain_grpc(fresh_server, transport):
    echo_server = fresh_server(suite_env(transport))
    before = echo_server.stats()["shmgrpc"]
    # TCP: the server's unix socket lives in a directory only its owner may enter.
    out = run_client(
        {
            "target": echo_server.tcp_target,
            "env": suite_env(transport),
            "calls": 2,
            "size": SIZE,
            "uid": NOBODY,
        }
    )
    assert out["uid"] == NOBODY
    assert out["ok"] == 2 and out["bad"] == []
    assert_nothing_offloaded(out["stats"])
    after = echo_server.stats()["shmgrpc"]
    assert_server_untouched(after, before)
    assert delta(after, before, "fallbacks", "peer_not_colocated") >= 1
    assert f"belongs to uid {NOBODY}" in after["notes"]["not_colocated"]


def test_server_restart_behind_the_same_address(fresh_server, make_client, transport, tmp_path):
    """The channel reconnects to a new server process on the same socket. The
    client's session names the old one: the first call must still succeed
    (a cma request keyed for the old server is refused and resent inline),
    and offload resumes with the new server."""
    path = str(tmp_path / "echo.sock")
    first = fresh_server(suite_env(transport), tcp=False, socket_path=path)
    client = make_client(f"unix:{path}", client_config(transport))
    request = payload_of_size(SIZE, seq=1)
    assert client.stub.Unary(request, timeout=CALL_TIMEOUT).server_pid == first.pid
    assert client.stats()["by_transport"][transport]["offloaded"]["count"] == 1
    assert first.stop() == 0

    second = fresh_server(suite_env(transport), tcp=False, socket_path=path)
    for i in range(3):
        request = payload_of_size(SIZE, seq=10 + i)
        response = client.stub.Unary(request, timeout=CALL_TIMEOUT, wait_for_ready=True)
        assert response.server_pid == second.pid and response.body == request.body
    stats = second.stats()["shmgrpc"]
    assert stats["by_transport"][transport]["restored"]["count"] >= 2  # offload resumed
    assert stats["by_transport"][transport]["offloaded"]["count"] >= 2
    requests = [payload_of_size(SIZE, seq=20 + i) for i in range(3)]
    responses = list(client.stub.BidiStream(iter(requests), timeout=CALL_TIMEOUT))
    assert [r.body for r in responses] == [r.body for r in requests]


@pytest.mark.parametrize("limit", ["max_message", "budget"])
def test_sender_limits_send_inline(make_client, echo_server, transport, limit):
    """A message the sender may not offload (longer than its
    SHMGRPC_MAX_MESSAGE, or larger than its whole pool or pin budget) goes
    inline, with the reason counted, and the call succeeds."""
    if limit == "max_message":
        config, reason = client_config(transport, max_message="1MiB"), "too_large"
    elif transport == "shm":
        config, reason = client_config(transport, pool_size="1MiB", segment_size="256KiB"), "pool_too_small"
    else:
        config, reason = client_config(transport, cma_max_pinned="1MiB"), "cma_pinned_full"
    before = echo_server.stats()["shmgrpc"]
    client = make_client(echo_server.unix_target, config)
    request = payload_of_size(SIZE, seq=1, reply_size=100)
    response = client.stub.Unary(request, timeout=CALL_TIMEOUT)
    assert response.body_len_seen == len(request.body) and response.body == pattern(100, 1)
    small = payload_of_size(THRESHOLD * 2, seq=2)  # within every limit: still offloaded
    assert client.stub.Unary(small, timeout=CALL_TIMEOUT).body == small.body
    stats = client.stats()
    assert stats["fallbacks"] == {reason: 1}
    assert stats["by_transport"][transport]["offloaded"]["count"] == 1
    assert stats["inline"] == {"count": 1, "bytes": SIZE}
    after = echo_server.stats()["shmgrpc"]
    assert delta(after, before, "restored", "count") == 1


# --- the deprecated client interceptor: plain gRPC, and it says so ----------------------


def test_deprecated_client_interceptor_passes_calls_through(echo_server, transport):
    """shmgrpc.ClientInterceptor no longer offloads: every shape works as
    plain gRPC (no hello reaches the server, nothing is offloaded), and
    building one warns."""
    before = echo_server.stats()["shmgrpc"]
    with pytest.warns(DeprecationWarning, match="no longer offloads"):
        icpt = shmgrpc.ClientInterceptor(client_config(transport))
    raw = grpc.insecure_channel(echo_server.unix_target, options=GRPC_OPTIONS)
    try:
        echo_all_shapes(types.SimpleNamespace(stub=pb_grpc.EchoStub(grpc.intercept_channel(raw, icpt))))
    finally:
        raw.close()
    stats = icpt.stats()
    assert stats["offloaded"]["count"] == 0 and stats["restored"]["count"] == 0
    assert "intercept_channel" in stats["notes"]["deprecated"]
    assert icpt.transports == ()
    icpt.close()
    after = echo_server.stats()["shmgrpc"]
    assert_server_untouched(after, before)
    assert delta(after, before, "inline", "count") == 0  # no hello: the server stepped aside


def test_deprecation_warning_points_at_the_caller():
    """The DeprecationWarning names the line that built the interceptor
    (Python shows DeprecationWarnings by default only when they are
    attributed to __main__, so a wrong stack level hides it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shmgrpc.ClientInterceptor(client_config("off"))
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 1, caught
    assert deprecations[0].filename == __file__, (deprecations[0].filename, deprecations[0].lineno)


def test_deprecated_client_interceptor_logs_one_warning_per_process():
    out = run_python(
        """
import json, logging, warnings
import shmgrpc
records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append([record.levelname, record.getMessage()])

logging.getLogger("shmgrpc").addHandler(Keep())
logging.getLogger("shmgrpc").setLevel(logging.DEBUG)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = shmgrpc.ClientInterceptor()
    second = shmgrpc.ClientInterceptor()
print(json.dumps({"log": records, "warnings": [w.category.__name__ for w in caught]}))
"""
    )
    assert out["warnings"] == ["DeprecationWarning", "DeprecationWarning"]
    warnings_logged = [message for level, message in out["log"] if level == "WARNING"]
    assert len(warnings_logged) == 1, out["log"]
    assert "intercept_channel" in warnings_logged[0]
