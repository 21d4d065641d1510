"""The memfd transport and its side channel, with real processes.

memfd segments have no name in any shm directory: their descriptors travel
once over a side unix socket (abstract `@shmgrpc-<pid>-<hex>`, or a file in
SHMGRPC_SIDE_DIR) that only a process of an allowed uid holding a one-time
ticket from a welcome may use. These tests check what that promises:

- test_namespaces, test_aio_namespaces: server and client in separate pid
  and mount namespaces, each with its own 64 MiB /dev/shm, exchange 256 MiB
  messages and a 200 x 8 MiB stream through memfd, every byte checked, and
  leave nothing in either /dev/shm (auto: at most the 4 KiB id segment);
- test_sigkill_*: SIGKILL of either side mid-transfer, 10 times each: the
  survivor keeps serving (or reconnects to the replacement), never sees a
  wrong byte, and unmaps the dead peer's segments within UNMAP_SECONDS;
- test_first_calls_after_side_connect: the calls right after a side
  connection is made (the window between AUTH_OK and the server
  registering the connection, widened);
- test_side_*: the side socket refuses a process without a ticket, a
  replayed ticket and another uid (SO_PEERCRED) unless SHMGRPC_SIDE_UIDS
  allows it; SHMGRPC_SIDE_DIR puts a 0600 socket file there;
- test_sigterm_*: SIGTERM with grpc's usual patterns (no handler, or one
  that stops the server and exits), memfd and shm;
- test_forged_memfd_handle: a handle naming a segment never sent;
- hostile or broken peers (issue 18): forged handles fail at once and stall
  no one (sync and aio servers); aio and sync clients against a server
  answering with never-sent segments, flooding segments, or never answering
  on its side socket (the aio client's event loop, descriptors); a
  descriptor flood under RLIMIT_NOFILE 256; a uid-65534 flood of the side
  socket (setpriv);
- the side channel's own rules in one process: a handle right behind its
  segment is found (arrive() vs the reader thread), grants grow on request
  up to a peer's share, sends never block on a peer that does not read,
  silent connections of our own uid are capped.

The processes are tests/_sidecar_peer.py; namespaced ones run under
`unshare --pid --fork --mount --mount-proc` with that script's nsinit as
pid 1, which mounts the private tmpfs and reports what is left in it. The
uid tests need root (they setuid to 65534).
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

import grpc
import pytest

from shmgrpc import session, wire
from shmgrpc.transports import _side as side
from tests._sidecar_peer import NSINIT_DONE, PROGRESS, READY, RESULT
from tests.conftest import ROOT, SESSION_PIDS, child_env, suite_env

KiB = 1024
MiB = 1024 * KiB
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="setuid to another uid needs root")
PEER = [sys.executable, "-m", "tests._sidecar_peer"]
UNSHARE = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
ECHO_UNARY = "/shmgrpc.testing.v1.Echo/Unary"


# --- processes ------------------------------------------------------------------


class Proc:
    """A child (a role of tests/_sidecar_peer.py), in its own process group,
    optionally inside fresh pid + mount namespaces. A thread reads its stdout:
    P lines keep only the latest, other lines are queued."""

    def __init__(self, role: str, spec: dict, ns: bool = False, stdin: bool = False, name: str = "",
                 skip_pids: int = 0):
        self.name = name or role
        self.role = role
        self.ns = ns
        cmd = [*PEER, role, json.dumps(spec)]
        if ns:
            cmd = [*UNSHARE, *PEER, "nsinit", json.dumps({"size": "64m", "skip_pids": skip_pids}), "--", *cmd]
        self._err = tempfile.TemporaryFile()
        self.popen = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env({"PYTHONUNBUFFERED": "1"}), stdout=subprocess.PIPE, stderr=self._err,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, start_new_session=True,
        )
        SESSION_PIDS.add(self.popen.pid)
        self._lines: "queue.Queue[str]" = queue.Queue()
        self.progress: Optional[dict] = None
        self.progress_lines = 0
        self._host_pid: Optional[int] = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith(PROGRESS):
                try:
                    self.progress = json.loads(line[len(PROGRESS):])
                except ValueError:
                    self._lines.put(line)  # shown if an expect() fails
                self.progress_lines += 1
            else:
                self._lines.put(line)

    def expect(self, prefix: str, timeout: float) -> dict:
        """The JSON of the next stdout line starting with `prefix`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=min(0.2, max(0.01, left)))
            except queue.Empty:
                line = None
            if line is not None and line.startswith(prefix):
                return json.loads(line[len(prefix):])
            if line is None and (left <= 0 or self.popen.poll() is not None and self._lines.empty()):
                if self.popen.poll() is not None:
                    time.sleep(0.2)  # let the reader drain what is left
                    if not self._lines.empty():
                        continue
                pytest.fail(f"{self.name}: no {prefix.strip()} line within {timeout}s "
                            f"(exit {self.popen.poll()})\nstderr:\n{self.stderr()[-4000:]}")

    def wait_progress(self, check, timeout: float, what: str, stuck=None, context=None) -> dict:
        """The first progress that passes `check`; fails after `timeout`, or
        as soon as `stuck(progress)` says it will never come."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.progress
            if p is not None and check(p):
                return p
            if self.popen.poll() is not None or p is not None and stuck is not None and stuck(p):
                break
            time.sleep(0.02)
        pytest.fail(f"{self.name}: {what} not reached within {timeout}s; last progress {self.progress} "
                    f"(exit {self.popen.poll()})\nstderr:\n{self.stderr()[-4000:]}"
                    + (f"\n{context()}" if context is not None else ""))

    def stderr(self) -> str:
        self._err.flush()
        self._err.seek(0)
        return self._err.read().decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        """The pid of the role process as this (the test's) pid namespace sees it."""
        if not self.ns:
            return self.popen.pid
        if self._host_pid is None:
            deadline = time.monotonic() + 10
            while self._host_pid is None and time.monotonic() < deadline:
                init = _children(self.popen.pid)
                for pid in _children(init[0]) if init else ():
                    if f"\0{self.role}\0" in _cmdline(pid):
                        self._host_pid = pid
                time.sleep(0.02)
            assert self._host_pid is not None, f"{self.name}: no role process under unshare"
        return self._host_pid

    def send(self, line: str) -> None:
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        """Exit status of the direct child (unshare for namespaced ones)."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit within {timeout}s\nstderr:\n{self.stderr()[-4000:]}")

    def kill_group(self) -> None:
        """SIGKILL the whole process group (unshare, its namespace's init and
        everything below it die with it)."""
        if self.popen.returncode is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        self.kill_group()
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self._err.close()


def _children(pid: int) -> List[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if int(data[data.rfind(b")") + 2:].split()[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return "\0" + f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@pytest.fixture
def procs():
    """procs(role, spec, ns=False, stdin=False, name="") -> Proc; every one
    SIGKILLed (its whole process group) after the test."""
    made: List[Proc] = []

    def make(role: str, spec: dict, ns: bool = False, stdin: bool = False, name: str = "",
             skip_pids: int = 0) -> Proc:
        proc = Proc(role, spec, ns=ns, stdin=stdin, name=name, skip_pids=skip_pids)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.close()


@pytest.fixture
def tmp_sock_dir():
    path = tempfile.mkdtemp(prefix="sidecar-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_server(procs, sock: str, env: Dict[str, str], ns: bool = False, aio: bool = False, name: str = "server",
                 **spec) -> Proc:
    """A server on unix socket `sock`; waits for its READY line unless it
    was started with await_go (then it binds on proc.send("go"))."""
    proc = procs("aioserver" if aio else "server", {"listen": [f"unix:{sock}"], "env": env, **spec}, ns=ns,
                 stdin=bool(spec.get("await_go")), name=name)
    if not spec.get("await_go"):
        proc.expect(READY, 60)
    return proc


def open_to_all(sock: str) -> None:
    """Let any uid reach the gRPC socket (the uid tests' clients)."""
    os.chmod(os.path.dirname(sock), 0o755)
    os.chmod(sock, 0o777)


def run_client(procs, sock: str, env: Optional[Dict[str, str]], ops: list, ns: bool = False, timeout: float = 90,
               **spec) -> dict:
    role = "aioclient" if spec.pop("aio", False) else "client"
    # a namespaced client gets another pid than the namespaced server (3):
    # memfd segments are named memfd-<creator's pid>-<n>
    proc = procs(role, {"target": f"unix:{sock}", "env": env, "ops": ops, **spec}, ns=ns, name=role,
                 skip_pids=5 if ns else 0)
    out = proc.expect(RESULT, timeout)
    if ns:
        out["nsinit"] = proc.expect(NSINIT_DONE, 20)
    rc = proc.wait(20)
    assert rc == 0, f"client exited {rc}\n{proc.stderr()[-4000:]}"
    out["stderr"] = proc.stderr()
    return out


# --- what a process holds -----------------------------------------------------


def memfd_maps(pid: int) -> List[str]:
    """Names of every memfd mapping of `pid` ("/memfd:memfd-<creator pid>-<n> (deleted)")."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/memfd:"):
                out.append(parts[5].strip())
    return out


def maps_of_creator(pid: int, creator: int) -> List[str]:
    """memfd mappings of `pid` whose segment `creator` made (named memfd-<creator pid>-<n>)."""
    return [name for name in memfd_maps(pid) if name.startswith(f"/memfd:memfd-{creator}-")]


def wait_until(check, timeout: float):
    deadline = time.monotonic() + timeout
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(0.05)
        value = check()
    return value


def shm_names(pid: int, shm_dir: str = "/dev/shm") -> List[str]:
    out = []
    for name in os.listdir(shm_dir):
        match = wire.NAME_RE.match(name)
        if match and int(match.group(1)) == pid:
            out.append(name)
    return out


def side_sockets(pid: Optional[int] = None) -> List[str]:
    """Names of shmgrpc side sockets in /proc/net/unix (of one server pid, or all)."""
    out = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8:
                path = parts[7]
                base = os.path.basename(path) if not path.startswith("@") else path[1:]
                if base.startswith(f"shmgrpc-{pid}-" if pid is not None else "shmgrpc-"):
                    out.add(path)
    return sorted(out)


def memfd_counts(stats: dict) -> tuple:
    t = stats["by_transport"]["memfd"]
    return t["offloaded"]["count"], t["restored"]["count"]


# --- the raw protocol, as an attacker (or a forger) speaks it ----------------------------------


def raw_welcome(target: str, inst: Optional[bytes] = None):
    """Ask a server for a welcome (side address and a fresh ticket) with a
    hello of our own making, on an ordinary call (an empty Echo request), as
    a client's first calls that carry the hello get theirs, in the trailers:
    (our inst, the decoded welcome)."""
    inst = inst or os.urandom(16)
    hello = wire.encode_hello(wire.Hello(inst, session.NO_SEGMENT, "m", None, None, None, -1))
    with grpc.insecure_channel(target) as channel:
        _, call = channel.unary_unary(ECHO_UNARY).with_call(
            b"", metadata=[(wire.HELLO_KEY, hello)], timeout=10)
        text = wire.metadata_value(call.trailing_metadata(), wire.WELCOME_KEY)
    assert text, "the server sent no welcome"
    return inst, wire.decode_welcome(text)


def side_connect(address: str, inst: bytes, ticket: bytes) -> tuple:
    """Connect and authenticate like a client; (socket, reply kind or None if closed)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(5)
    deadline = time.monotonic() + 5
    while True:
        try:
            sock.connect("\0" + address[1:] if address.startswith("@") else address)
            break
        except BlockingIOError:  # the backlog is full: the server makes room as it accepts
            assert time.monotonic() < deadline, "the side socket's backlog stayed full"
            time.sleep(0.005)
    sock.send(side.MSG.pack(side.MAGIC, side.T_AUTH, 0, 0, inst, ticket))
    data = sock.recv(side.MSG.size)
    return sock, (data[4] if data else None)


def probe(address: str, message: str = "auth", inst: bytes = b"", ticket: bytes = b"", wait: float = 5.0) -> dict:
    """Connect to a side socket from this process (our uid) and send
    `message`: "auth" (inst + ticket), "garbage" or "none". What came back:
    {"reply": "auth_ok" | "closed" | "timeout" | ..., "fds": descriptors received}."""
    out = {"fds": 0, "messages": []}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(5)
        sock.connect("\0" + address[1:] if address.startswith("@") else address)
        if message == "auth":
            sock.send(side.MSG.pack(side.MAGIC, side.T_AUTH, 0, 0, inst, ticket))
        elif message == "garbage":
            sock.send(os.urandom(side.MSG.size))
        sock.settimeout(wait)
        started = time.monotonic()
        try:
            data, fds, _, _ = socket.recv_fds(sock, side.MSG.size, 4)
        except socket.timeout:
            out["reply"] = "timeout"
        else:
            out["fds"] = len(fds)
            for fd in fds:
                os.close(fd)
            out["reply"] = "closed" if not data else "auth_ok" if data[4] == side.T_AUTH_OK else f"kind {data[4]}"
        out["seconds"] = time.monotonic() - started
    finally:
        sock.close()
    return out


def sideauth(procs, spec: dict) -> dict:
    """probe() from another process (for another uid: spec["uid"])."""
    proc = procs("sideauth", spec, name="sideauth")
    out = proc.expect(RESULT, 20)
    proc.wait(10)
    return out


# --- namespaces -----------------------------------------------------------------


_NS_PROBLEM: List[Optional[str]] = []


def namespace_problem() -> Optional[str]:
    """Why unshare + a private tmpfs cannot be used here (None: they can)."""
    if not _NS_PROBLEM:
        problem = None
        if shutil.which("unshare") is None or shutil.which("mount") is None:
            problem = "unshare or mount is not installed"
        else:
            try:
                done = subprocess.run([*UNSHARE, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                                      capture_output=True, text=True, timeout=20)
                if done.returncode != 0:
                    problem = f"unshare/mount not permitted: {done.stderr.strip()[:300]}"
            except (OSError, subprocess.TimeoutExpired) as err:
                problem = f"unshare failed: {err}"
        _NS_PROBLEM.append(problem)
    return _NS_PROBLEM[0]


@pytest.fixture
def namespaces():
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)


def private_shm(proc: Proc) -> dict:
    """The private /dev/shm of a namespaced process, seen from here."""
    root = f"/proc/{proc.pid}/root/dev/shm"
    st = os.statvfs(root)
    return {"bytes": st.f_blocks * st.f_frsize,
            "entries": [[n, os.lstat(os.path.join(root, n)).st_size] for n in sorted(os.listdir(root))]}


def check_private_shm(entries: list, transport: str, where: str) -> None:
    """memfd: nothing at all; auto: at most one 4 KiB shmgrpc id segment."""
    if transport == "memfd":
        assert entries == [], f"{where}: /dev/shm of a memfd-only process holds {entries}"
    else:
        assert len(entries) <= 1 and all(name.endswith("-id") and wire.NAME_RE.match(name) and size == 4096
                                         for name, size in entries), f"{where}: {entries}"


# --- 1. separate pid + mount namespaces, private 64 MiB /dev/shm each ------------------------


@pytest.mark.parametrize(
    "transport, ops",
    [
        ("memfd", [{"op": "unary", "size": 256 * MiB, "count": 2, "seed": 1},
                   {"op": "cstream", "size": 8 * MiB, "count": 80}]),
        ("auto", [{"op": "unary", "size": 256 * MiB, "count": 1, "seed": 7},
                  {"op": "cstream", "size": 8 * MiB, "count": 40}]),
    ],
)
def test_namespaces(procs, namespaces, tmp_sock_dir, transport, ops):
    sock = os.path.join(tmp_sock_dir, "g.sock")
    env = suite_env(transport)
    server = start_server(procs, sock, env, ns=True)
    shm = private_shm(server)
    assert shm["bytes"] == 64 * MiB, "the server's /dev/shm is not the private 64 MiB tmpfs"
    check_private_shm(shm["entries"], transport, "server before any call")

    out = run_client(procs, sock, env, ops, ns=True, timeout=120)
    messages = sum(op["count"] for op in ops)
    unary = sum(op["count"] for op in ops if op["op"] == "unary")
    assert out["errors"] == [], out["errors"]
    assert [good for _, good in out["results"]] == [True] * (unary + 1), out["results"]
    # the client: everything it sent, and the unary answers, went through memfd
    assert out["status"]["transport"] == "memfd", out["status"]
    assert out["status"]["transports"] == ["memfd"], out["status"]
    assert memfd_counts(out["stats"]) == (messages, unary), out["stats"]
    assert out["stats"]["inline"]["count"] == 0 and out["stats"]["fallbacks"] == {}, out["stats"]
    assert out["stats"]["by_transport"]["shm"]["offloaded"]["count"] == 0
    # the server saw every byte right, through memfd
    srv = out["server"]
    assert srv["echo"]["checked"] == messages and srv["echo"]["corrupt"] == 0, srv["echo"]
    assert memfd_counts(srv["server"]) == (unary, messages), srv["server"]
    assert srv["server"]["errors"] == {}, srv["server"]
    # during the run, from inside: nothing (memfd) or only the 4 KiB id segment (auto)
    check_private_shm(out["shm"], transport, "client during the run")
    check_private_shm(srv["shm"], transport, "server during the run")
    check_private_shm(private_shm(server)["entries"], transport, "server after the run (seen from outside)")
    # each mapped the other's segments (named by the creator's pid in its namespace)
    assert srv["pid"] != out["pid"]
    assert any(m.startswith(f"/memfd:memfd-{out['pid']}-") for m in srv["memfd_maps"]), srv["memfd_maps"]
    assert any(m.startswith(f"/memfd:memfd-{srv['pid']}-") for m in out["memfd_maps"]), out["memfd_maps"]
    # the client is gone: the server unmaps what came over its side connection
    left = wait_until(lambda: not maps_of_creator(server.pid, out["pid"]), UNMAP_SECONDS) or maps_of_creator(
        server.pid, out["pid"])
    assert left is True, f"the server still maps the exited client's segments: {left}"
    assert memfd_maps(server.pid) == maps_of_creator(server.pid, srv["pid"])
    # after the run: the client's private /dev/shm as its namespace's init left it
    assert out["nsinit"] == {"rc": 0, "shm": []}, out["nsinit"]

    server.signal(signal.SIGTERM)
    done = server.expect(NSINIT_DONE, 20)
    assert done == {"rc": 0, "shm": []}, f"left in the server's private /dev/shm: {done}"
    assert server.wait(10) == 0


# --- 6. the same with grpc.aio on both sides ----------------------------------------


def test_aio_namespaces(procs, namespaces, tmp_sock_dir):
    sock = os.path.join(tmp_sock_dir, "a.sock")
    env = suite_env("memfd")
    server = start_server(procs, sock, env, ns=True, aio=True)
    out = run_client(procs, sock, env, [{"op": "unary", "size": 64 * MiB, "count": 2, "seed": 3}],
                     ns=True, aio=True)
    assert out["errors"] == [] and [g for _, g in out["results"]] == [True, True], out
    assert out["status"]["transport"] == "memfd", out["status"]
    assert memfd_counts(out["stats"]) == (2, 2), out["stats"]
    srv = out["server"]
    assert memfd_counts(srv["server"]) == (2, 2) and srv["echo"]["corrupt"] == 0, srv
    assert out["shm"] == [] and srv["shm"] == [] and out["nsinit"] == {"rc": 0, "shm": []}
    server.signal(signal.SIGTERM)
    assert server.expect(NSINIT_DONE, 20) == {"rc": 0, "shm": []}
    assert server.wait(10) == 0


# --- 2. SIGKILL of either side mid-transfer ------------------------------------------------


LOOP = {"size": 1 * MiB}  # echoed: both directions offloaded, each side maps the other's segments
# What a call may end with when its peer is SIGKILLed under it ("details":
# the loop client's list of the last unexpected errors, not a code).
ALLOWED_ERRORS = {"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "DATA_LOSS", "details"}
UNMAP_SECONDS = 2.0  # a survivor unmaps a dead peer's segments within this


def refused(progress: dict) -> bool:
    """A loop client whose calls fail with codes other than a dead peer's
    (50 of them): it will not recover by waiting."""
    return sum(v for k, v in progress["errors"].items() if k not in ALLOWED_ERRORS) >= 50


def test_sigkill_clients_mid_transfer(procs, tmp_sock_dir):
    """10 clients SIGKILLed while echoing 1 MiB messages through memfd: the
    server unmaps each one's segments within seconds and keeps serving."""
    sock = os.path.join(tmp_sock_dir, "k.sock")
    env = suite_env("memfd")
    server = start_server(procs, sock, env)
    rng = random.Random(2)
    killed = []
    for batch in range(2):
        clients = [procs("client", {"target": f"unix:{sock}", "env": env, "loop": LOOP, "log": "INFO",
                                    "timeout": 20}, name=f"loop-client-{batch}-{i}") for i in range(5)]
        for c in clients:
            c.wait_progress(lambda p: p["ok"] >= 3, 60, "3 good echoes")
            assert maps_of_creator(server.pid, c.pid), "the server maps none of the client's segments"
        for c in clients:
            time.sleep(rng.uniform(0.0, 0.08))
            last = c.progress
            os.killpg(c.popen.pid, signal.SIGKILL)
            c.popen.wait(10)
            assert last["bad"] == 0 and set(last["errors"]) <= ALLOWED_ERRORS, last
            assert last["transport"] == "memfd" and last["memfd"][0] >= 3, last
            killed.append(c.pid)
        for pid in killed[-5:]:
            left = wait_until(lambda: not maps_of_creator(server.pid, pid), UNMAP_SECONDS) or maps_of_creator(
                server.pid, pid)
            assert left is True, f"{UNMAP_SECONDS} s after SIGKILL of client {pid} the server still maps {left}"
    assert len(killed) == 10
    assert all(shm_names(pid) == [] for pid in [server.pid, *killed])
    assert memfd_maps(server.pid) == maps_of_creator(server.pid, server.pid), "mappings of dead clients"

    out = run_client(procs, sock, env, [{"op": "unary", "size": 2 * MiB, "count": 3, "seed": 50},
                                        {"op": "cstream", "size": 1 * MiB, "count": 10}])
    assert out["errors"] == [] and all(g for _, g in out["results"]), out
    assert memfd_counts(out["stats"])[0] == 13 and out["status"]["transport"] == "memfd", out["stats"]
    assert out["server"]["echo"]["corrupt"] == 0, out["server"]["echo"]
    # what the dead clients were reading is free again (their connections closed)
    assert out["server"]["server"]["pool"]["bytes_in_use"] == 0, out["server"]["server"]["pool"]
    assert server.popen.poll() is None
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0, server.stderr()[-3000:]


def test_sigkill_servers_mid_transfer(procs, tmp_sock_dir):
    """10 servers SIGKILLed while one client echoes 1 MiB messages through
    memfd: each is replaced on the same socket, the client reconnects (a new
    welcome, a new side connection), never gets a wrong byte, and unmaps the
    dead server's segments within seconds."""
    sock = os.path.join(tmp_sock_dir, "r.sock")
    env = suite_env("memfd")
    # each server starts ahead (imports done) and binds when told
    spare = start_server(procs, sock, env, await_go=True)
    client = None
    kills = 0
    dead: List[int] = []
    errors_seen = 0
    for i in range(10):
        server, spare = spare, None
        server.expect("WAITING ", 60)
        server.send("go")
        server.expect(READY, 30)
        spare = start_server(procs, sock, env, await_go=True, name=f"server-{i + 1}")
        if client is None:
            client = procs("client", {"target": f"unix:{sock}", "env": env, "loop": LOOP, "log": "INFO",
                                      "timeout": 20}, name="survivor-client")
        p = client.wait_progress(lambda p: p["by_server"].get(str(server.pid), 0) >= 3, 30,
                                 f"3 good echoes through server {i}", stuck=refused,
                                 context=lambda: "server log (proof lines): " + " | ".join(
                                     line for line in server.stderr().splitlines() if "proof" in line)[:1500])
        assert maps_of_creator(client.pid, server.pid), "the client maps none of the server's segments"
        before = dict(p["errors"])
        time.sleep(random.uniform(0.0, 0.05))
        os.killpg(server.popen.pid, signal.SIGKILL)
        server.popen.wait(10)
        kills += 1
        dead.append(server.pid)
        left = wait_until(lambda: not maps_of_creator(client.pid, server.pid), UNMAP_SECONDS) or maps_of_creator(
            client.pid, server.pid)
        assert left is True, f"{UNMAP_SECONDS} s after SIGKILL of server {server.pid} the client still maps {left}"
        after = client.progress
        errors_seen += sum(v for k, v in after["errors"].items() if k != "details") - sum(
            v for k, v in before.items() if k != "details")
    # the last replacement serves the survivor too
    server = spare
    server.expect("WAITING ", 60)
    server.send("go")
    server.expect(READY, 30)
    p = client.wait_progress(lambda p: p["by_server"].get(str(server.pid), 0) >= 3, 30, "echoes via the last server",
                             stuck=refused)
    assert kills == 10
    assert errors_seen >= 1, "no SIGKILL interrupted a call in flight"
    assert p["bad"] == 0, p
    assert set(p["errors"]) <= ALLOWED_ERRORS, p["errors"]
    assert p["transport"] == "memfd" and p["memfd"][1] >= 30, p
    assert all(shm_names(pid) == [] for pid in [client.pid, *dead])
    theirs = [m for m in memfd_maps(client.pid) if not m.startswith(f"/memfd:memfd-{client.pid}-")]
    assert theirs and theirs == maps_of_creator(client.pid, server.pid), f"mappings of dead servers: {theirs}"
    client.kill_group()


def test_first_calls_after_side_connect(procs, tmp_sock_dir):
    """The server's side thread answers AUTH_OK and only then registers the
    connection. A client's next call (its hello proved with the ticket) can
    reach the server in between: here the window is widened to 0.3 s, as a
    loaded machine sometimes does (test_sigkill_servers_mid_transfer hits
    it without help). Calls made after the window must succeed, through
    memfd; the channel must not stay broken."""
    sock = os.path.join(tmp_sock_dir, "w.sock")
    env = suite_env("memfd")
    server = start_server(procs, sock, env, adopt_delay=0.3)
    out = run_client(procs, sock, env, [{"op": "unary", "size": 1 * MiB, "count": 1},
                                        {"op": "pause", "seconds": 1.0},
                                        {"op": "unary", "size": 1 * MiB, "count": 3, "seed": 10}],
                     log="INFO", server_stats=False)
    later = out["results"][-3:] if len(out["results"]) >= 3 else out["results"]
    assert later == [["unary", True]] * 3, (
        f"calls after the side connection was registered still fail: {out['errors']}; server log: "
        + " | ".join(l for l in server.stderr().splitlines() if "proof" in l)[:600])
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0


# --- 3. side socket attacks -------------------------------------------------------------------


@needs_root
def test_side_socket_refuses_without_ticket_replay_and_other_uid(procs, tmp_sock_dir):
    sock = os.path.join(tmp_sock_dir, "s.sock")
    target = f"unix:{sock}"
    env = suite_env("memfd")
    server = start_server(procs, sock, env)
    first = run_client(procs, sock, env, [{"op": "unary", "size": 1 * MiB, "count": 2}], log="INFO")
    assert memfd_counts(first["stats"]) == (2, 2), first["stats"]

    # the side socket, as anyone of this network namespace finds it
    listed = side_sockets(server.pid)
    assert len(listed) == 1 and listed[0].startswith("@"), listed
    address = listed[0]
    inst, welcome = raw_welcome(target)
    assert welcome.side == address and welcome.ticket is not None and "m" in welcome.accepts

    # same uid, no ticket: closed, nothing received. Saying nothing at all
    # is cut off after the server's deadline (side.PENDING_SECONDS, 1 s)
    silent: dict = {}
    silent_thread = threading.Thread(target=lambda: silent.update(probe(address, "none", wait=6)))
    silent_thread.start()
    out = probe(address, "garbage")
    assert out["reply"] == "closed" and out["fds"] == 0, out
    out = probe(address, "auth", os.urandom(16), os.urandom(16))
    assert out["reply"] == "closed" and out["fds"] == 0, out
    # a real ticket, quoted for another instance than it was issued to
    out = probe(address, "auth", os.urandom(16), welcome.ticket)
    assert out["reply"] == "closed" and out["fds"] == 0, out

    # another uid with a valid ticket: SO_PEERCRED refuses it, at accept
    inst2, w2 = raw_welcome(target)
    out = sideauth(procs, {"address": address, "inst": inst2.hex(), "ticket": w2.ticket.hex(), "uid": NOBODY})
    assert out["uid"] == NOBODY and out["reply"] == "closed" and out["fds"] == 0, out
    assert wait_until(lambda: f"uid {NOBODY} is not allowed" in server.stderr(), 3), server.stderr()[-3000:]

    # the same kind of ticket works for our uid, once: a replay is refused
    inst3, w3 = raw_welcome(target)
    s3, kind = side_connect(address, inst3, w3.ticket)
    assert kind == side.T_AUTH_OK
    out = probe(address, "auth", inst3, w3.ticket)
    assert out["reply"] == "closed" and out["fds"] == 0, f"replayed ticket accepted: {out}"
    s3.close()
    # the ticket an other-uid process presented never reached the server
    # (closed at accept): it still works, once, for the instance it was issued to
    s2, kind = side_connect(address, inst2, w2.ticket)
    assert kind == side.T_AUTH_OK
    s2.close()
    silent_thread.join(10)
    assert silent["reply"] == "closed" and silent["fds"] == 0 and silent["seconds"] < 3, silent

    # a whole client of another uid: refused by the server's SO_PEERCRED check
    # (it accepts uid 0 itself), falls back and still gets right answers
    open_to_all(sock)
    other = run_client(procs, sock, suite_env("auto", side_uids="0"), [{"op": "unary", "size": 1 * MiB, "count": 2}],
                       uid=NOBODY, timeout=30)
    assert other["uid"] == NOBODY and other["errors"] == [] and all(g for _, g in other["results"]), other
    assert memfd_counts(other["stats"]) == (0, 0), other["stats"]
    # (no shm either: a memfd-only server has no id segment, and ours is another uid's)
    assert other["status"]["transport"] == "inline" and other["status"]["settled"], other["status"]
    assert "refused the ticket" in other["stats"]["notes"].get("memfd", ""), other["stats"]["notes"]
    # (refusals at accept are logged once a minute per uid: a flood of them says it once)
    assert server.stderr().count(f"uid {NOBODY} is not allowed") >= 1

    # the server serves on, through memfd
    again = run_client(procs, sock, env, [{"op": "unary", "size": 1 * MiB, "count": 2, "seed": 9}])
    assert again["errors"] == [] and all(g for _, g in again["results"]), (again["results"], again["errors"])
    assert memfd_counts(again["stats"]) == (2, 2), again["stats"]
    assert again["server"]["echo"]["corrupt"] == 0
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0


@needs_root
def test_side_uids_allows_another_uid(procs, tmp_sock_dir):
    sock = os.path.join(tmp_sock_dir, "u.sock")
    server = start_server(procs, sock, suite_env("memfd", side_uids=str(NOBODY)))
    inst, welcome = raw_welcome(f"unix:{sock}")
    out = sideauth(procs, {"address": welcome.side, "inst": inst.hex(), "ticket": welcome.ticket.hex(),
                           "uid": NOBODY})
    assert out["reply"] == "auth_ok", out
    open_to_all(sock)
    other = run_client(procs, sock, suite_env("memfd", side_uids="0"),
                       [{"op": "unary", "size": 1 * MiB, "count": 2}], uid=NOBODY, timeout=30)
    assert other["uid"] == NOBODY and other["errors"] == [] and all(g for _, g in other["results"]), other
    assert other["status"]["transport"] == "memfd" and memfd_counts(other["stats"]) == (2, 2), other
    assert memfd_counts(other["server"]["server"]) == (2, 2)
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0


# --- 4. SHMGRPC_SIDE_DIR ---------------------------------------------------------------------


@needs_root
def test_side_dir_socket_file(procs, tmp_sock_dir):
    side_dir = tempfile.mkdtemp(prefix="sidedir-")
    try:
        os.chmod(side_dir, 0o755)  # others may look, the socket itself must keep them out
        sock = os.path.join(tmp_sock_dir, "d.sock")
        env = suite_env("memfd", side_dir=side_dir)
        server = start_server(procs, sock, env)
        assert os.listdir(side_dir) == [], "the side socket is made on first use, not before"
        out = run_client(procs, sock, suite_env("memfd"), [{"op": "unary", "size": 1 * MiB, "count": 2}])
        assert out["errors"] == [] and all(g for _, g in out["results"])
        assert out["status"]["transport"] == "memfd" and memfd_counts(out["stats"]) == (2, 2), out
        names = os.listdir(side_dir)
        assert len(names) == 1 and names[0].startswith(f"shmgrpc-{server.pid}-") and names[0].endswith(".sock")
        path = os.path.join(side_dir, names[0])
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        assert side_sockets(server.pid) == [path], "the side socket is the file, not an abstract name"
        inst, welcome = raw_welcome(f"unix:{sock}")
        assert welcome.side == path
        denied = sideauth(procs, {"address": path, "inst": inst.hex(), "ticket": welcome.ticket.hex(),
                                  "uid": NOBODY})
        assert denied["reply"].startswith("connect: PermissionError"), denied
        server.signal(signal.SIGTERM)
        assert server.wait(20) == 0
        assert os.listdir(side_dir) == [], "the side socket outlived its server"
    finally:
        shutil.rmtree(side_dir, ignore_errors=True)


# --- 5. SIGTERM with grpc's usual patterns --------------------------------------------------


def _sigterm_run(procs, tmp_sock_dir, transport: str, mode: str, shm_dir: str, name: str, **extra):
    sock = os.path.join(tmp_sock_dir, f"{name}.sock")
    env = suite_env(transport, shm_dir=shm_dir, **extra)
    server = start_server(procs, sock, env, shutdown=mode, name=name)
    out = run_client(procs, sock, suite_env(transport, shm_dir=shm_dir),
                     [{"op": "unary", "size": 1 * MiB, "count": 2}], server_stats=False)
    assert out["errors"] == [] and all(g for _, g in out["results"]), out
    t = out["stats"]["by_transport"][transport]
    assert (t["offloaded"]["count"], t["restored"]["count"]) == (2, 2), out["stats"]
    assert out["status"]["transport"] == transport
    server.signal(signal.SIGTERM)
    return server, server.wait(20)


@pytest.mark.parametrize("mode, expected_rc", [("wait", -signal.SIGTERM), ("handler", 0)])
def test_sigterm_memfd_leaves_nothing(procs, tmp_sock_dir, mode, expected_rc):
    """wait_for_termination() without a handler: SIGTERM kills the process
    (no atexit), yet nothing is left: memfd segments have no names and the
    abstract side socket dies with its process. With a handler that stops
    the server and exits: the same, exit status 0."""
    shm_dir = tempfile.mkdtemp(prefix="sidecar-shm-")
    try:
        server, rc = _sigterm_run(procs, tmp_sock_dir, "memfd", mode, shm_dir, f"term-{mode}")
        assert rc == expected_rc, server.stderr()[-3000:]
        assert os.listdir(shm_dir) == [] and shm_names(server.pid) == []
        assert side_sockets(server.pid) == []
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)


def test_sigterm_memfd_side_dir_socket_left_behind(procs, tmp_sock_dir):
    """With SHMGRPC_SIDE_DIR and grpc's default SIGTERM (no handler), the
    process dies without closing: its socket file stays. Nothing else of
    shmgrpc creates a name there, so the next start in that directory should
    remove what a dead server left (as shm's reaper does for /dev/shm)."""
    shm_dir = tempfile.mkdtemp(prefix="sidecar-shm-")
    side_dir = tempfile.mkdtemp(prefix="sidecar-side-")
    try:
        server, rc = _sigterm_run(procs, tmp_sock_dir, "memfd", "wait", shm_dir, "term-dir", side_dir=side_dir)
        assert rc == -signal.SIGTERM
        assert os.listdir(shm_dir) == []
        left = os.listdir(side_dir)
        # the next server in that side dir, once it listens
        nxt, rc2 = _sigterm_run(procs, tmp_sock_dir, "memfd", "handler", shm_dir, "term-dir2", side_dir=side_dir)
        assert rc2 == 0
        still = [n for n in os.listdir(side_dir) if n.startswith(f"shmgrpc-{server.pid}-")]
        assert not still, (f"a SIGTERMed memfd server left {left} in SHMGRPC_SIDE_DIR; the next server "
                           f"(pid {nxt.pid}) did not remove it: {os.listdir(side_dir)}")
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
        shutil.rmtree(side_dir, ignore_errors=True)


def test_sigterm_shm_default_handler_leaves_files_next_start_reaps(procs, tmp_sock_dir):
    shm_dir = tempfile.mkdtemp(prefix="sidecar-shm-")
    try:
        dead, rc = _sigterm_run(procs, tmp_sock_dir, "shm", "wait", shm_dir, "shm-wait")
        assert rc == -signal.SIGTERM
        left = shm_names(dead.pid, shm_dir)
        assert any(n.endswith("-id") for n in left) and any(not n.endswith("-id") for n in left), (
            f"expected the killed server's id and pool segments to be left: {os.listdir(shm_dir)}")
        # the next shmgrpc start in that directory reaps them; with a handler
        # that stops and exits, nothing is left at all
        nxt, rc2 = _sigterm_run(procs, tmp_sock_dir, "shm", "handler", shm_dir, "shm-handler")
        assert rc2 == 0, nxt.stderr()[-3000:]
        assert shm_names(dead.pid, shm_dir) == [], "the next start did not reap the dead server's segments"
        assert os.listdir(shm_dir) == [], f"left after a clean stop: {os.listdir(shm_dir)}"
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)


# --- 7. a forged memfd handle ---------------------------------------------------------------


def test_forged_memfd_handle(procs, tmp_sock_dir):
    """A client with a real side connection and a proved hello sends a memfd
    handle naming a segment it never sent: DATA_LOSS at once, saying so (the
    descriptor of a segment is in the receiver's queue before any handle
    naming it can be: what is not there was never sent); the server serves
    others meanwhile and afterwards."""
    sock = os.path.join(tmp_sock_dir, "f.sock")
    target = f"unix:{sock}"
    env = suite_env("memfd")
    server = start_server(procs, sock, env)
    inst, welcome = raw_welcome(target)
    side_sock, kind = side_connect(welcome.side, inst, welcome.ticket)
    assert kind == side.T_AUTH_OK
    hello = wire.encode_hello(wire.Hello(inst, session.NO_SEGMENT, "m", welcome.inst,
                                         session.proof(welcome.ticket, session.LABEL_HELLO, inst), None, -1))
    forged = wire.encode_memfd(wire.MemfdHandle(1 * MiB, os.urandom(16), 1, 4096, 0, 777))
    started = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(ECHO_UNARY)(forged, metadata=[(wire.HELLO_KEY, hello)], timeout=30)
    took = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value
    assert "segment 777 was never sent" in info.value.details(), info.value.details()
    assert took < 1.0, took  # a channel's connect and one call: nothing waits for the segment
    out = run_client(procs, sock, env, [{"op": "unary", "size": 1 * MiB, "count": 2}], log="INFO")
    assert out["errors"] == [] and all(g for _, g in out["results"]), (out["results"], out["errors"])
    assert memfd_counts(out["stats"]) == (2, 2), out["stats"]
    # the same hello once its side connection is gone: the server can no longer
    # verify it (the ticket went with the connection), so it reads no handle:
    # INVALID_ARGUMENT at once, no wait
    side_sock.close()
    time.sleep(1.0)  # the server's side thread sees the EOF
    started = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(ECHO_UNARY)(forged, metadata=[(wire.HELLO_KEY, hello)], timeout=30)
    took = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert "cannot verify" in info.value.details(), info.value.details()
    assert took < 4, f"{took:.1f} s for a handle whose side connection is closed: {info.value.details()}"
    again = run_client(procs, sock, env, [{"op": "unary", "size": 1 * MiB, "count": 2, "seed": 4}])
    assert again["errors"] == [] and all(g for _, g in again["results"]), (again["results"], again["errors"])
    assert memfd_counts(again["stats"]) == (2, 2), again["stats"]
    assert again["server"]["echo"]["corrupt"] == 0
    assert again["server"]["server"]["errors"].get("DataLossError", 0) == 1, again["server"]["server"]["errors"]
    assert again["server"]["server"]["errors"].get("HandleError", 0) == 1, again["server"]["server"]["errors"]
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0


# --- 8. hostile or broken peers (issue 18) ------------------------------------------------------


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_measuring(procs, sock: str, calls: int = 120, seconds: float = 3.0, name: str = "measure"):
    """Small unrelated calls from a plain gRPC client process, started now
    (at most `seconds` of calls); measured() collects them."""
    return procs("measure", {"target": f"unix:{sock}", "calls": calls, "pause": 0.01, "seconds": seconds},
                 name=name)


def measured(proc) -> dict:
    """The latencies of start_measuring's calls, in ms: {"p50", "p99", "max", "n"}."""
    out = proc.expect(RESULT, 120)
    proc.wait(20)
    ms = out["ms"]
    return {"p50": percentile(ms, 0.5), "p99": percentile(ms, 0.99), "max": max(ms), "n": len(ms)}


def measure(procs, sock: str, calls: int = 120, seconds: float = 3.0) -> dict:
    return measured(start_measuring(procs, sock, calls, seconds))


class Forger:
    """A peer that shook hands properly (a real side connection, a proved
    hello) and then sends memfd handles naming segments it never sent, from
    `threads` threads, one call after another with a short pause."""

    def __init__(self, target: str, threads: int = 4, pause: float = 0.02):
        self.target = target
        inst, welcome = raw_welcome(target)
        self.side_sock, kind = side_connect(welcome.side, inst, welcome.ticket)
        assert kind == side.T_AUTH_OK
        self.hello = wire.encode_hello(wire.Hello(inst, session.NO_SEGMENT, "m", welcome.inst,
                                                  session.proof(welcome.ticket, session.LABEL_HELLO, inst), None, -1))
        self.pause = pause
        self.results: List[tuple] = []  # (code, details, seconds)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        number = 1000 * (index + 1)
        with grpc.insecure_channel(self.target) as channel:
            call = channel.unary_unary(ECHO_UNARY)
            while not self._stop.is_set():
                number += 1
                forged = wire.encode_memfd(wire.MemfdHandle(1 * MiB, os.urandom(16), 1, 4096, 0, number))
                started = time.monotonic()
                try:
                    call(forged, metadata=[(wire.HELLO_KEY, self.hello)], timeout=30)
                    self.results.append(("OK", "", time.monotonic() - started))
                except grpc.RpcError as err:
                    self.results.append((err.code().name, err.details(), time.monotonic() - started))
                self._stop.wait(self.pause)

    def __enter__(self) -> "Forger":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(40)
        self.side_sock.close()


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_forged_memfd_handles_fail_at_once_and_stall_no_one(procs, tmp_sock_dir, aio):
    """Four threads of one peer send memfd handles naming segments never
    sent on its side connection. Each fails at once (DATA_LOSS naming the
    segment): nothing waits for a descriptor on the server's dispatch (the
    sync server's polling thread, the aio server's event loop), so another
    client's small calls keep their latency: p99 within 2x of a run without
    the attack (plus 20 ms for a shared 2-core machine). Before the fix each
    such handle held the dispatch for up to 1 s."""
    sock = os.path.join(tmp_sock_dir, "stall.sock")
    env = suite_env("memfd")
    server = start_server(procs, sock, env, aio=aio)
    quiet = measure(procs, sock)
    with Forger(f"unix:{sock}") as forger:
        time.sleep(0.2)
        attacked = measure(procs, sock)
    forged = forger.results
    print(f"unrelated calls, ms: quiet {quiet}, attacked {attacked}; {len(forged)} forged handles, "
          f"slowest {max(s for _, _, s in forged) * 1000:.1f} ms")
    assert len(forged) >= 20, forged
    assert {code for code, _, _ in forged} == {"DATA_LOSS"}, forged[:3]
    assert all("never sent" in details and "segment " in details for _, details, _ in forged), forged[:3]
    assert max(s for _, _, s in forged) < 0.5, sorted(s for _, _, s in forged)[-5:]
    assert attacked["p99"] <= 2 * quiet["p99"] + 20, (quiet, attacked)
    again = run_client(procs, sock, env, [{"op": "unary", "size": 1 * MiB, "count": 2}], aio=aio, log="INFO")
    assert again["errors"] == [] and all(g for _, g in again["results"]), (again["results"], again["errors"])
    assert memfd_counts(again["stats"]) == (2, 2), again["stats"]
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "sync"])
@pytest.mark.parametrize("evil", [{"forge": True}, {"flood": 3000}, {"mute_side": True}],
                         ids=["never-sent", "flood", "mute-side"])
