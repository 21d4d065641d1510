"""Fixtures shared by the suite: echo server processes, clients, a byte
counting TCP proxy, child processes, and the session-wide /dev/shm leak check.

Everything that crosses a process boundary is real: the server is
`python -m tests.echo_server` in its own process, children are started with
spawn() so the leak check knows their pids, and shared memory is the real
/dev/shm.

Servers are expensive (a second or so of a 2-core machine to start), so
tests that only need "a server with this configuration" share one through
the session-scoped `servers` factory; tests that kill, starve or otherwise
damage a server get their own from `fresh_server`.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `pytest` run without `python -m`: make tests.* and protos importable
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

import shmgrpc  # noqa: E402
from protos import echo_test_pb2 as pb  # noqa: E402
from protos import echo_test_pb2_grpc as pb_grpc  # noqa: E402
from shmgrpc import wire  # noqa: E402
from tests import _session  # noqa: E402
from tests.echo_server import GRPC_OPTIONS, READY  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
THRESHOLD = 64 * KiB  # the suite's threshold: small enough that sizes around it are cheap
TRANSPORTS = ("shm", "cma")
SHM_DIR = "/dev/shm"
START_TIMEOUT = 30.0  # seconds for a server to print its ready line; ~1 s when healthy
STOP_TIMEOUT = 10.0  # seconds a server gets after SIGTERM before SIGKILL
CALL_TIMEOUT = 60.0  # default deadline of the suite's RPCs: a hang fails, not blocks

# Pids of every process this session started (and its own): the leak check
# only judges /dev/shm names of these, so other users of the machine and
# concurrent test runs do not disturb it. Shared by both imports of this file
# (see tests/_session.py).
SESSION_PIDS = _session.PIDS


# --- processes ----------------------------------------------------------------


def child_env(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a child: ours without any SHMGRPC_* (a test names
    the configuration it means), plus `env`, with the project importable."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("SHMGRPC_")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out.update(env or {})
    return out


def spawn(args: Sequence[str], env: Optional[Dict[str, str]] = None, **popen) -> subprocess.Popen:
    """Popen in the project root with child_env(env); the pid is remembered."""
    proc = subprocess.Popen(list(args), cwd=ROOT, env=child_env(env), **popen)
    SESSION_PIDS.add(proc.pid)
    return proc


def run_json(argv: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: float = 60.0,
             what: str = "child") -> dict:
    """Run `argv` as a child; it must exit 0 and print one JSON object as its
    last stdout line, which is returned. Anything else fails the test."""
    proc = spawn(list(argv), env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{what} timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"{what} printed nothing\nstderr:\n{err}"
    return json.loads(lines[-1])


def run_python(code: str, *args: str, env: Optional[Dict[str, str]] = None, timeout: float = 60.0) -> dict:
    """Run `code` in a fresh interpreter (see run_json)."""
    return run_json([sys.executable, "-c", code, *args], env, timeout)


def wait_until(predicate, timeout: float, interval: float = 0.1):
    """Poll predicate() until it returns something true, for at most
    `timeout` seconds; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# A client process: `python -c CLIENT_SCRIPT SPEC`, SPEC a JSON object:
