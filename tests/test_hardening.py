"""Regression tests for the hardening fixes: each one drives real processes
into the situation a defect was about and checks outcomes on both sides,
the stats, /dev/shm, /proc/<pid>/maps and exit statuses.

 1. a segment truncated under its reader is DATA_LOSS, never SIGBUS
 2. fork: pre-fork workers (and children of a parent that used shmgrpc)
    offload with identities of their own
 3. process_vm_writev denied, readv allowed: the probe notices
 4. a small /dev/shm recovers once a big sender has gone
 5. races: readers against trimming; a single-use handle is read once
 6. a late read (lease expired, call ended) is DATA_LOSS, counted apart
 7. one pool per process, however many channels
 8. config values out of range fail when built; a smaller receiver gets
    its large messages inline
 9. the reaper in another pid namespace spares live owners
10. a FIFO or symlink planted under an id-segment name does not block
11. soak (pytest -m soak runs it alone, -m "not soak" skips it)

Child processes are in tests/_hardening_procs.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent import futures
from typing import Dict, List, Optional

import grpc
import pytest

import shmgrpc
from protos import echo_test_pb2 as pb
from shmgrpc import session, wire
from shmgrpc.transports import _attacher
from shmgrpc.transports import _pool as pool
from shmgrpc import shmdir
from shmgrpc._node import Node
from shmgrpc.errors import HandleError, ShmGrpcError
from tests.conftest import (
    CALL_TIMEOUT,
    ROOT,
    SESSION_PIDS,
    SHM_DIR,
    KiB,
    MiB,
    child_env,
    client_config,
    counts,
    delta,
    read_line,
    run_python,
    shm_names,
    spawn,
    stop_process,
    suite_env,
)
from tests.echo_server import GRPC_OPTIONS, digest, pattern

# `soak` is this file's own marker (pytest -m soak / -m "not soak"). It is
# not registered in a conftest or ini file; only its unknown-marker warning
# is silenced, by exact text, while this module is collected.
warnings.filterwarnings("ignore", message=r"Unknown pytest\.mark\.soak\b", category=pytest.PytestUnknownMarkWarning)

UNARY = "/shmgrpc.testing.v1.Echo/Unary"
PROCS = "import sys; from tests._hardening_procs import main; sys.exit(main())"


def run_role(role: str, spec: dict, timeout: float = 90.0) -> dict:
    """tests/_hardening_procs.py ROLE in a child; its JSON result."""
    return run_python(PROCS, role, json.dumps(spec), timeout=timeout)


def mapped(pid) -> List[str]:
    """shmgrpc names mapped in process `pid` (its /proc/<pid>/maps)."""
    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) > 5:
                base = os.path.basename(parts[5].strip().replace(" (deleted)", ""))
                if wire.NAME_RE.match(base):
                    out.add(base)
    return sorted(out)


def echo(client, size: int, seq: int, reply_size: int = 0, timeout: float = CALL_TIMEOUT) -> None:
    body = pattern(size, seq)
    reply = client.stub.Unary(
        pb.Payload(seq=seq, body=body, digest=digest(body), reply_size=reply_size), timeout=timeout
    )
    assert reply.body == (pattern(reply_size, seq) if reply_size else body)


def unshare_problem(*flags: str) -> Optional[str]:
    """None if `unshare FLAGS true` works here, else why not."""
    try:
        proc = subprocess.run(["unshare", *flags, "true"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return "no unshare binary"
    except subprocess.TimeoutExpired:
        return "unshare timed out"
    return None if proc.returncode == 0 else f"unshare {' '.join(flags)}: {proc.stderr.strip()}"


# --- 1. truncation: DATA_LOSS, never SIGBUS ----------------------------------------------------


@pytest.mark.parametrize(
    "flavour, wait",
    [
        ("sync", 0.0),
        ("aio", 0.0),
        # after the receiver's trim dropped its mapping: the 0-byte file is met afresh
        ("sync", 1.3),
    ],
    ids=["sync-server", "aio-server", "sync-server-after-its-trim-interval"],
)
def test_truncated_request_segment_is_data_loss_and_the_server_lives(fresh_server, make_client, flavour, wait):
    """The client's segment, mapped by the server since the first call, is
    truncated to 0 by the client (any process of the uid may) and a valid
    handle into it is sent: the call fails with DATA_LOSS, the server
    process lives, drops its mapping and serves others. `wait`: the handle
    is sent after the server's trim interval, so the server may have
    dropped its mapping already and meets the truncated file afresh."""
    server = fresh_server(suite_env("shm"), flags=["--aio"] if flavour == "aio" else [])
    before = server.stats()["shmgrpc"]
    out = run_role("truncate_request", {
        "target": server.unix_target, "env": suite_env("shm"), "shm_dir": SHM_DIR,
        "size": 2 * MiB, "wait_before_send": wait,
    })
    victim = out["forged_segment"]
    assert out["first_ok"] and victim in out["segments_before"]
    call = out["truncated_call"]
    assert call["code"] == "DATA_LOSS", call
    assert "truncated" in call["details"] and call["details"].startswith("shmgrpc: "), call
    assert call["seconds"] < 5
    assert out["after_ok"], "the client's next offloaded call failed"
    assert victim not in out["segments_after"], "the client kept its truncated segment"
    assert counts(out["stats"], "shm")[0] == 2 and not out["stats"]["errors"], out["stats"]

    assert server.alive(), f"the server died:\n{server.log()}"
    after = server.stats()["shmgrpc"]
    assert delta(after, before, "errors", "DataLossError") == 1, after["errors"]
    assert delta(after, before, "errors", "HandleError") == 0, after["errors"]
    assert delta(after, before, "by_transport", "shm", "restored", "count") == 2
    assert victim not in mapped(server.pid), "the server still maps the truncated segment"

    client = make_client(server.unix_target, client_config("shm"))
    echo(client, 3 * MiB, 11, reply_size=3 * MiB)
    assert counts(client.stats(), "shm") == (1, 1)
    client.close()
    assert server.stop() == 0, server.log()
    assert shm_names(server.pid) == [] and shm_names(out["pid"]) == []


def test_truncated_response_segment_is_data_loss_for_the_client_and_the_server_lives(fresh_server):
    """The mirror: the client truncates the server's segment it maps, while
    an offloaded response in it waits to be read. The client gets DATA_LOSS
    and lives; the server lives too and drops the truncated segment of its
    own pool (unlinks it, unmaps it), then offloads through a new one."""
    server = fresh_server(suite_env("shm"))
    out = run_role("truncate_response", {
        "target": server.unix_target, "env": suite_env("shm"), "shm_dir": SHM_DIR,
        "server_pid": server.pid, "size": 2 * MiB, "delay": 0.3,
    })
    victim = out["victim"]
    assert out["first_ok"] and out["server_offloaded"] == 2, out
    assert victim in out["mapped_before"]
    assert out["second"]["code"] == "DATA_LOSS", out["second"]
    assert "truncated" in out["second"]["details"], out["second"]
    assert victim not in out["mapped_after"], "the client still maps the truncated segment"
    assert out["after_ok"]
    assert out["stats"]["errors"] == {"DataLossError": 1}, out["stats"]["errors"]
    assert counts(out["stats"], "shm")[1] == 2  # response 0 and the last one

    assert server.alive(), f"the server died:\n{server.log()}"
    assert victim not in os.listdir(SHM_DIR), "the server kept its truncated segment"
    assert victim not in mapped(server.pid)
    assert "was truncated by another process" in server.log()
    stats = server.stats()["shmgrpc"]
    assert stats["by_transport"]["shm"]["offloaded"]["count"] == 3
    assert server.stop() == 0, server.log()
    assert shm_names(server.pid) == [] and shm_names(out["pid"]) == []


# --- 2. fork ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preuse, transport",
    [(False, "auto"), (True, "shm"), (True, "auto")],
    ids=["parent-built-nothing-auto", "parent-used-shmgrpc-shm", "parent-used-shmgrpc-auto"],
)
def test_forked_workers_offload_with_identities_of_their_own(make_client, preuse, transport, tmp_path):
    """The pre-fork pattern: a parent imports shmgrpc (and, with `preuse`,
    has a node: id segment, pool, a published slot, and under auto a
    listening side socket), forks two workers, and each builds its own
    shmgrpc server (SHMGRPC_TRANSPORT=`transport`: auto means memfd). Each
    worker offloads both ways; its id segment names its own pid and start
    time; the parent's files are untouched by the children; everyone exits
    0 and leaves nothing."""
    sockets = [str(tmp_path / f"worker{i}.sock") for i in range(2)]
    env = suite_env(transport)
    spec = {"sockets": sockets, "shm_dir": SHM_DIR, "preuse": preuse, "watch": os.getpid(), "env": env}
    errors = open(tmp_path / "stderr.log", "w+b")
    proc = spawn([sys.executable, "-c", PROCS, "fork_workers", json.dumps(spec)], env,
                 stdout=subprocess.PIPE, stderr=errors)
    try:
        lines = [json.loads(read_line(proc, 30) or "null") for _ in range(3)]
        assert all(lines), f"no ready lines: {lines}\n{open(tmp_path / 'stderr.log').read()}"
        parent = next(x for x in lines if "parent" in x)
        workers = parent["workers"]
        SESSION_PIDS.update(workers)  # the session's leak check judges their names too
        assert sorted(x["worker"] for x in lines if "worker" in x) == sorted(workers)
        if preuse:
            assert any(n.endswith("-id") for n in parent["parent_names"])
            assert any(not n.endswith("-id") for n in parent["parent_names"])
        else:
            assert parent["parent_names"] == []

        for pid, sock in zip(workers, sockets):
            client = make_client(f"unix:{sock}", client_config(transport))
            echo(client, 2 * MiB, pid % 1000, reply_size=2 * MiB)
            assert counts(client.stats(), "memfd" if transport == "auto" else "shm") == (1, 1), client.stats()
            with grpc.insecure_channel(f"unix:{sock}", options=GRPC_OPTIONS) as channel:
                from protos import echo_test_pb2_grpc as pb_grpc

                stats = json.loads(pb_grpc.EchoStub(channel).Stats(pb.Control(), timeout=CALL_TIMEOUT).note)
            assert stats["pid"] == pid
            assert stats["shmgrpc"]["restored"]["count"] >= 1, stats["shmgrpc"]
            assert stats["shmgrpc"]["offloaded"]["count"] >= 1, stats["shmgrpc"]

            start = shmdir.process_start(pid)
            ids = [n for n in shm_names(pid) if n.endswith("-id")]
            assert len(ids) == 1, shm_names(pid)
            match = wire.NAME_RE.match(ids[0])
            assert (int(match.group(1)), int(match.group(2))) == (pid, start), ids[0]
            with open(os.path.join(SHM_DIR, ids[0]), "rb") as f:
                _, id_pid, id_start, *_ = session._ID.unpack(f.read(session._ID.size))
            assert (id_pid, id_start) == (pid, start), "the id segment names another process"
            assert all(wire.NAME_RE.match(n).group(2) == str(start) for n in shm_names(pid))
            client.close()
        if preuse:
            assert set(parent["parent_names"]) <= set(shm_names(parent["parent"]))

        proc.send_signal(signal.SIGTERM)
        final = json.loads(read_line(proc, 30) or "null")
        assert final is not None, open(tmp_path / "stderr.log").read()
        assert final["exited"] == {str(pid): 0 for pid in workers}, open(tmp_path / "stderr.log").read()
        if preuse:
            assert final["parent_names_after"] == parent["parent_names"]
            assert final["parent_data"] == "hello"
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)
        errors.close()
    for pid in [proc.pid, *workers]:
        assert shm_names(pid) == [], shm_names(pid)


# --- 3. cma: writev denied, readv allowed -------------------------------------------------------


@pytest.mark.parametrize("transport", ["auto", "cma"])
def test_client_denied_only_process_vm_writev(servers, transport):
    """The client may pull (process_vm_readv) but not acknowledge
    (process_vm_writev). When the server's welcome (the trailers of the
    channel's first large call, made by the role before these) gives it the
    server's route, its probe of the server tries both, so no cma response
    is offered to it: with auto its responses come by memfd or shm, with
    cma its requests still go by cma (the server pulls and acks them) and
    its responses come inline. Every call succeeds; the reason is in the
    notes. (The server's counts are taken after that first call.)"""
    server = servers.shared(suite_env(transport))
    calls = 3
    out = run_role("client", {
        "target": server.unix_target, "env": suite_env(transport), "deny": "writev",
        "calls": [[2 * MiB, 2 * MiB]] * calls, "server_stats": True,
    })
    before = out["server_before"]
    codes = [r["code"] for r in out["results"]]
    assert codes == ["OK"] * calls and all(r["right"] for r in out["results"]), out["results"]
    stats = out["stats"]
    note = stats["notes"].get("cma", "")
    assert "process_vm_writev" in note and "EPERM" in note, stats["notes"]
    assert not stats["errors"], stats["errors"]
    after = server.stats()["shmgrpc"]
    assert not any(delta(after, before, "errors", k) for k in after["errors"]), after["errors"]
    assert not any("FAILED_PRECONDITION" in r["message"] for r in out["log"])
    assert counts(stats, "cma")[1] == 0, "a cma response was read by a client that cannot ack it"
    assert delta(after, before, "by_transport", "cma", "offloaded", "count") == 0
    if transport == "auto":
        assert counts(stats, "memfd")[1] + counts(stats, "shm")[1] == calls, stats["by_transport"]
        assert out["status"]["transport"] in ("memfd", "shm"), out["status"]
        assert delta(after, before, "inline", "count") == 0
    else:
        assert counts(stats, "cma") == (calls, 0)
        assert delta(after, before, "by_transport", "cma", "restored", "count") == calls
        assert delta(after, before, "inline", "count") == calls  # responses, inline,
        assert delta(after, before, "fallbacks", "peer_cannot_read") == calls  # and why
        assert out["status"]["transport"] == "cma", out["status"]
        # The status says which way goes inline and why (it said only "cma").
        assert "responses inline: cma: this process may not read server pid" in out["status"]["reason"], out
        assert "process_vm_writev" in out["status"]["reason"], out["status"]


# --- 4. a small /dev/shm --------------------------------------------------------------------------


def test_small_dev_shm_recovers_after_a_big_sender_exits(tmp_path):
    """In a private mount namespace, a 64 MiB tmpfs is the shm directory of
    a server and its clients. One client sends one 36 MiB message (its
    segment takes 40 MiB) and exits cleanly. Within a couple of seconds the
    server lets go of that segment, so a second client's 36 MiB messages
    offload again, instead of going inline until the server restarts."""
    mount_dir = tempfile.mkdtemp(prefix="shmgrpc-hardening-tmpfs-")
    try:
        probe = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs -o size=1m tmpfs "$0" && umount "$0"', mount_dir],
            capture_output=True, text=True, timeout=20,
        )
        if probe.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}")
        spec = {"dir": mount_dir, "socket": str(tmp_path / "echo.sock"), "mib": 64,
                "first": 36 * MiB, "second": 36 * MiB, "until": 6.0}
        proc = spawn(["unshare", "-m", "--propagation", "private", sys.executable, "-c", PROCS,
                      "small_shm", json.dumps(spec)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        assert proc.returncode == 0, f"{stdout}\n{stderr}"
        out = json.loads(stdout.splitlines()[-1])
    finally:
        os.rmdir(mount_dir)
    first, second = out["first"], out["second"]
    assert first["exit"] == 0, first["stderr"]
    assert [(r["code"], r["right"], r["offloaded"]) for r in first["results"]] == [("OK", True, 1)], first
    assert second["exit"] == 0, second["stderr"]
    results = second["results"]
    assert all(r["code"] == "OK" and r["right"] for r in results), results
    offloaded = [r for r in results if r["offloaded"]]
    assert offloaded, f"the second client never offloaded: {results}\n{out['server_log']}"
    assert offloaded[0]["t"] <= 3.0, f"offload came back only after {offloaded[0]['t']} s: {results}"
    assert results[-1]["offloaded"] and results[-2]["offloaded"], results
    assert out["server_alive"], out["server_log"]
    assert out["server_stats"]["by_transport"]["shm"]["restored"]["count"] >= 3
    assert out["server_exit"] == 0, out["server_log"]
    assert out["names_at_end"] == [], out["names_at_end"]


# --- 5. races -------------------------------------------------------------------------------------


@pytest.fixture
def race_writer(tmp_path):
    """A process that owns a pool and published slots for this process."""
    spec = {"shm_dir": SHM_DIR, "reader_pid": os.getpid(), "big": 40, "big_size": 100 * KiB,
            "small": 300, "small_size": 1000}
    proc = spawn([sys.executable, "-c", PROCS, "race_writer", json.dumps(spec)],
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = read_line(proc, 30)
    assert line, "the writer did not start"
    info = json.loads(line)
    info["proc"] = proc
    info["inst"] = bytes.fromhex(info["inst"])
    info["big"] = [wire.decode(bytes.fromhex(h)) for h in info["big"]]
    info["small"] = [wire.decode(bytes.fromhex(h)) for h in info["small"]]
    yield info
    if not proc.stdin.closed:
        proc.stdin.close()
    proc.wait(30)
    assert proc.returncode == 0
    stop_process(proc)
    assert shm_names(proc.pid) == []


def _writer_fds(names) -> List[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if os.path.basename(target.replace(" (deleted)", "")) in names:
            out.append(target)
    return out


def test_readers_racing_the_attachers_trim_never_see_raw_errors(race_writer, monkeypatch):
    """Eight threads read 40 segments through one Attacher that keeps at
    most 3 mappings and trims after every read, while another thread trims
    without pause and the owner retires half of the segments midway. Every
    read gives the right bytes or a shmgrpc error with a status; no
    ValueError("mmap closed"), BufferError or other raw error escapes, and
    once the attacher is closed nothing of the writer is mapped or open."""
    monkeypatch.setattr(_attacher.Attacher, "MAX_CACHED", 3)
    monkeypatch.setattr(_attacher.Attacher, "TRIM_SECONDS", 0.0, raising=False)
    attacher = _attacher.Attacher(SHM_DIR, 1 << 30)
    handles, inst = race_writer["big"], race_writer["inst"]
    expected = [pattern(h.length, i) for i, h in enumerate(handles)]
    stop = threading.Event()
    lock = threading.Lock()
    tally = {"ok": 0, "wrong": 0, "clear": {}, "raw": []}

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(len(handles))
            try:
                view, seg = attacher.open(handles[i], inst, reread=True)
                try:
                    data = bytes(view)
                finally:
                    view.release()
                    attacher.finish(handles[i], seg)
                with lock:
                    tally["ok" if data == expected[i] else "wrong"] += 1
            except ShmGrpcError as err:
                with lock:
                    name = f"{type(err).__name__}({err.status_code.name})"
                    tally["clear"][name] = tally["clear"].get(name, 0) + 1
            except Exception as err:  # noqa: BLE001 - exactly what must never happen
                with lock:
                    tally["raw"].append(f"{type(err).__name__}: {err}")

    def trimmer() -> None:
        trim = getattr(attacher, "trim", None)  # (versions before the hardening trim only when over the cap)
        while trim is not None and not stop.is_set():
            try:
                trim()
            except Exception as err:  # noqa: BLE001
                with lock:
                    tally["raw"].append(f"trim: {type(err).__name__}: {err}")

    def reads() -> int:
        with lock:
            return tally["ok"] + tally["wrong"] + sum(tally["clear"].values()) + len(tally["raw"])

    def wait_for_reads(n: int) -> None:
        start, first = time.monotonic(), reads()
        while time.monotonic() - start < 6.0 and (time.monotonic() - start < 1.0 or reads() - first < n):
            time.sleep(0.05)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)] + [threading.Thread(target=trimmer)]
    try:
        for t in threads:
            t.start()
        # Each phase: at least 1 s and 300 reads, at most 6 s (the machine may be busy).
        wait_for_reads(300)
        race_writer["proc"].stdin.write(b"retire\n")
        race_writer["proc"].stdin.flush()
        retired = json.loads(read_line(race_writer["proc"], 10))["retired"]
        wait_for_reads(300)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        sys.setswitchinterval(old_interval)
    assert tally["raw"] == [], tally["raw"][:5]
    assert tally["wrong"] == 0, tally
    assert tally["ok"] >= 300, tally
    assert set(tally["clear"]) <= {"DataLossError(DATA_LOSS)"}, tally["clear"]
    assert len(retired) == 20
    attacher.close()
    names = {h.name for h in handles}
    assert not names & set(mapped("self")), "mappings of the writer's segments outlived the attacher"
    assert _writer_fds(names) == [], "descriptors of the writer's segments outlived the attacher"


def test_one_single_use_handle_read_by_two_threads_is_accepted_once(race_writer):
    """300 published single-use slots, each opened by two threads released
    together: exactly one read of each succeeds, the other is refused as
    single-use; never both."""
    attacher = _attacher.Attacher(SHM_DIR, 1 << 30)
    handles, inst = race_writer["small"], race_writer["inst"]
    barrier = threading.Barrier(2)
    outcome: Dict[int, List[str]] = {i: [] for i in range(len(handles))}

    def read(i: int) -> str:
        barrier.wait(10)
        try:
            view, seg = attacher.open(handles[i], inst, reread=False)
        except HandleError as err:
            return "refused" if "single-use" in str(err) else f"HandleError: {err}"
        except Exception as err:  # noqa: BLE001
            return f"{type(err).__name__}: {err}"
        try:
            good = bytes(view) == pattern(handles[i].length, 100_000 + i)
        finally:
            view.release()
            attacher.finish(handles[i], seg)
        return "read" if good else "wrong"

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with futures.ThreadPoolExecutor(2) as executor:
            for i in range(len(handles)):
                outcome[i] = sorted(executor.map(read, [i, i]))
    finally:
        sys.setswitchinterval(old_interval)
        attacher.close()
    bad = {i: o for i, o in outcome.items() if o != ["read", "refused"]}
    assert not bad, f"{len(bad)} handles not read exactly once: {dict(list(bad.items())[:5])}"


# --- 6. late reads ---------------------------------------------------------------------------------


class Raw:
    """Raw bytes on a framed call of a channel that has learned its route
    (from the welcome of its first large call): this process can publish slots and pins offered to the server."""

    def __init__(self, client):
        # make_client's first call (conftest.learn_route) settled the route.
        self.engine = client.engine
        self.hello, self.route = self.engine.client.call_state()
        assert self.route is not None and self.route.sends("shm"), self.engine.status()
        self.call = client.raw_channel.unary_unary(UNARY)

    def send(self, raw: bytes) -> grpc.RpcError:
        try:
            response = self.call(raw, metadata=[self.hello], timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            return err
        pytest.fail(f"the handle was accepted: {response[:40]!r}")

    def shm(self, data: bytes):
        peer = self.route.peer
        slot, reason = self.engine.node.transports["shm"].slots.get_pool().alloc(len(data), (peer.pid, peer.start))
        assert slot is not None, reason
        slot.segment.mm[slot.offset : slot.offset + len(data)] = data
        pool.Pool.publish(slot)
        return slot.handle(), pool.Ticket(slot, slot.generation)

    def memfd(self, data: bytes):
        assert self.route.sends("memfd")
        encoded, ticket, reason = self.engine.node.transports["memfd"].offload(data, self.route, held=True)
        assert encoded is not None, reason
        return wire.decode(encoded), ticket

    def cma(self, data: bytes):
        assert self.route.sends("cma"), self.engine.status()
        peer = self.route.peer
        encoded, ticket, reason = self.engine.node.transports["cma"].part.get_pins().pin(
            data, self.route.peer_key, peer.inst, (peer.pid, peer.start), os.getpid()
        )
        assert encoded is not None, reason
        return wire.decode(encoded), ticket


    def reuse(self, kind: str, handle, length: int):
        """Hand the slot or pin of `handle` (freed) to a message for another
        peer: another reader, and for cma another key. Returns its ticket."""
        other = (os.getpid(), shmdir.process_start(os.getpid()))
        if kind == "cma":
            encoded, ticket, reason = self.engine.node.transports["cma"].part.get_pins().pin(
                b"x" * length, os.urandom(16), os.urandom(16), other, os.getpid())
            assert encoded is not None, reason
            assert wire.decode(encoded).entry == handle.entry, "the freed entry was expected to be reused"
            return ticket
        # The call ended unread: the use was revoked, and its slot is handed
        # out again once its quarantine is over (transports/_pool.py).
        time.sleep(pool.QUARANTINE_SECONDS + 0.05)
        self.engine.node.transports["shm"].slots.get_pool().reclaim()  # free again, first in line
        slot, reason = self.engine.node.transports["shm"].slots.get_pool().alloc(length, other, "memfd" if kind == "memfd" else "shm")
        assert slot is not None, reason
        assert slot.index == handle.slot and slot.generation > handle.generation, "the freed slot was expected"
        return pool.Ticket(slot, slot.generation)


def _encode(handle) -> bytes:
    if isinstance(handle, wire.ShmHandle):
        return wire.encode_shm(handle)
    if isinstance(handle, getattr(wire, "MemfdHandle", ())):
        return wire.encode_memfd(handle)
    return wire.encode_cma(handle)


@pytest.mark.parametrize("kind", ["shm", "memfd", "cma"])
@pytest.mark.parametrize("why", ["call-ended", "lease-expired", "reused-for-another-peer"])
def test_late_read_is_data_loss_counted_apart_from_forgeries(servers, make_client, kind, why):
    """A genuine handle read after its sender took the slot (or pin) back,
    because the call ended or the lease ran out, is DATA_LOSS naming that
    cause, counted as DataLossError, also when the entry holds another
    peer's message by then (another cma key: still DATA_LOSS, not a
    forgery); a forged token is INVALID_ARGUMENT, counted as HandleError.
    Neither count moves for the other."""
    server = servers.shared(suite_env("auto"))
    client = make_client(server.unix_target, client_config("auto", LEASE="0.2s"))
    raw = Raw(client)
    data = pb.Payload(seq=3, body=pattern(300 * KiB, 3)).SerializeToString()
    handle, ticket = getattr(raw, kind)(data)
    reuse = None
    if why == "call-ended":
        raw.engine.release(ticket)
    elif why == "reused-for-another-peer":
        raw.engine.release(ticket)
        reuse = raw.reuse(kind, handle, len(data))
    else:
        time.sleep(0.35)
        client.stats()  # the sender's pool (and pin table) reclaims expired leases when asked
    before = server.stats()["shmgrpc"]
    err = raw.send(_encode(handle))
    after = server.stats()["shmgrpc"]
    assert err.code() == grpc.StatusCode.DATA_LOSS, (err.code(), err.details())
    assert "reused" in err.details() and "lease" in err.details(), err.details()
    if kind != "cma":
        assert "call ended" in err.details(), err.details()
    assert delta(after, before, "errors", "DataLossError") == 1, after["errors"]
    assert delta(after, before, "errors", "HandleError") == 0, after["errors"]

    forged, forged_ticket = getattr(raw, kind)(data)
    before = after
    err = raw.send(_encode(dataclasses.replace(forged, token=b"\x01" * 16)))
    after = server.stats()["shmgrpc"]
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "token mismatch" in err.details()
    assert delta(after, before, "errors", "HandleError") == 1, after["errors"]
    assert delta(after, before, "errors", "DataLossError") == 0, after["errors"]
    raw.engine.release(forged_ticket)
    if reuse is not None:
        raw.engine.release(reuse)
    echo(client, 1 * MiB, 5, reply_size=1 * MiB)  # the server keeps serving this client


def _server_pool_idle(server) -> dict:
    """The server's pool numbers once nothing is in use (or after 3 s)."""
    deadline = time.monotonic() + 3.0
    while True:
        pool_ = server.stats()["shmgrpc"]["pool"]
        if (pool_["bytes_in_use"] == 0 and pool_["cma_pinned"] == 0) or time.monotonic() > deadline:
            return pool_
        time.sleep(0.1)


@pytest.mark.parametrize(
    "flavour",
    [
        "sync",
        "aio",
    ],
)
def test_unread_responses_of_a_cancelled_call_are_freed_when_it_ends(fresh_server, make_client, flavour):
    """A server stream is cancelled by its client after the server offloaded
    its second response, before the client read it: nobody will ever read
    it. The call is over, so the server frees it (the cma pin of a cma
    client, the memfd slot of an auto one) then, not a lease later."""
    server = fresh_server(suite_env("auto"), flags=["--aio"] if flavour == "aio" else [])
    for transport in ("cma", "auto"):
        client = make_client(server.unix_target, client_config(transport))
        # ServerStream answers large once, inline: its next calls carry the
        # hello, so their large answers are offloaded.
        assert [r.body for r in client.stub.ServerStream(
            pb.Payload(seq=1, reply_size=1 * MiB), timeout=CALL_TIMEOUT)] == [pattern(1 * MiB, 0)]
        before = server.stats()["shmgrpc"]
        stream = client.stub.ServerStream(pb.Payload(seq=3, reply_size=8 * MiB, delay=0.3), timeout=CALL_TIMEOUT)
        assert next(stream).body == pattern(8 * MiB, 0)
        deadline = time.monotonic() + 5
        while delta(server.stats()["shmgrpc"], before, "offloaded", "count") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = server.stats()["shmgrpc"]
        assert delta(after, before, "offloaded", "count") == 2, (transport, after["by_transport"])
        stream.cancel()
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        time.sleep(0.5)  # the handler has noticed (its next response would come at 0.6 s)
        pool_ = _server_pool_idle(server)
        assert pool_["cma_pinned"] == 0 and pool_["bytes_in_use"] == 0, (transport, pool_)
        client.close()


# --- 7. one pool per process -------------------------------------------------------------------


def test_five_channels_share_one_pool_within_its_cap(servers):
    """Five channels of one process (three to an shm server, two to an auto
    server: memfd), all streaming 8 MiB requests at once, under
    SHMGRPC_POOL_SIZE=64MiB: the process never maps more than 64 MiB of its
    own segments (stats, its files in /dev/shm, /proc/self/maps with its
    memfd segments), has one id segment and one pool (one name base, one
    numbering of shm and memfd segments), and every channel still offloads."""
    a, b = servers.shared(suite_env("shm")), servers.shared(suite_env("auto"))
    targets = [a.unix_target] * 3 + [b.unix_target] * 2
    out = run_role("one_pool", {
        "targets": targets, "env": suite_env("auto", POOL_SIZE="64MiB"), "shm_dir": SHM_DIR,
        "sizes": [8 * MiB, 8 * MiB, 8 * MiB, 4 * MiB], "delay": 0.15, "rounds": 2,
    }, timeout=120)
    assert out["errors"] == [] and out["wrong"] == [], out
    cap = 64 * MiB
    peak = out["peak"]
    assert 0 < peak["bytes_mapped"] <= cap, peak
    assert peak["files"] <= cap + session.ID_SIZE, peak
    assert peak["maps"] <= cap + session.ID_SIZE, peak
    ids = [n for n in out["names_seen"] if n.endswith("-id")]
    assert len(ids) == 1, f"one identity per process, got {ids}"
    shm = [n for n in out["names_seen"] if not n.endswith("-id") and not n.startswith("memfd-")]
    memfd = [n for n in out["names_seen"] if n.startswith("memfd-")]
    assert shm and memfd, "both servers were expected to be offloaded to (shm and memfd)"
    bases = {n.rsplit("-", 1)[0] for n in shm}
    assert len(bases) == 1, f"one pool per process, got {sorted(bases)}"
    numbers = [int(n.rsplit("-", 1)[1]) for n in shm + memfd]
    assert len(numbers) == len(set(numbers)), f"segments numbered by more than one pool: {sorted(shm + memfd)}"
    for i, stats in enumerate(out["channel_stats"]):
        assert stats["offloaded"]["count"] >= 1, (i, stats)
        assert stats["pool"]["capacity"] == cap
    assert out["process_pool"]["capacity"] == cap, out["process_pool"]
    assert shm_names(out["pid"]) == []


# --- 8. configuration --------------------------------------------------------------------------


def _build(kind: str):
    if kind == "insecure_channel":
        return shmgrpc.insecure_channel("unix:/nonexistent-hardening.sock")
    if kind == "intercept_channel":
        channel = grpc.insecure_channel("unix:/nonexistent-hardening.sock")
        try:
            return shmgrpc.intercept_channel(channel)
        finally:
            channel.close()
    return shmgrpc.server(futures.ThreadPoolExecutor(1))


BAD_VALUES = [
    pytest.param("SHMGRPC_POOL_SIZE", "7" * 5000, ("64KiB", "1PiB"), id="pool-5000-digits"),
    pytest.param("SHMGRPC_POOL_SIZE", "0", ("64KiB", "1PiB"), id="pool-0"),
    pytest.param("SHMGRPC_MAX_MESSAGE", "0", ("from 1 to 1PiB",), id="max-message-0"),
    pytest.param("SHMGRPC_LEASE", "0.0000000001s", ("0.1", "86400"), id="lease-1e-10-decimal"),
    pytest.param("SHMGRPC_LEASE", "1e-10s", ("0.1", "86400"), id="lease-1e-10"),
    pytest.param("SHMGRPC_SHM_DIR", "<a regular file>", ("not a directory",), id="shm-dir-is-a-file"),
    pytest.param("SHMGRPC_PEER_SHARE", "0", ("above 0", "at most 1"), id="peer-share-0"),
]


@pytest.mark.parametrize("kind", ["insecure_channel", "intercept_channel", "server"])
@pytest.mark.parametrize("var, text, words", BAD_VALUES)
def test_bad_config_values_fail_at_build_naming_variable_and_range(monkeypatch, tmp_path, kind, var, text, words):
    if text == "<a regular file>":
        text = str(tmp_path / "a-file")
        open(text, "w").close()
    monkeypatch.setenv(var, text)
    started = time.monotonic()
    with pytest.raises(shmgrpc.ConfigError) as info:
        _build(kind)
    message = str(info.value)
    assert time.monotonic() - started < 1.0
    assert message.startswith(var + "="), message
    assert len(message) < 300, "the value should be shown cut short"
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_a_receiver_with_a_smaller_max_message_gets_large_messages_inline(servers, make_client):
    """SHMGRPC_MAX_MESSAGE=1MiB on a receiver is what it accepts offloaded,
    not what it accepts: a 4 MiB message to it travels inline and succeeds,
    both ways; smaller ones still offload."""
    small_server = servers.shared(suite_env("auto", MAX_MESSAGE="1MiB"))
    client = make_client(small_server.unix_target, client_config("auto"))
    before = small_server.stats()["shmgrpc"]
    echo(client, 4 * MiB, 1, reply_size=16)
    echo(client, 512 * KiB, 2, reply_size=16)
    after = small_server.stats()["shmgrpc"]
    stats = client.stats()
    assert stats["fallbacks"].get("over_limit") == 1, stats["fallbacks"]
    assert stats["offloaded"]["count"] == 1 and not stats["errors"], stats
    assert delta(after, before, "restored", "count") == 1
    assert not any(delta(after, before, "errors", k) for k in after["errors"]), after["errors"]

    # the other way: a client that accepts 1 MiB offloaded, a 4 MiB response
    server = servers.shared(suite_env("auto"))
    small_client = make_client(server.unix_target, client_config("auto", MAX_MESSAGE="1MiB"))
    before = server.stats()["shmgrpc"]
    echo(small_client, 16 * KiB, 3, reply_size=4 * MiB)
    echo(small_client, 16 * KiB, 4, reply_size=512 * KiB)
    after = server.stats()["shmgrpc"]
    assert delta(after, before, "fallbacks", "over_limit") == 1, after["fallbacks"]
    assert delta(after, before, "offloaded", "count") == 1
    assert small_client.stats()["restored"]["count"] == 1 and not small_client.stats()["errors"]


# --- 9. the reaper in another pid namespace ----------------------------------------------------


REAP = "import json, os, sys, shmgrpc.shmdir as p; print(json.dumps({'pid': os.getpid(), 'removed': p.reap(sys.argv[1])}))"


def test_reaper_in_another_pid_namespace_spares_live_owners(fresh_server, make_client):
    """A process in another pid namespace cannot see our pids. Its reaper
    must still leave a live server's (and this process's) files alone, and
    remove those of a SIGKILLed owner. A private directory under /dev/shm
    keeps other users of /dev/shm out of it."""
    problem = unshare_problem("--pid", "--fork", "--mount-proc")
    if problem:
        pytest.skip(problem)
    shm_dir = tempfile.mkdtemp(prefix="shmgrpc-hardening-reap-", dir=SHM_DIR)
    try:
        server = fresh_server(suite_env("shm", SHM_DIR=shm_dir))
        client = make_client(server.unix_target, client_config("shm", SHM_DIR=shm_dir))
        echo(client, 2 * MiB, 1, reply_size=2 * MiB)
        doomed = spawn([sys.executable, "-c", PROCS, "doomed_owner",
                        json.dumps({"env": suite_env("shm", SHM_DIR=shm_dir), "shm_dir": shm_dir})],
                       stdout=subprocess.PIPE)
        line = read_line(doomed, 30)
        assert line, "the doomed owner did not start"
        doomed_names = json.loads(line)["names"]
        assert any(n.endswith("-id") for n in doomed_names) and len(doomed_names) == 2
        assert stop_process(doomed, signal.SIGKILL) == -signal.SIGKILL
        live = sorted(n for n in os.listdir(shm_dir) if n not in doomed_names)
        assert any(n.startswith(f"shmgrpc-{server.pid}-") and not n.endswith("-id") for n in live), live
        assert any(n.startswith(f"shmgrpc-{os.getpid()}-") for n in live), live

        proc = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", REAP, shm_dir],
            capture_output=True, text=True, timeout=60, env=child_env(), cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.splitlines()[-1])
        assert result["pid"] == 1, "the reaper did not run in a pid namespace of its own"
        assert sorted(result["removed"]) == sorted(doomed_names), result
        assert sorted(os.listdir(shm_dir)) == live, "a live owner's file was reaped"

        echo(client, 2 * MiB, 2, reply_size=2 * MiB)  # both sides still offload
        assert counts(client.stats(), "shm") == (2, 2)
        client.close()
        assert server.stop() == 0, server.log()
    finally:
        leftovers = os.listdir(shm_dir)
        for name in leftovers:
            os.unlink(os.path.join(shm_dir, name))
        os.rmdir(shm_dir)
    assert leftovers == []


# --- 10. a FIFO or symlink planted under an id-segment name ----------------------------------


def _hello(id_segment: str, server_inst: Optional[bytes]) -> str:
    return wire.encode_hello(wire.Hello(
        inst=os.urandom(16), id_segment=id_segment, accepts="s", server_inst=server_inst,
        proof=os.urandom(16) if server_inst else None, cma_key=None, max_receive=-1,
    ))


def test_fifo_or_symlink_under_an_id_segment_name_does_not_block_the_server(fresh_server, make_client, tmp_path):
    """Hellos name 'id segments' that are a FIFO, or a symlink to a FIFO
    elsewhere. The sync server opens peer files without blocking and
    without following links: those calls go plain at once, and unrelated
    calls keep their usual latency meanwhile. A handle naming such a
    'segment' is refused as a bad handle."""
    server = fresh_server(suite_env("auto"))
    good = make_client(server.unix_target, client_config("auto"))
    raw = Raw(good)
    server_inst = raw.route.peer.inst
    base = shmdir.new_base_name()  # names of this process: the leak check watches them
    fifo_id, link_id = f"{base}-id", f"{shmdir.new_base_name()}-id"
    elsewhere = str(tmp_path / "fifo")
    os.mkfifo(elsewhere, 0o600)
    fifo_seg = f"{base}-7"
    planted = [os.path.join(SHM_DIR, n) for n in (fifo_id, link_id, fifo_seg)]
    os.mkfifo(planted[0], 0o600)
    os.symlink(elsewhere, planted[1])
    os.mkfifo(planted[2], 0o600)
    try:
        before = server.stats()["shmgrpc"]
        plain = grpc.insecure_channel(server.unix_target, options=GRPC_OPTIONS)
        call = plain.unary_unary(UNARY)
        request = pb.Payload(seq=4, body=b"crafted").SerializeToString()

        def crafted(hello: str):
            started = time.monotonic()
            try:
                reply = call(request, metadata=[(wire.HELLO_KEY, hello)], timeout=5)
                outcome = "OK" if pb.Payload.FromString(reply).body == b"crafted" else "wrong"
            except grpc.RpcError as err:
                outcome = err.code().name
            return outcome, time.monotonic() - started

        hellos = [_hello(name, inst) for name in (fifo_id, link_id) for inst in (None, server_inst)] * 2
        with futures.ThreadPoolExecutor(len(hellos)) as executor:
            pending = [executor.submit(crafted, h) for h in hellos]
            latencies = []
            for i in range(10):  # unrelated calls meanwhile, timed
                started = time.monotonic()
                echo(good, 256 * KiB, 100 + i, reply_size=256 * KiB, timeout=5)
                latencies.append(time.monotonic() - started)
            results = [p.result(timeout=10) for p in pending]
        plain.close()
        assert [o for o, _ in results] == ["OK"] * len(hellos), results
        assert max(s for _, s in results) < 2.0, results
        assert max(latencies) < 1.0, latencies
        after = server.stats()["shmgrpc"]
        assert delta(after, before, "fallbacks", "peer_not_colocated") >= len(hellos) // 2, after["fallbacks"]

        # a handle naming a FIFO "segment" of ours: refused, not blocked on
        handle, ticket = raw.shm(pb.Payload(seq=5, body=b"x" * 1000).SerializeToString())
        started = time.monotonic()
        err = raw.send(wire.encode_shm(dataclasses.replace(handle, name=fifo_seg)))
        assert time.monotonic() - started < 2.0
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert "not a regular file" in err.details(), err.details()
        raw.engine.release(ticket)
        assert server.alive()
        echo(good, 1 * MiB, 200, reply_size=1 * MiB)
    finally:
        for path in [*planted, elsewhere]:
            if not os.path.islink(path) and os.path.exists(path):
                try:  # a reader blocked on it would be released by a writer
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
            os.unlink(path)


# --- 11. soak ----------------------------------------------------------------------------------


def _rss(pid: int, field: str = "VmRSS") -> int:
    """A /proc/<pid>/status memory field in bytes (VmRSS, RssAnon, RssShmem...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * KiB
    return 0


def _fd_targets(pid: int) -> List[str]:
    """What each open descriptor of `pid` points at (readlink of /proc/pid/fd)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return out


def _segment_fd(target: str, pids=None) -> bool:
    """Does a descriptor target name a shmgrpc segment (a shm name or a
    memfd), of one of `pids` if given?"""
    m = re.match(r"(?:/dev/shm/shmgrpc-|/memfd:memfd-)(\d+)-", target)
    return m is not None and (pids is None or int(m.group(1)) in pids)


def _tmpfs_bytes(pids) -> int:
    total = 0
    for pid in pids:
        for name in shm_names(pid):
            try:
                total += os.stat(os.path.join(SHM_DIR, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


@pytest.mark.soak
def test_soak_server_resources_level_off(fresh_server, tmp_path):
    """One server (auto), three client processes (shm, auto = memfd, cma),
    mixed sizes (4 KiB..8 MiB), all four shapes, some cancels and deadlines
    too short, for SOAK_SECONDS (30 by default, to keep the suite short; set it
    higher for a longer soak). No wrong bytes, no
    unexpected status, the server lives, and its RSS, its open descriptors,
    its pool and the tmpfs space of everyone's shmgrpc files level off (the
    last third's peak, for RSS its median, is not above the first third's
    peak by more than a margin) and stay under the pools' caps."""
    seconds = float(os.environ.get("SOAK_SECONDS", "30"))
    # Every budget is explicit, the pins' too: a sync server keeps the unread
    # responses of cancelled calls pinned until their lease runs out (see
    # test_unread_responses_of_a_cancelled_call_are_freed_when_it_ends), so
    # under the default 1 GiB pin budget its RSS climbs for a whole lease.
    server_cap, client_cap, pin_cap = 96 * MiB, 48 * MiB, 64 * MiB
    server = fresh_server(suite_env("auto", POOL_SIZE="96MiB", CMA_MAX_PINNED="64MiB"))
    before = server.stats()
    procs = []
    for seed, transport in ((1, "shm"), (2, "auto"), (3, "cma")):
        spec = {"target": server.unix_target, "seconds": seconds, "seed": seed,
                "env": suite_env(transport, POOL_SIZE="48MiB", CMA_MAX_PINNED="32MiB")}
        log = open(tmp_path / f"client{seed}.log", "w+")
        procs.append((spawn([sys.executable, "-c", PROCS, "soak", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=log, text=True), log))
    pids = [server.pid] + [p.pid for p, _ in procs]
    # (seconds, server rss, server fds other than segments, tmpfs bytes of everyone's names,
    #  server pool mapped, server anonymous rss, server shared-memory rss, server cma pinned,
    #  server fds of segments)
    samples = []
    outs = []
    try:
        started = time.monotonic()
        while any(p.poll() is None for p, _ in procs) and time.monotonic() - started < seconds + 60:
            if not server.alive():
                break
            targets = _fd_targets(server.pid)
            fds = sum(not _segment_fd(t) for t in targets)
            pool_ = server.stats()["shmgrpc"]["pool"]
            samples.append((time.monotonic() - started, _rss(server.pid), fds, _tmpfs_bytes(pids),
                            pool_["bytes_mapped"], _rss(server.pid, "RssAnon"), _rss(server.pid, "RssShmem"),
                            pool_["cma_pinned"], len(targets) - fds))
            time.sleep(0.5)
        for proc, log in procs:
            try:
                stdout, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
            log.seek(0)
            assert proc.returncode == 0, log.read()[-3000:]
            outs.append(json.loads(stdout.splitlines()[-1]))
    finally:
        for proc, log in procs:
            stop_process(proc)
            log.close()
    assert server.alive(), server.log()
    after = server.stats()
    for out in outs:
        assert out["wrong"] == [], out["wrong"][:5]
        assert out["unexpected"] == [], out["unexpected"][:5]
        assert not out["stats"]["errors"], out["stats"]["errors"]
        assert out["stats"]["offloaded"]["count"] > 0 and out["stats"]["restored"]["count"] > 0, out["stats"]
    used = {t: sum(sum(counts(out["stats"], t)) for out in outs) for t in ("memfd", "shm", "cma")}
    assert all(used.values()), f"every transport was expected in use: {used}"
    assert after["echo"]["corrupt"] == before["echo"]["corrupt"], "the server was handed wrong bytes"
    assert after["shmgrpc"]["offloaded"]["count"] > before["shmgrpc"]["offloaded"]["count"]

    window = [s for s in samples if s[0] <= seconds]
    assert len(window) >= 9, samples
    third = len(window) // 3
    first, last = window[:third], window[-third:]

    def peaks(i: int):
        return max(s[i] for s in first), max(s[i] for s in last)

    caps = server_cap + 3 * client_cap + 4 * session.ID_SIZE
    assert max(s[3] for s in samples) <= caps, ("tmpfs over the caps", max(s[3] for s in samples))
    assert max(s[4] for s in samples) <= server_cap, ("server pool over its cap", max(s[4] for s in samples))
    assert max(s[7] for s in samples) <= pin_cap, ("server pins over their cap", max(s[7] for s in samples))
    rss, fds, tmpfs, pool_mapped = peaks(1), peaks(2), peaks(3), peaks(4)
    summary = (f"rss {rss} (anon {peaks(5)}, shmem {peaks(6)}), fds {fds} (and of segments {peaks(8)}), "
               f"tmpfs {tmpfs}, "
               f"server pool {pool_mapped}; samples (s, rss MiB, anon MiB, shmem MiB): "
               + ", ".join(f"({t:.0f}, {r >> 20}, {a >> 20}, {m >> 20})" for t, r, _, _, _, a, m, _, _ in samples[::10]))
    # RSS against the *median* of the last third: a burst of large messages
    # from three random clients can spike it in any third (and it falls back
    # after), while growth that does not level off lifts the whole third.
    rss_late = statistics.median(s[1] for s in last)
    assert rss_late <= rss[0] * 1.25 + 32 * MiB, f"server RSS grows (last third's median {rss_late}): " + summary
    # Descriptors of segments come and go with the peers' pools (each
    # mapped one holds two: ours for fstat, the mmap's own dup); their space
    # is capped above, and that none is kept is checked once the clients
    # are gone. Every other descriptor must level off.
    assert fds[1] <= fds[0] + 8, "server descriptors grow: " + summary
    assert tmpfs[1] <= tmpfs[0] * 1.25 + 24 * MiB, "tmpfs use grows: " + summary
    assert pool_mapped[1] <= pool_mapped[0] * 1.25 + 24 * MiB, "server pool grows: " + summary
    # The clients are gone: within a few janitor passes the server lets go
    # of every segment of theirs, and their side connections.
    clients = set(pids[1:])
    deadline = time.monotonic() + 4 * Node.JANITOR_SECONDS
    while True:
        targets = _fd_targets(server.pid)
        kept = [t for t in targets if _segment_fd(t, clients)]
        others = sum(not _segment_fd(t) for t in targets)
        if (not kept and others <= fds[0]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert kept == [], f"the server still holds its gone clients' segments: {sorted(set(kept))}"
    assert others <= fds[0], f"the server holds {others} descriptors other than segments, {fds[0]} early on"
    assert server.stop() == 0, server.log()
    for pid in pids:
        assert shm_names(pid) == []
    print(summary)