def test_client_against_a_hostile_server(procs, tmp_sock_dir, evil, aio):
    """A server that answers with memfd handles naming segments it never
    sent, or that sends 3,000 sealed segments of fresh numbers before each
    answer and never retires one, or whose side socket never answers the
    client's ticket (the client waits CONNECT_SECONDS for it, in a thread of
    its own: never on the loop). The aio client restores on its event
    loop (a sync client in its calling thread: it only ever lost the one
    call, and holds to the same share of descriptors): each forged handle
    fails at once (DATA_LOSS), so the loop's
    longest gap stays far below the 1 s arrival wait each handle cost before
    (under 250 ms: a busy 2-core machine deschedules a process for ~100 ms
    now and then; quiet, it is 5-20 ms);
    the flood is refused beyond this client's share of its descriptors
    (RLIMIT_NOFILE 1024 here: 512 for memfd, 64 per peer), so its
    descriptors stay bounded (it was 3,000 more per answer, never given back)."""
    sock = os.path.join(tmp_sock_dir, "evil.sock")
    start_server(procs, sock, suite_env("memfd"), evil=evil)
    calls = 6
    out = run_client(procs, sock, suite_env("memfd"), [{"op": "unary", "size": 1024, "count": calls,
                                                        "reply_size": 1 * MiB}],
                     aio=aio, log="INFO", nofile=1024, timeout=120)
    print(f"{'aio' if aio else 'sync'} client: loop gap {out.get('loop_gap_ms')} ms, {out['fds']} descriptors, "
          f"{len(out['memfd_maps'])} memfd maps, calls {out['call_seconds']} s, errors {out['errors'][:1]}")
    if aio:
        assert out["loop_gap_ms"] < 250, out["loop_gap_ms"]
    if evil.get("forge"):
        assert len(out["errors"]) == calls and all(e[1] == "DATA_LOSS" and "never sent" in e[2]
                                                   for e in out["errors"]), out["errors"]
        assert max(out["call_seconds"]) < 0.5, out["call_seconds"]
    elif evil.get("flood"):
        assert out["errors"] == [] and out["results"] == [["unary", True]] * calls, out["errors"]
        assert out["fds"] < 150, out["fds"]
        assert len(out["memfd_maps"]) <= 64, len(out["memfd_maps"])
    else:  # no side connection: the answers come inline
        assert out["errors"] == [] and out["results"] == [["unary", True]] * calls, out["errors"]
        assert out["status"]["transport"] == "inline", out["status"]
        assert "refused the ticket" in out["stats"]["notes"].get("memfd", "") or "timed out" in \
            out["stats"]["notes"].get("memfd", ""), out["stats"]["notes"]


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_descriptor_flood_under_a_low_nofile(procs, tmp_sock_dir, aio):
    """A peer that shook hands sends one sealed 64-byte segment as 5,000
    distinct segment numbers to a server whose RLIMIT_NOFILE is 256. The
    server holds at most this peer's grant (half the soft limit is for
    memfd, an eighth of that a peer's share, an eighth of the share the
    first grant) and closes the rest at once; it keeps accepting gRPC
    connections and side connections, and offloads for another client.
    Then the peer opens 30 more side connections: those past memfd's half
    are refused, another client is still served (inline if need be), and
    once the peer has gone, new clients get memfd again. Before, every
    segment cost a descriptor until the limit: gRPC's listener hit EMFILE
    and new channels failed."""
    from tests._sidecar_peer import send_flood, tiny_segment

    sock = os.path.join(tmp_sock_dir, "fdflood.sock")
    env = suite_env("memfd")
    server = start_server(procs, sock, env, aio=aio, nofile=256)
    quiet = measure(procs, sock, seconds=1.5)
    before = len(os.listdir(f"/proc/{server.pid}/fd"))
    inst, welcome = raw_welcome(f"unix:{sock}")
    attacker, kind = side_connect(welcome.side, inst, welcome.ticket)
    assert kind == side.T_AUTH_OK
    fd = tiny_segment(inst)
    during = start_measuring(procs, sock, seconds=1.5, name="measure-flood")
    try:
        sent = send_flood(attacker, fd, inst, 1, 5000)
    finally:
        os.close(fd)
    time.sleep(0.5)  # the server's side thread reads what is still queued
    held = len(os.listdir(f"/proc/{server.pid}/fd"))
    attacked = measured(during)
    print(f"descriptor flood: sent {sent}; server descriptors {before} -> {held} (limit 256); "
          f"unrelated calls, ms: quiet {quiet}, during the flood {attacked}")
    assert sent >= 1000, sent
    assert held <= before + 16 + 2, (before, held)
    assert attacked["p99"] <= 2 * quiet["p99"] + 20, (quiet, attacked)  # + 20 ms: a shared 2-core machine
    ops = [{"op": "unary", "size": 1 * MiB, "count": 2, "reply_size": 1 * MiB}]
    out = run_client(procs, sock, env, ops, aio=aio, log="INFO", timeout=60)  # a new channel, memfd both ways
    assert out["errors"] == [] and all(g for _, g in out["results"]), (out["results"], out["errors"])
    assert memfd_counts(out["stats"]) == (2, 2), out["stats"]
    # the same peer opens side connection after side connection (each with a
    # ticket of its own): each reserves itself and its grant, until memfd's
    # half of the descriptors is spoken for; then they are refused
    extra, refused = [], 0
    for _ in range(30):
        inst, welcome = raw_welcome(f"unix:{sock}")
        conn, kind = side_connect(welcome.side, inst, welcome.ticket)
        if kind == side.T_AUTH_OK:
            extra.append(conn)
        else:
            refused += 1
            conn.close()
    held = len(os.listdir(f"/proc/{server.pid}/fd"))
    print(f"connection flood: {len(extra)} accepted, {refused} refused; server descriptors {held}")
    assert refused > 0 and held <= before + 128 + 8, (len(extra), refused, held)
    out = run_client(procs, sock, env, ops, aio=aio, log="INFO", timeout=60)  # served, inline if need be
    assert out["errors"] == [] and all(g for _, g in out["results"]), (out["results"], out["errors"])
    for conn in extra + [attacker]:
        conn.close()
    time.sleep(0.3)  # the server's side thread sees them go, and their reservations with them
    out = run_client(procs, sock, env, ops, aio=aio, log="INFO", timeout=60)
    assert memfd_counts(out["stats"]) == (2, 2), out["stats"]
    assert "File descriptor limit" not in server.stderr(), server.stderr()[-2000:]
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0