#   target     where to connect
#   env        SHMGRPC_* of its shmgrpc channel wrapper (null: a plain channel)
#   calls, size, seed   `calls` unary echoes of pattern(size, seed * 1000 + i)
#   reply_size when set, the server answers with bodies of this size
#   deny       install the seccomp filter that denies process_vm_readv first
#   uid        build everything as root, then drop to this uid before calling
#   learn      false: no route-learning call before the calls (default true)
# It prints {"pid", "uid", "ok", "bad", "stats", "log"}: calls whose answer was
# right, the indexes of those that were not, its wrapper's stats() and
# what logger "shmgrpc" said.
CLIENT_SCRIPT = """
import json, logging, os, sys
spec = json.loads(sys.argv[1])
if spec.get("deny"):
    from tests._seccomp import deny_process_vm
    deny_process_vm()
import grpc, grpc._channel, grpc._interceptor  # all imported before a uid drop
import shmgrpc
from protos import echo_test_pb2 as pb, echo_test_pb2_grpc as pb_grpc
from tests.echo_server import GRPC_OPTIONS, digest, pattern

records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append({"level": record.levelname, "message": record.getMessage()})

logging.getLogger("shmgrpc").addHandler(Keep())
logging.getLogger("shmgrpc").setLevel(logging.DEBUG)
options = GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
channel = grpc.insecure_channel(spec["target"], options=options)
wrapper = None
if spec.get("env") is not None:
    wrapper = channel = shmgrpc.intercept_channel(
        channel, shmgrpc.Config.from_env(spec["env"]), options=options)
stub = pb_grpc.EchoStub(channel)
if spec.get("uid") is not None:
    os.setgroups([])
    os.setgid(spec["uid"])
    os.setuid(spec["uid"])
if wrapper is not None and spec.get("learn", True):
    # The channel's first large call carries the hello and goes inline; its
    # trailers settle the route (conftest.learn_route).
    stub.Unary(pb.Payload(body=b"r" * max(64 * 1024, wrapper._engine.config.threshold)), timeout=60)
ok, bad = 0, []
reply_size = spec.get("reply_size", 0)
for i in range(spec["calls"]):
    seq = spec.get("seed", 0) * 1000 + i
    body = pattern(spec["size"], seq)
    response = stub.Unary(pb.Payload(seq=seq, body=body, digest=digest(body), reply_size=reply_size), timeout=60)
    expected = pattern(reply_size, seq) if reply_size else body
    if response.body == expected and response.body_len_seen == spec["size"] and response.seq == seq:
        ok += 1
    else:
        bad.append(i)
out = {"pid": os.getpid(), "uid": os.getuid(), "ok": ok, "bad": bad,
       "stats": wrapper.stats() if wrapper else None, "log": records}
channel.close()  # the wrapper's close() closes the channel it wraps too
print(json.dumps(out))
"""


def run_client(spec: dict, timeout: float = 60.0) -> dict:
    return run_python(CLIENT_SCRIPT, json.dumps(spec), timeout=timeout)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of proc's stdout (a pipe), or "" at EOF or timeout."""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return ""
        chunk = os.read(fd, 1)
        if not chunk:
            return ""
        buf += chunk
    return buf.decode()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
    """Signal proc, wait for it, SIGKILL it if it does not exit. Returns its
    exit status (negative: killed by that signal)."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None and not pipe.closed:
            pipe.close()
    return proc.returncode


def shm_names(pid: Optional[int] = None, directory: str = SHM_DIR) -> List[str]:
    """shmgrpc names in `directory` (/dev/shm), of one pid or of all."""
    out = []
    for name in os.listdir(directory):
        match = wire.NAME_RE.match(name)
        if match and (pid is None or int(match.group(1)) == pid):
            out.append(name)
    return sorted(out)


def data_segments(pid: int) -> List[str]:
    """Pool segments of `pid` (everything of it but its id segments)."""
    return [name for name in shm_names(pid) if not name.endswith("-id")]


# --- the echo server ----------------------------------------------------------


class EchoServer:
    """One `python -m tests.echo_server` process, listening on a unix socket
    and on a loopback TCP port."""

    def __init__(
        self,
        env: Optional[Dict[str, str]] = None,
        flags: Sequence[str] = (),
        tcp: bool = True,
        socket_path: Optional[str] = None,
    ):
        self.env = dict(env or {})
        self.flags = list(flags)
        self._dir = tempfile.TemporaryDirectory(prefix="echo-")
        self.socket_path = socket_path or os.path.join(self._dir.name, "echo.sock")
        self._log = open(os.path.join(self._dir.name, "stderr.log"), "w+b")
        listen = ["--listen", f"unix:{self.socket_path}"]
        if tcp:
            listen += ["--listen", "127.0.0.1:0"]
        self.proc = spawn(
            [sys.executable, "-m", "tests.echo_server", *listen, "--parent", str(os.getpid()), *self.flags],
            self.env,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._stats_channel: Optional[grpc.Channel] = None
        line = read_line(self.proc, START_TIMEOUT)
        if not line.startswith(READY):
            stop_process(self.proc, signal.SIGKILL)
            raise RuntimeError(f"echo server did not start: {line!r}\n{self.log()}")
        ready = json.loads(line[len(READY) :])
        self.pid: int = ready["pid"]
        self.offload: bool = ready["offload"]
        self.addresses: List[str] = ready["addresses"]

    @property
    def unix_target(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def tcp_target(self) -> str:
        return next(a for a in self.addresses if not a.startswith("unix:"))

    @property
    def tcp_port(self) -> int:
        return int(self.tcp_target.rsplit(":", 1)[1])

    def log(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stats(self) -> dict:
        """The server's EchoLogic.stats(), through a plain channel of our own
        (so asking never moves the counters it reports)."""
        if self._stats_channel is None:
            self._stats_channel = grpc.insecure_channel(self.unix_target, options=GRPC_OPTIONS)
        reply = pb_grpc.EchoStub(self._stats_channel).Stats(pb.Control(), timeout=CALL_TIMEOUT)
        return json.loads(reply.note)

    server_stats = stats

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self._stats_channel is not None:
            self._stats_channel.close()
            self._stats_channel = None
        code = stop_process(self.proc, sig)
        self._log.close()
        self._dir.cleanup()
        return code

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)


def suite_env(transport: str, **env: str) -> Dict[str, str]:
    """SHMGRPC_* of a process (server or client) using `transport` at the
    suite's threshold, plus `env` (keys with or without SHMGRPC_)."""
    out = {"SHMGRPC_TRANSPORT": transport, "SHMGRPC_THRESHOLD": str(THRESHOLD), "SHMGRPC_CMA_THRESHOLD": str(THRESHOLD)}
    out.update({k if k.startswith("SHMGRPC_") else f"SHMGRPC_{k.upper()}": str(v) for k, v in env.items()})
    return out


