"""What test_wire_silence.py, test_interceptors.py and test_otel.py share:
the observing server process (tests/_obs_server.py) seen from the test, the
scenario of calls every client flavour runs, how a response and a span are
described, and the span tree compared between a plain and a shmgrpc run.

Imported by the server process and by client subprocesses, so importing
this module imports neither shmgrpc nor pytest.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

READY = "obs-server ready "
CONTROL_PREFIX = "/obs.Control/"
KiB = 1024
SMALL = 100
LARGE = 256 * KiB  # well above the suite's threshold (tests/conftest.py THRESHOLD, 64 KiB)
ECHO = "/shmgrpc.testing.v1.Echo/"

# The scenario's calls, in order: (label, method). See run_sync / run_aio.
SCENARIO = [
    ("unary_small", "Unary"),
    ("unary_large", "Unary"),
    ("unary_large_reply", "Unary"),
    ("unary_future_large", "Unary"),
    ("server_stream_large", "ServerStream"),
    ("client_stream_large", "ClientStream"),
    ("bidi_large", "BidiStream"),
    ("unary_error", "Unary"),
]


# --- describing -----------------------------------------------------------------------


def response_digest(message) -> str:
    """A response, minus the one field that differs between server processes."""
    copy = type(message)()
    copy.CopyFrom(message)
    copy.server_pid = 0
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()[:16]


def span_of(span) -> Dict[str, Any]:
    """A finished OpenTelemetry span, as JSON."""
    parent = span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "status": span.status.status_code.name,
        "grpc_code": span.attributes.get("rpc.grpc.status_code"),
        "trace": format(span.context.trace_id, "032x"),
        "id": format(span.context.span_id, "016x"),
        "parent": format(parent.span_id, "016x") if parent is not None else None,
    }


def span_tree(*span_lists: List[dict]) -> Dict[str, Any]:
    """The spans of one run (client's and server's), without ids: each span's
    name, kind, status, gRPC code and its parent's name and kind ("remote"
    when its parent is not among them, None for a root), sorted; and the
    spans of every trace, by name and kind."""
    spans = [s for spans in span_lists for s in spans]
    by_id = {s["id"]: s for s in spans}
    out, traces = [], {}
    for s in spans:
        if s["parent"] is None:
            parent = None
        elif s["parent"] in by_id:
            p = by_id[s["parent"]]
            parent = f"{p['name']}|{p['kind']}"
        else:
            parent = "remote"
        out.append({"name": s["name"], "kind": s["kind"], "status": s["status"], "grpc_code": s["grpc_code"],
                    "parent": parent})
        traces.setdefault(s["trace"], []).append(f"{s['name']}|{s['kind']}")
    key = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731
    return {"spans": sorted(out, key=key), "traces": sorted(sorted(t) for t in traces.values())}


# --- the scenario ----------------------------------------------------------------------


def _payloads():
    from protos import echo_test_pb2 as pb
    from tests.echo_server import digest, pattern

    def payload(seq: int, size: int, **fields):
        body = pattern(size, seq)
        return pb.Payload(seq=seq, body=body, digest=digest(body), **fields)

    return pb, payload


def _failed(err: BaseException) -> Dict[str, Any]:
    import grpc

    if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
        return {"code": err.code().name, "details": err.details()}
    return {"code": "EXCEPTION", "details": f"{type(err).__name__}: {err}"}


def run_sync(stub, timeout: float = 30.0) -> List[Dict[str, Any]]:
    """The scenario through a sync stub: one entry per call, {"label", "code",
    "responses": [digest, ...]} or {"label", "code", "details"} on error."""
    pb, payload = _payloads()

    def unary_small():
        return [stub.Unary(payload(1, SMALL), timeout=timeout)]

    def unary_large():
        return [stub.Unary(payload(2, LARGE), timeout=timeout)]

    def unary_large_reply():
        return [stub.Unary(payload(3, SMALL, reply_size=LARGE), timeout=timeout)]

    def unary_future_large():
        return [stub.Unary.future(payload(4, LARGE), timeout=timeout).result()]

    def server_stream_large():
        return list(stub.ServerStream(payload(3, SMALL, reply_size=LARGE), timeout=timeout))

    def client_stream_large():
        return [stub.ClientStream(iter([payload(10 + i, LARGE) for i in range(3)]), timeout=timeout)]

    def bidi_large():
        return list(stub.BidiStream(iter([payload(20 + i, LARGE) for i in range(3)]), timeout=timeout))

    def unary_error():
        return [stub.Unary(pb.Payload(seq=9, body=b"x" * SMALL, digest=b"not the digest"), timeout=timeout)]

    calls = locals()
    out = []
    for label, _ in SCENARIO:
        try:
            out.append({"label": label, "code": "OK", "responses": [response_digest(r) for r in calls[label]()]})
        except Exception as err:  # noqa: BLE001 - reported as a difference, not a crash
            out.append({"label": label, **_failed(err)})
    return out


async def run_aio(stub, timeout: float = 30.0) -> List[Dict[str, Any]]:
    """run_sync through a grpc.aio stub."""
    pb, payload = _payloads()

    async def unary_small():
        return [await stub.Unary(payload(1, SMALL), timeout=timeout)]

    async def unary_large():
        return [await stub.Unary(payload(2, LARGE), timeout=timeout)]

    async def unary_large_reply():
        return [await stub.Unary(payload(3, SMALL, reply_size=LARGE), timeout=timeout)]

    async def unary_future_large():  # aio has no future(): a call awaited later
        call = stub.Unary(payload(4, LARGE), timeout=timeout)
        return [await call]

    async def server_stream_large():
        return [r async for r in stub.ServerStream(payload(3, SMALL, reply_size=LARGE), timeout=timeout)]

    async def client_stream_large():
        return [await stub.ClientStream(iter([payload(10 + i, LARGE) for i in range(3)]), timeout=timeout)]

    async def bidi_large():
        return [r async for r in stub.BidiStream(iter([payload(20 + i, LARGE) for i in range(3)]), timeout=timeout)]

    async def unary_error():
        return [await stub.Unary(pb.Payload(seq=9, body=b"x" * SMALL, digest=b"not the digest"), timeout=timeout)]

    calls = locals()
    out = []
    for label, _ in SCENARIO:
        try:
            out.append({"label": label, "code": "OK", "responses": [response_digest(r) for r in await calls[label]()]})
        except Exception as err:  # noqa: BLE001
            out.append({"label": label, **_failed(err)})
    return out


def expected_methods() -> List[str]:
    return [ECHO + method for _, method in SCENARIO]


# --- the server process, seen from the test ------------------------------------------------


class ObsServer:
    """One tests/_obs_server.py process (see there for the spec). Started by
    the constructor; wait_ready() before use (so several start at once)."""

    def __init__(self, kind: str, shmgrpc: bool, outer: str, env: Optional[Dict[str, str]] = None):
        from tests.conftest import spawn

        self.kind, self.shmgrpc, self.outer = kind, shmgrpc, outer
        self._dir = tempfile.TemporaryDirectory(prefix="obs-")
        self.path = os.path.join(self._dir.name, "obs.sock")
        self._log = open(os.path.join(self._dir.name, "stderr.log"), "w+b")
        spec = {"kind": kind, "shmgrpc": shmgrpc, "outer": outer, "path": self.path, "parent": os.getpid()}
        self.proc = spawn([sys.executable, "-m", "tests._obs_server", json.dumps(spec)], env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log)
        self.pid: Optional[int] = None
        self._channel = None

    @property
    def target(self) -> str:
        return f"unix:{self.path}"

    def log(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-6000:]

    def wait_ready(self) -> "ObsServer":
        from tests.conftest import START_TIMEOUT, read_line, stop_process

        if self.pid is not None:
            return self
        line = read_line(self.proc, START_TIMEOUT)
        if not line.startswith(READY):
            stop_process(self.proc, signal.SIGKILL)
            raise RuntimeError(f"obs server {self.kind}/{self.outer} did not start: {line!r}\n{self.log()}")
        self.pid = json.loads(line[len(READY):])["pid"]
        return self

    def take(self) -> Dict[str, Any]:
        """What the observer saw since the last take: records, spans, stats."""
        import grpc

        self.wait_ready()
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target)
        if self.proc.poll() is not None:
            raise RuntimeError(f"obs server exited with {self.proc.returncode}\n{self.log()}")
        return json.loads(self._channel.unary_unary(CONTROL_PREFIX + "Take")(b"", timeout=15))

    def stop(self) -> None:
        from tests.conftest import stop_process

        if self._channel is not None:
            self._channel.close()
        stop_process(self.proc)
        self._log.close()
        self._dir.cleanup()


class ObsServers:
    """Servers by (kind, shmgrpc, outer), started on first use and kept."""

    def __init__(self, env: Dict[str, str]):
        self.env = env
        self._made: Dict[tuple, ObsServer] = {}

    def start(self, *keys: tuple) -> None:
        """Start these (kind, shmgrpc, outer) servers at once."""
        for key in keys:
            if key not in self._made:
                self._made[key] = ObsServer(*key, env=self.env if key[1] else None)

    def get(self, kind: str, shmgrpc: bool, outer: str) -> ObsServer:
        self.start((kind, shmgrpc, outer))
        return self._made[(kind, shmgrpc, outer)].wait_ready()

    def stop_all(self) -> None:
        for server in self._made.values():
            server.stop()
        self._made.clear()


def offloaded(stats: Optional[dict]) -> int:
    return (stats or {}).get("offloaded", {}).get("count", 0)


def restored(stats: Optional[dict]) -> int:
    return (stats or {}).get("restored", {}).get("count", 0)