# A flood of the side socket by another uid (a process of this network
# namespace, e.g. another container of the pod): `count` connections, each
# held open; says how many connected and how many the server closed.
SIDE_FLOOD = r"""
import json, os, select, socket, sys, time
address, count, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
name = "\0" + address[1:] if address.startswith("@") else address
socks, failed = [], 0
deadline = time.monotonic() + 10
while len(socks) + failed < count:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.setblocking(False)
    try:
        s.connect(name)
        socks.append(s)
    except BlockingIOError:  # the listener's backlog is full: try again
        s.close()
        if time.monotonic() > deadline:
            failed += 1
        else:
            time.sleep(0.001)
    except OSError:
        failed += 1
        s.close()
print(json.dumps({"uid": os.getuid(), "connected": len(socks), "failed": failed}), flush=True)
time.sleep(hold)
closed = 0
for s in socks:
    poller = select.poll()  # select() cannot watch descriptors past 1023
    poller.register(s, select.POLLIN)
    if poller.poll(0):
        try:
            closed += s.recv(96) == b""
        except OSError:
            closed += 1
print(json.dumps({"closed_by_server": closed}), flush=True)
"""


def nobody_python() -> Optional[str]:
    """A Python that uid 65534 may run (the project's may live under /root)."""
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if not candidate:
            continue
        done = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
                               candidate, "-c", "pass"], capture_output=True, timeout=30)
        if done.returncode == 0:
            return candidate
    return None