class Servers:
    """Starts servers on demand; shared ones are kept per configuration."""

    def __init__(self):
        self._shared: Dict[Tuple, EchoServer] = {}
        self._own: List[EchoServer] = []

    def shared(self, env: Optional[Dict[str, str]] = None, flags: Sequence[str] = ()) -> EchoServer:
        """A server with this configuration, started once and reused. A test
        must leave it serving (and must only rely on counter deltas)."""
        key = (tuple(sorted((env or {}).items())), tuple(flags))
        server = self._shared.get(key)
        if server is None or not server.alive():
            server = self._shared[key] = EchoServer(env, flags)
        return server

    def fresh(
        self,
        env: Optional[Dict[str, str]] = None,
        flags: Sequence[str] = (),
        tcp: bool = True,
        socket_path: Optional[str] = None,
    ) -> EchoServer:
        server = EchoServer(env, flags, tcp, socket_path)
        self._own.append(server)
        return server

    def stop_all(self) -> None:
        for server in [*self._own, *self._shared.values()]:
            if server.proc.returncode is None:
                server.stop()
        self._own.clear()
        self._shared.clear()


@pytest.fixture(scope="session")
def servers():
    factory = Servers()
    yield factory
    factory.stop_all()


@pytest.fixture
def fresh_server():
    """fresh_server(env, flags, tcp, socket_path) -> a server of this test
    alone, stopped after it."""
    factory = Servers()
    yield factory.fresh
    factory.stop_all()


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


@pytest.fixture
def echo_server(servers, transport) -> EchoServer:
    """The shared server of `transport`, threshold THRESHOLD."""
    return servers.shared(suite_env(transport))


# --- clients --------------------------------------------------------------------


def client_config(transport: str = "auto", **env: str) -> shmgrpc.Config:
    """A client Config as the SHMGRPC_* variables `env` would make it, at
    the suite's threshold unless `env` says otherwise."""
    return shmgrpc.Config.from_env(suite_env(transport, **env))


