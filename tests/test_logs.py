"""What shmgrpc logs: loggers per module under "shmgrpc", DEBUG for each
handshake step and fallback (rate-limited), one INFO per channel when it
settles, WARNING only when something configured cannot be honoured or a
channel stops offloading."""

from __future__ import annotations

import logging
from typing import Iterator, List

import pytest

from protos import echo_test_pb2 as pb
from shmgrpc._log import RateLimit
from tests.conftest import CALL_TIMEOUT, KiB, client_config, run_client, suite_env
from tests.echo_server import pattern

SIZE = 256 * KiB


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at_least(self, level: int) -> List[str]:
        return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records if r.levelno >= level]

    def messages(self, level: int) -> List[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def records() -> Iterator[Records]:
    """Everything logged under "shmgrpc" in this process, DEBUG up."""
    logger = logging.getLogger("shmgrpc")
    handler = Records()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def log_server():
    """A server of this module alone: its stderr holds only what these tests caused."""
    from tests.conftest import Servers

    factory = Servers()
    yield factory.fresh(suite_env("auto"), tcp=False)
    factory.stop_all()


def test_a_healthy_run_logs_nothing_above_info(make_client, log_server, records):
    client = make_client(log_server.unix_target, client_config("auto"))
    for i in range(5):
        reply = client.stub.Unary(pb.Payload(seq=i, body=pattern(SIZE, i), reply_size=SIZE), timeout=CALL_TIMEOUT)
        assert reply.body == pattern(SIZE, i)
    assert client.stats()["by_transport"]["memfd"]["offloaded"]["count"] == 5
    client.close()

    assert records.at_least(logging.WARNING) == []
    infos = records.messages(logging.INFO)
    settled = [m for m in infos if "large messages via memfd" in m]
    assert len(settled) == 1, infos  # once per channel, naming the transport it uses
    assert all(r.name.startswith("shmgrpc.") for r in records.records)  # module loggers under "shmgrpc"
    debug = "\n".join(records.messages(logging.DEBUG))
    for step in ("hello: we read memfd, shm; first contact", "welcome from server pid", "we send via memfd"):
        assert step in debug, debug
    assert "WARNING" not in log_server.log() and "ERROR" not in log_server.log(), log_server.log()


def test_auto_without_ptrace_permission_logs_no_warning(log_server):
    spec = {"target": log_server.unix_target, "calls": 2, "size": SIZE, "deny": True,
            "env": suite_env("auto")}
    out = run_client(spec)
    assert out["ok"] == 2
    assert "cma" in out["stats"]["notes"]  # it did find cma refused...
    levels = [r["level"] for r in out["log"]]
    assert "WARNING" not in levels and "ERROR" not in levels, out["log"]  # ...and said so quietly
    assert any(r["level"] == "INFO" and "cma not permitted" in r["message"] for r in out["log"]), out["log"]

    # Asked for explicitly, cma not being permitted is worth one WARNING.
    spec["env"]["SHMGRPC_TRANSPORT"] = "cma"
    out = run_client(spec)
    warnings = [r["message"] for r in out["log"] if r["level"] == "WARNING"]
    assert len(warnings) == 1 and "SHMGRPC_TRANSPORT=cma" in warnings[0], out["log"]


def test_a_channel_that_loses_offload_logs_one_warning(fresh_server, make_client, records, tmp_path):
    path = str(tmp_path / "echo.sock")
    first = fresh_server(suite_env("auto"), tcp=False, socket_path=path)
    client = make_client(f"unix:{path}", client_config("auto"))
    assert client.stub.Unary(pb.Payload(body=pattern(SIZE, 1)), timeout=CALL_TIMEOUT).server_pid == first.pid
    assert first.stop() == 0
    plain = fresh_server(flags=["--plain"], tcp=False, socket_path=path)  # replaced by a server without shmgrpc
    for i in range(4):
        request = pb.Payload(seq=i, body=pattern(SIZE, i))
        reply = client.stub.Unary(request, timeout=CALL_TIMEOUT, wait_for_ready=True)
        assert reply.server_pid == plain.pid and reply.body == request.body
    warnings = records.at_least(logging.WARNING)
    assert len(warnings) == 1, warnings
    assert "no longer offloads (was memfd)" in warnings[0] and "shmgrpc._handshake" in warnings[0]


def test_fallback_lines_are_rate_limited(make_client, log_server, records):
    """A pool too small for the messages: every one falls back, one DEBUG line says so."""
    client = make_client(log_server.unix_target, client_config("shm", pool_size="64KiB", segment_size="64KiB"))
    for i in range(5):
        assert client.stub.Unary(pb.Payload(body=pattern(SIZE, i)), timeout=CALL_TIMEOUT).body == pattern(SIZE, i)
    assert client.stats()["fallbacks"] == {"pool_too_small": 5}
    lines = [m for m in records.messages(logging.DEBUG) if "went inline" in m]
    assert len(lines) == 1 and "fallback pool_too_small" in lines[0] and "shm: pool_too_small" in lines[0], lines


def test_rate_limit_counts_what_it_suppressed():
    now = [0.0]
    limit = RateLimit(interval=10.0, max_keys=2, clock=lambda: now[0])
    assert limit.allow("a") == 0
    assert limit.allow("a") is None and limit.allow("a") is None
    assert limit.allow("b") == 0
    now[0] = 10.0
    assert limit.allow("a") == 2  # two were suppressed since
    assert limit.allow("c") == 0  # a third key forgets the oldest
    assert len(limit._keys) == 2