@needs_root
@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_other_uid_flood_of_the_side_socket(procs, tmp_sock_dir, aio):
    """A uid-65534 process opens 1,100 connections to the side socket of a
    server whose RLIMIT_NOFILE is 1024, and holds them. The server checks
    SO_PEERCRED at accept and closes each at once: its descriptors stay
    near where they were, gRPC's listener never meets EMFILE, and legitimate
    clients are served through memfd meanwhile. Before, each connection was
    kept up to 2 s unauthenticated, with no cap: the server sat at 1024/1024."""
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv")
    python = nobody_python()
    if python is None:
        pytest.skip("no Python that uid 65534 may run")
    sock = os.path.join(tmp_sock_dir, "uidflood.sock")
    env = suite_env("memfd")
    server = start_server(procs, sock, env, aio=aio, nofile=1024)
    _, welcome = raw_welcome(f"unix:{sock}")
    before = len(os.listdir(f"/proc/{server.pid}/fd"))
    peak = [before]
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            try:
                peak[0] = max(peak[0], len(os.listdir(f"/proc/{server.pid}/fd")))
            except OSError:
                pass
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    quiet = measure(procs, sock, seconds=1.5)
    sampler.start()
    during = start_measuring(procs, sock, seconds=1.5, name="measure-flood")
    flood = subprocess.Popen(
        ["prlimit", "--nofile=4096:4096", "setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
         python, "-c", SIDE_FLOOD, welcome.side, "1100", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    SESSION_PIDS.add(flood.pid)
    try:
        opened = json.loads(flood.stdout.readline() or "{}")
        out = run_client(procs, sock, env, [{"op": "unary", "size": 1 * MiB, "count": 2}], aio=aio, log="INFO",
                         timeout=60)
        finished = json.loads(flood.stdout.readline() or "{}")
        flood.wait(30)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
        sampling.set()
        sampler.join(5)
    attacked = measured(during)
    print(f"uid {NOBODY} flood: {opened}, {finished}; server descriptors {before}, peak {peak[0]} (limit 1024); "
          f"legitimate client: errors {out['errors']}, memfd {memfd_counts(out['stats'])}, "
          f"EMFILE logged: {'File descriptor limit' in server.stderr()}; "
          f"unrelated calls, ms: quiet {quiet}, during the flood {attacked}")
    assert attacked["p99"] <= 2 * quiet["p99"] + 20, (quiet, attacked)  # + 20 ms: a shared 2-core machine
    assert opened.get("uid") == NOBODY and opened.get("connected", 0) >= 1000, (opened, flood.stderr.read())
    assert finished.get("closed_by_server", 0) >= opened["connected"] - 5, (opened, finished)
    assert peak[0] <= before + 40, (before, peak[0])
    assert out["errors"] == [] and all(g for _, g in out["results"]), (out["results"], out["errors"])
    assert memfd_counts(out["stats"]) == (2, 2), out["stats"]
    assert "File descriptor limit" not in server.stderr(), server.stderr()[-2000:]
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0



# --- 9. the side channel's own rules, in one process (real sockets, real memfd) ----------------


class SidePair:
    """A listening Side (the receiver, with a real _attacher.Attacher) and a
    client Side connected to it: two nodes of one process, each end a real
    side connection."""

    def __init__(self, peer_bytes: int = 1 * 1024 * MiB):
        from shmgrpc.transports import _attacher

        self.attacher = _attacher.Attacher("/dev/shm", 1 * 1024 * MiB)
        self.server_inst, self.client_inst = os.urandom(16), os.urandom(16)
        self.server = side.Side(self.server_inst, on_segment=self._arrived, on_retire=self._retired,
                                on_lost=lambda conn: self.attacher.drop_memfd(conn.id), peer_bytes=peer_bytes)
        self.client = side.Side(self.client_inst, on_segment=lambda *a: False, on_retire=lambda *a: None,
                                on_lost=lambda conn: None, peer_bytes=peer_bytes)
        address = self.server.listen()
        ticket = self.server.issue_ticket(self.client_inst)
        self.sender = self.client.connect(address, ticket, self.server_inst)  # the client's end
        assert wait_until(lambda: self.server.conn_for(self.client_inst) is not None, 5)
        self.receiver = self.server.conn_for(self.client_inst)  # the server's end
        self.segments: list = []

    def _arrived(self, conn, number, mm, size):
        return self.attacher.add_memfd((conn.id, number), mm, size)

    def _retired(self, conn, number):
        self.attacher.drop_memfd(conn.id, number)

    def segment(self, number: int):
        from shmgrpc.transports.memfd import MemfdSegment

        seg = MemfdSegment(number, 4096, 1, self.client_inst)
        self.segments.append(seg)
        return seg

    def close(self) -> None:
        self.client.close()
        self.server.close()
        for seg in self.segments:
            seg.close_fd()
            seg.mm.close()
        self.attacher.close()


def test_a_handle_right_behind_its_segment_is_always_found():
    """The sender passes a segment and at once (as a handle on gRPC would)
    the receiver asks for it, racing its own reader thread: arrive() finds
    it every time, 2,000 times (a message the reader thread has taken is
    handled before arrive() looks); a number never sent, and one retired,
    fail at once, saying which. Retired segments give back their descriptor
    and mapping."""
    pair = SidePair()
    try:
        fds_before = len(os.listdir("/proc/self/fd"))
        for number in range(1, 2001):
            seg = pair.segment(number)
            assert pair.sender.send_segment(number, seg.size, seg.fd) == ""
            why = pair.server.arrive(pair.receiver, number)
            assert why is None, (number, why)
            pair.sender.retire(number)
            pair.segments.pop()
            seg.close_fd()
            seg.mm.close()
        started = time.monotonic()
        assert "never sent" in pair.server.arrive(pair.receiver, 10**6)
        assert wait_until(lambda: "retired" in (pair.server.arrive(pair.receiver, 2000) or ""), 2)
        assert time.monotonic() - started < 1.0
        assert not pair.receiver._held and not pair.attacher._memfd, (pair.receiver._held, pair.attacher._memfd)
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2, (fds_before, len(os.listdir("/proc/self/fd")))
    finally:
        pair.close()


def test_grants_grow_on_request_and_stop_at_a_peer_share():
    """With a budget of 64 descriptors (8 per peer's first grant, 16 per
    peer at most): an honest sender asks for more before it needs it and
    gets it, up to its share, then sends such messages inline
    (side_budget); the receiver never refused one of its segments. A
    dishonest one past its grant is refused: descriptor closed, sender told."""
    saved = side.LEDGER.budget
    side.LEDGER.budget = side.Budget(total=64, per_peer=16)
    try:
        pair = SidePair()
        try:
            assert pair.sender.peer_grant == 8 and pair.receiver.granted == 8
            sent, reasons = 0, []
            for number in range(1, 40):
                seg = pair.segment(number)
                reason = pair.sender.send_segment(number, seg.size, seg.fd)
                if reason == "side_budget" and sent < 16:
                    # the grant may still be on its way: what a sender does is
                    # send that one inline; the test waits and tries again
                    wait_until(lambda: pair.sender.peer_grant > sent, 2)
                    reason = pair.sender.send_segment(number, seg.size, seg.fd)
                reasons.append(reason)
                sent += reason == ""
            assert sent == 16 and reasons[16:] == ["side_budget"] * (len(reasons) - 16), reasons
            assert wait_until(lambda: len(pair.receiver._held) == 16, 2), len(pair.receiver._held)
            assert not any("refused" in why for why in pair.receiver._gone.values()), dict(pair.receiver._gone)
            # a sender that ignores its grant: the kernel delivers, the receiver refuses
            fds_before = len(os.listdir("/proc/self/fd"))
            seg = pair.segment(99)
            with pair.sender._send_lock:
                assert pair.sender._send(side.T_SEGMENT, 99, seg.size, [seg.fd])
            assert wait_until(lambda: "refused" in (pair.server.arrive(pair.receiver, 99) or ""), 2)
            assert "over this peer's share" in pair.server.arrive(pair.receiver, 99)
            assert len(os.listdir("/proc/self/fd")) <= fds_before + 2  # the segment's own two here
        finally:
            pair.close()
    finally:
        side.LEDGER.budget = saved


def test_side_sends_never_block_on_a_peer_that_does_not_read():
    """A peer that shook hands and then never reads its side socket: our
    sends to it fail at once when its queue is full (side_busy: that
    message goes inline), the connection stays up, and the retires that did
    not fit are sent once it reads again."""
    server = side.Side(os.urandom(16), on_segment=lambda *a: True, on_retire=lambda *a: None,
                       on_lost=lambda conn: None)
    try:
        address = server.listen()
        inst = os.urandom(16)
        ticket = server.issue_ticket(inst)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        raw.connect("\0" + address[1:])
        # a grant far above what a queue holds: only the queue can stop the sends
        raw.send(side.MSG.pack(side.MAGIC, side.T_AUTH, 10**6, 1 << 50, inst, ticket))
        assert raw.recv(side.MSG.size)[4] == side.T_AUTH_OK
        conn = server.conn_for(inst)
        fd = os.memfd_create("busy")
        try:
            reasons, started = [], time.monotonic()
            for number in range(1, 100000):
                reasons.append(conn.send_segment(number, 4096, fd))
                if reasons[-1]:
                    break
            took = time.monotonic() - started
        finally:
            os.close(fd)
        assert reasons[-1] == "side_busy" and len(reasons) > 10, reasons[-3:]
        assert took < 5 and conn.alive, took
        held = len(conn._sent)
        for number in range(1, 11):
            conn.retire(number)  # the queue is full: kept, still counted as held
        assert len(conn._retiring) == 10 and len(conn._sent) + len(conn._retiring) == held
        kinds = []
        deadline = time.monotonic() + 10
        while kinds.count(side.T_RETIRE) < 10 and time.monotonic() < deadline:
            try:
                data, fds, _, _ = socket.recv_fds(raw, side.MSG.size, 1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                time.sleep(0.01)  # the server's side thread sends what waited, each pass
                continue
            for received in fds:
                os.close(received)
            kinds.append(data[4])
        assert kinds.count(side.T_RETIRE) == 10 and not conn._retiring, (kinds[-12:], conn._retiring)
        raw.close()
    finally:
        server.close()


def test_silent_connections_of_our_own_uid_are_capped():
    """200 connections of our own uid (allowed) that never say anything: at
    most PENDING_PER_UID are kept, the older ones are closed as newer ones
    come (long before their 1 s), and a client with a ticket that connects
    in the middle of them is let in (it waits for room in the backlog the
    flood fills, rather than give up at once)."""
    server_inst = os.urandom(16)
    server = side.Side(server_inst, on_segment=lambda *a: True, on_retire=lambda *a: None,
                       on_lost=lambda conn: None)
    client = side.Side(os.urandom(16), on_segment=lambda *a: True, on_retire=lambda *a: None,
                       on_lost=lambda conn: None)
    silent: list = []
    try:
        address = server.listen()
        name = "\0" + address[1:]

        def connect_silent(n):
            for _ in range(n):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
                s.setblocking(False)
                deadline = time.monotonic() + 5
                while True:
                    try:
                        s.connect(name)
                        break
                    except BlockingIOError:  # backlog full: the server is accepting
                        assert time.monotonic() < deadline
                        time.sleep(0.001)
                silent.append(s)

        ticket = server.issue_ticket(client.inst)
        outcome: dict = {}

        def connect_client():
            try:
                outcome["conn"] = client.connect(address, ticket, server_inst)
            except Exception as err:  # noqa: BLE001 - the test reports it
                outcome["error"] = err

        with server._lock:  # the side thread stops at its next accept: the backlog fills up
            started = time.monotonic()
            while True:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
                s.setblocking(False)
                try:
                    s.connect(name)
                except BlockingIOError:
                    s.close()
                    break
                silent.append(s)
            thread = threading.Thread(target=connect_client)
            thread.start()
            time.sleep(0.1)
        thread.join(side.CONNECT_SECONDS + 2)
        assert "conn" in outcome, outcome
        conn = outcome["conn"]
        connect_silent(200 - len(silent))

        def closed(s) -> bool:
            try:
                return s.recv(side.MSG.size) == b""  # EOF: the server closed it
            except BlockingIOError:
                return False
            except OSError:
                return True

        shut = wait_until(lambda: sum(closed(s) for s in silent) >= 200 - side.PENDING_PER_UID,
                          side.PENDING_SECONDS * 0.8)
        took = time.monotonic() - started
        assert shut and took < side.PENDING_SECONDS, (sum(closed(s) for s in silent), took)
        assert len(server.door._pending) <= side.PENDING_PER_UID, len(server.door._pending)
        assert conn.alive and server.conn_for(client.inst) is not None
    finally:
        for s in silent:
            s.close()
        client.close()
        server.close()