def route_probe(size: int = THRESHOLD) -> pb.Payload:
    """A request of at least `size` bytes, answered as large."""
    return pb.Payload(seq=0, body=b"r" * size)


def learn_route(stub, size: int = THRESHOLD) -> None:
    """What a shmgrpc channel's first large call does, done before a test's
    own calls so that they all meet a settled channel: it carries the hello,
    goes inline, and the server's welcome in its trailers gives the channel
    its route (or tells it the server has no shmgrpc). The Unary method then
    counts as answering large on this channel: its calls carry the hello.
    A small server-stream request answered large does the same for
    ServerStream (its answer inline: the call carried no hello)."""
    stub.Unary(route_probe(size), timeout=CALL_TIMEOUT)
    list(stub.ServerStream(pb.Payload(seq=1, reply_size=size), timeout=CALL_TIMEOUT))


async def learn_route_aio(stub, size: int = THRESHOLD) -> None:
    """learn_route for a grpc.aio stub."""
    await stub.Unary(route_probe(size), timeout=CALL_TIMEOUT)
    async for _ in stub.ServerStream(pb.Payload(seq=1, reply_size=size), timeout=CALL_TIMEOUT):
        pass


class Client:
    """A channel, its stub, and (unless plain) the shmgrpc wrapper around it.

    `raw_channel` is the grpc channel; `channel` is what the stub uses: the
    wrapper made by shmgrpc.intercept_channel (told the channel's options, so
    it knows the raised message-size limits), or the raw channel when plain.
    `wrapper` is that wrapper (None when plain); `interceptor` is another name
    for it, kept for the tests written against the old interceptor API."""

    def __init__(self, target: str, config: Optional[shmgrpc.Config], options: Iterable = (), learn: bool = True):
        self.options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1), *options]
        self.raw_channel = grpc.insecure_channel(target, options=self.options)
        self.wrapper: Optional[shmgrpc.Channel] = (
            shmgrpc.intercept_channel(self.raw_channel, config, options=self.options)
            if config is not None
            else None
        )
        self.interceptor = self.wrapper
        self.channel = self.wrapper if self.wrapper is not None else self.raw_channel
        self.stub = pb_grpc.EchoStub(self.channel)
        if learn and self.wrapper is not None and config is not None and config.threshold <= 16 * MiB:
            learn_route(self.stub, max(THRESHOLD, config.threshold))

    @property
    def engine(self):
        """The wrapper's engine (white-box tests)."""
        return self.wrapper._engine

    def stats(self) -> dict:
        return self.wrapper.stats()

    def close(self) -> None:
        if self.wrapper is not None:
            self.wrapper.close()  # closes the raw channel too
        else:
            self.raw_channel.close()


@pytest.fixture
def make_client():
    """make_client(target, config or None for plain) -> Client, closed after the test."""
    made: List[Client] = []

    def make(target: str, config: Optional[shmgrpc.Config] = None, options: Iterable = (),
             learn: bool = True) -> Client:
        client = Client(target, config, options, learn)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(make_client, echo_server, transport) -> Client:
    """A shmgrpc client of `transport` on the shared server's unix socket."""
    return make_client(echo_server.unix_target, client_config(transport))


# --- messages -----------------------------------------------------------------


def payload_of_size(size: int, seq: int = 0, **fields) -> pb.Payload:
    """A Payload of exactly `size` serialized bytes: `fields`, and a body of
    pattern bytes filling the rest."""
    message = pb.Payload(seq=seq, **fields)
    base = message.ByteSize()
    for body_len in range(max(0, size - base - 6), size - base + 1):  # body tag + length: 2..6 bytes
        message.body = b"x" * body_len
        if message.ByteSize() == size:
            message.body = _body(body_len, seq)
            return message
    raise ValueError(f"no Payload of exactly {size} bytes with {fields}")


def _body(size: int, seq: int) -> bytes:
    from tests.echo_server import pattern

    return pattern(size, seq)


def delta(after: dict, before: dict, *path: str) -> int:
    """after[path] - before[path] for nested stats dicts."""
    a, b = after, before
    for key in path:
        a, b = a.get(key, {}), b.get(key, {})
    return (a or 0) - (b or 0)


class Outbox:
    """A request stream fed one message at a time: put(message), then
    close(); iterating it blocks until the next one (a ping-pong's requests)."""

    def __init__(self) -> None:
        self._queue: "queue.Queue" = queue.Queue()

    def put(self, message) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self):
        while True:
            message = self._queue.get()
            if message is None:
                return
            yield message


def counts(stats: dict, transport: str) -> Tuple[int, int]:
    """(offloaded, restored) message counts of one transport."""
    t = stats["by_transport"][transport]
    return t["offloaded"]["count"], t["restored"]["count"]


# --- a loopback TCP proxy that counts bytes ------------------------------------------


class ByteCountingProxy:
    """Forwards 127.0.0.1:<port> to a target TCP address and counts the bytes
    it moves each way. Threads; at most `max_connections` at once; it closes
    everything on close() or, whatever happens, after `lifetime` seconds."""

    def __init__(self, target_port: int, max_connections: int = 4, lifetime: float = 120.0):
        self.target = ("127.0.0.1", target_port)
        self.max_connections = max_connections
        self._lock = threading.Lock()  # protects the counters and _sockets
        self.upstream = 0  # client -> server bytes
        self.downstream = 0  # server -> client bytes
        self.connections = 0  # accepted in total
        self._active = 0  # open now
        self._sockets: List[socket.socket] = []
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._timer = threading.Timer(lifetime, self.close)
        self._timer.daemon = True
        self._timer.start()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def total(self) -> int:
        with self._lock:
            return self.upstream + self.downstream

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                refuse = self._active >= self.max_connections or self._closed.is_set()
            try:
                upstream = None if refuse else socket.create_connection(self.target, timeout=5)
            except OSError:
                upstream = None
            if upstream is None:
                conn.close()
                continue
            upstream.settimeout(None)
            pair = [conn, upstream, 2]  # both sockets, and pumps still running
            with self._lock:
                self._sockets += [conn, upstream]
                self._active += 1
                self.connections += 1
            threading.Thread(target=self._pump, args=(pair, 0, "upstream"), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, 1, "downstream"), daemon=True).start()

    def _pump(self, pair: list, source: int, counter: str) -> None:
        src, dst = pair[source], pair[1 - source]
        try:
            while True:
                data = src.recv(256 * KiB)
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    setattr(self, counter, getattr(self, counter) + len(data))
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)  # pass the end of this direction on
        except OSError:
            pass
        with self._lock:
            pair[2] -= 1
            last = pair[2] == 0
            if last:
                self._active -= 1
        if last:
            src.close()
            dst.close()

    def close(self) -> None:
        self._closed.set()
        self._timer.cancel()
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture
def tcp_proxy():
    """tcp_proxy(target_port) -> ByteCountingProxy, closed after the test."""
    made: List[ByteCountingProxy] = []

    def make(target_port: int) -> ByteCountingProxy:
        proxy = ByteCountingProxy(target_port)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


# --- the session's /dev/shm must end as it began ----------------------------------------


@pytest.fixture(scope="session", autouse=True)
def no_leftover_segments():
    """After every process of this session has exited (the pytest process
    aside, whose engines the tests close), no shmgrpc name of one of our pids
    may remain. Names of processes a test SIGKILLed must have been reaped by
    then: tests that kill prove the reaping themselves (test_cleanup.py).

    Autouse and session-scoped, so it is set up before, and torn down after,
    every other session fixture (the shared servers among them)."""
    before = set(shm_names()) if os.path.isdir(SHM_DIR) else set()
    yield
    if not os.path.isdir(SHM_DIR):
        return
    gc.collect()  # engines the tests dropped unlinked by their finalizers now, not at exit
    leftovers = []
    for name in set(shm_names()) - before:
        pid = int(wire.NAME_RE.match(name).group(1))
        if pid in SESSION_PIDS:
            leftovers.append(name)
    assert not leftovers, f"shmgrpc names left in {SHM_DIR} by this session's processes: {sorted(leftovers)}"
