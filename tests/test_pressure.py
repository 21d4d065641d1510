"""Memory under pressure (issue 18, items 2, 5 and 6): each peer's share of
what a process offloads; a message in flight never taken from its reader;
peers stopped past the lease.

 1. a late ack (the reader's write after the sender took the entry back and
    gave it to the next message) marks nothing but its own message read:
    cma entries and pool slots, in one process with real process_vm_readv
    and real shared memory, the late write put exactly where it can land
 2. a request gRPC could still resend stays readable however full the pool
    (only its call's end or its lease frees it); one plain gRPC would not
    retry goes once read, when room is short
 3. a peer's share of the pool and of the pin budget, in one process
 4. a client that starts large server streams and reads none: the server
    holds no more than that client's share of its pool and pins for it, and
    another client keeps offloading both ways (sync and aio servers)
 5. a client stopped (SIGSTOP) past the server's lease: the server gives the
    memory back after the lease, not before; resumed, the client reads
    DATA_LOSS for what was taken back, never other bytes
 6. a response the server let go of because the call ended (its deadline)
    and that the client reads only after that: the call ends
    DEADLINE_EXCEEDED, as plain gRPC ends it, not DATA_LOSS (sync and aio
    clients, cma and shm)
 7. a cma soak under pin pressure (bidi streams, cancels, deadlines): no call
    ends in a way plain gRPC could not have ended it. PRESSURE_SOAK_SECONDS
    (default 6) runs it longer.

Child processes are in tests/_pressure_procs.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import List

import grpc
import pytest

import shmgrpc.aio
from protos import echo_test_pb2 as pb
from protos import echo_test_pb2_grpc as pb_grpc
from shmgrpc import wire
from shmgrpc.transports import _attacher
from shmgrpc.transports import _layout as layout
from shmgrpc.transports import _pins as pins
from shmgrpc.transports import _pool as pool
from shmgrpc import shmdir
from shmgrpc.transports.base import FREE_ON_ACK, KEEP_UNTIL_END, KEEP_WHILE_ROOM
from shmgrpc.transports.shm import ShmSegment
from tests.conftest import (
    CALL_TIMEOUT,
    SHM_DIR,
    KiB,
    MiB,
    client_config,
    counts,
    delta,
    learn_route_aio,
    read_line,
    spawn,
    stop_process,
    suite_env,
    wait_until,
)
from tests.echo_server import GRPC_OPTIONS, digest, pattern

KINDS = {"shm": ShmSegment}  # the pools made here hold shm segments

PROCS = "import sys; from tests._pressure_procs import main; sys.exit(main())"
CHANNEL_OPTIONS = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


def child(role: str, spec: dict) -> subprocess.Popen:
    """tests/_pressure_procs.py ROLE, its stdin and stdout pipes ours."""
    return spawn([sys.executable, "-c", PROCS, role, json.dumps(spec)],
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def said(proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    """The next JSON line of `proc`."""
    line = read_line(proc, timeout)
    if not line:
        proc.kill()
        pytest.fail(f"the child said nothing: {proc.stderr.read().decode()[-3000:]}")
    return json.loads(line)


def go_on(proc: subprocess.Popen) -> dict:
    """Tell `proc` to go on; its last JSON line once it exits."""
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    out = said(proc, 60.0)
    assert proc.wait(30) == 0, proc.stderr.read().decode()[-3000:]
    return out


def me() -> tuple:
    return os.getpid(), shmdir.process_start(os.getpid())


# --- 1. a late ack -----------------------------------------------------------------------------


def test_a_late_cma_ack_marks_nothing_but_its_own_message_read(monkeypatch):
    """The reader's last check passed; before its ack lands, the sender takes
    the entry back (the call ended) and pins the next message there. The
    late ack must not make the sender free the newer message as read (its
    reader would find the entry reused: DATA_LOSS, or another peer's key),
    nor make that reader refuse it as "not ready"."""
    table = pins.Pins(64 * MiB, 60.0)
    key, inst = os.urandom(16), os.urandom(16)
    first, second = pattern(256 * KiB, 1), pattern(256 * KiB, 2)
    raw, ticket, _ = table.pin(first, key, inst, me(), os.getpid())
    h1 = wire.decode(raw)
    newer = {}
    checked = pins._check_generation

    def then_reused(h):
        checked(h)  # the reader's last check...
        if h.generation == h1.generation:  # ...then the sender moves on
            table.release(ticket)
            raw2, _, _ = table.pin(second, key, inst, me(), os.getpid())
            newer["handle"] = wire.decode(raw2)

    monkeypatch.setattr(pins, "_check_generation", then_reused)
    assert bytes(pins.read(h1, os.getpid(), inst, key, 1 << 30)) == first
    h2 = newer["handle"]
    assert h2.entry == h1.entry, "the freed entry was expected to be reused"
    assert table.pinned_bytes == len(second), "the late ack freed the newer message"
    assert bytes(pins.read(h2, os.getpid(), inst, key, 1 << 30)) == second
    assert table.pinned_bytes == 0, "its own ack frees it"
    table.close()


def test_a_late_slot_ack_marks_nothing_but_its_own_message_read(monkeypatch):
    """The same for a pool slot (shm; memfd slots are the same slots): the
    reader checked the slot after its copy; before its ACKED lands, the
    sender frees the slot and, its quarantine over (the reader was
    descheduled that long), publishes the next message in it."""
    inst = os.urandom(16)
    now = [time.monotonic()]
    p = pool.Pool(SHM_DIR, 4 * MiB, 1 * MiB, 60.0, inst, clock=lambda: now[0], kinds=KINDS)
    attacher = _attacher.Attacher(SHM_DIR, 1 << 30)
    first, second = pattern(200 * KiB, 1), pattern(200 * KiB, 2)

    def publish(data: bytes):
        slot, reason = p.alloc(len(data), me())
        assert slot is not None, reason
        slot.segment.mm[slot.offset : slot.offset + len(data)] = data
        pool.Pool.publish(slot)
        return slot.handle(), pool.Ticket(slot, slot.generation)

    try:
        h1, t1 = publish(first)
        newer = {}
        claim = _attacher.claim

        def then_reused(mm, base, token, state):
            if state == layout.ACKED and token == h1.token:
                p.release(t1)
                now[0] += pool.QUARANTINE_SECONDS
                p.reclaim()  # the slot is free again, first in line
                newer["handle"], _ = publish(second)
            claim(mm, base, token, state)  # the late write

        monkeypatch.setattr(_attacher, "claim", then_reused)
        view, seg = attacher.open(h1, inst)
        assert bytes(view) == first
        view.release()
        attacher.finish(h1, seg)
        h2 = newer["handle"]
        assert h2.slot == h1.slot and h2.name == h1.name, "the freed slot was expected to be reused"
        assert p.stats().slots_in_use == 1, "the late ack freed the newer message"
        view, seg = attacher.open(h2, inst)
        assert bytes(view) == second
        view.release()
        attacher.finish(h2, seg)
        assert p.stats().slots_in_use == 0, "its own ack frees it"
    finally:
        attacher.close()
        p.close()


# --- 2. requests gRPC may resend ---------------------------------------------------------------


def test_a_request_grpc_could_resend_stays_readable_however_full_the_pool():
    """Two requests, both read (acknowledged) by their server: one of a call
    plain gRPC could retry (KEEP_UNTIL_END), one of a call only shmgrpc's
    handle keeps retryable (KEEP_WHILE_ROOM). The pool runs short: the
    second goes, the first stays readable until its call ends, and the next
    message finds no room (it would go inline) rather than taking it."""
    inst = os.urandom(16)
    size = 64 * KiB
    # One segment of four 64 KiB slots: the whole pool.
    p = pool.Pool(SHM_DIR, 4096 + 4 * size, 4 * size, 60.0, inst, kinds=KINDS)
    attacher = _attacher.Attacher(SHM_DIR, 1 << 30)

    def publish(seq: int, held: int = FREE_ON_ACK):
        data = pattern(size, seq)
        slot, reason = p.alloc(size, me(), held=held)
        if slot is None:
            return None, reason
        slot.segment.mm[slot.offset : slot.offset + size] = data
        pool.Pool.publish(slot)
        return (slot.handle(), pool.Ticket(slot, slot.generation)), ""

    def read(h, reread: bool = False) -> bytes:
        view, seg = attacher.open(h, inst, reread=reread)
        try:
            return bytes(view)
        finally:
            view.release()
            attacher.finish(h, seg)

    try:
        (h_end, t_end), _ = publish(1, KEEP_UNTIL_END)
        (h_room, _), _ = publish(2, KEEP_WHILE_ROOM)
        assert read(h_end) == pattern(size, 1) and read(h_room) == pattern(size, 2)
        unread = [publish(3 + i) for i in range(2)]
        assert all(u[0] is not None for u in unread)
        third, _ = publish(5)  # no free slot: the acknowledged KEEP_WHILE_ROOM one goes
        assert third is not None and third[0].slot == h_room.slot
        fourth, reason = publish(6)
        assert fourth is None and reason == "pool_full", "a request gRPC may resend was taken back"
        assert read(h_end, reread=True) == pattern(size, 1)  # gRPC's retry reads it again
        p.release(t_end)  # its call ended
        fifth, _ = publish(7)
        assert fifth is not None and fifth[0].slot == h_end.slot
    finally:
        attacher.close()
        p.close()


# --- 3. a peer's share, in one process ---------------------------------------------------------


def test_a_peer_is_held_to_its_share_of_the_pool_and_of_the_pins():
    inst = os.urandom(16)
    hog, other = os.urandom(16), os.urandom(16)
    p = pool.Pool(SHM_DIR, 16 * MiB, 4 * MiB, 60.0, inst, peer_share=0.5, kinds=KINDS)
    table = pins.Pins(8 * MiB, 60.0, peer_share=0.5)
    try:
        held = []
        while True:
            slot, reason = p.alloc(1 * MiB, me(), peer=hog)
            if slot is None:
                break
            held.append(slot)
        assert reason == "peer_share_full"
        assert p.peer_bytes(hog) <= 8 * MiB and len(held) == 8 // (layout.size_class(1 * MiB) // MiB)
        slot, reason = p.alloc(1 * MiB, me(), peer=other)
        assert slot is not None, reason
        assert p.peer_bytes(other) == slot.size
        payload = b"p" * (1 * MiB)
        pinned = 0
        while True:
            raw, _, reason = table.pin(payload, b"k" * 16, hog, me(), os.getpid())
            if raw is None:
                break
            pinned += 1
        assert reason == "cma_peer_share_full" and pinned == 4 and table.peer_bytes(hog) == 4 * MiB
        raw, _, reason = table.pin(payload, b"k" * 16, other, me(), os.getpid())
        assert raw is not None, reason
    finally:
        table.close()
        p.close()


# --- 4. the client that reads nothing ----------------------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_a_client_that_reads_nothing_is_held_to_its_share(fresh_server, make_client, flavour):
    """A client (auto: memfd first, then shm, then cma) starts four server
    streams of sixteen 4 MiB answers and reads none: without a share it
    took the server's whole pool and pin budget. With the default share
    (half of each), the server holds at most that for it, its other answers
    wait inline under gRPC's flow control, and another client's calls are
    offloaded both ways meanwhile (the counters of both processes). Once the
    reader-of-nothing cancels, the server has nothing in use."""
    pool_cap, pin_cap = 64 * MiB, 32 * MiB
    server = fresh_server(suite_env("auto", POOL_SIZE="64MiB", CMA_MAX_PINNED="32MiB"),
                          flags=["--aio"] if flavour == "aio" else [])
    share = shmgrpc.Config().peer_share
    env = suite_env("auto")
    hog = child("hog", {"target": server.unix_target, "env": env, "streams": 4, "count": 16, "size": 4 * MiB})
    try:
        assert said(hog)["started"] == 4

        def hogged():  # a server of this test alone: its counters are the hog's
            now = server.stats()["shmgrpc"]
            return now if sum(now["fallbacks"].values()) > 0 else None

        held = wait_until(hogged, 20.0, interval=0.2)
        assert held, f"the hog's answers never went inline: {server.stats()['shmgrpc']}"

        other = make_client(server.unix_target, client_config("auto"))
        mine = other.stats()
        calls = 8
        for seq in range(calls):
            body = pattern(4 * MiB, seq)
            reply = other.stub.Unary(pb.Payload(seq=seq, body=body, digest=digest(body), reply_size=4 * MiB),
                                     timeout=CALL_TIMEOUT)
            assert reply.body == pattern(4 * MiB, seq)
        theirs, after = other.stats(), server.stats()["shmgrpc"]
        assert delta(theirs, mine, "offloaded", "count") == calls, theirs["fallbacks"]
        assert delta(theirs, mine, "restored", "count") == calls, ("the other client's answers went inline",
                                                                    after["fallbacks"])
        assert delta(after, held, "restored", "count") == calls
        # The hog filled its share of each (the ladder's last rung, cma,
        # names the fallback), nothing beyond it.
        assert held["fallbacks"].get("cma_peer_share_full", 0) > 0, held["fallbacks"]
        pool_, slot = held["pool"], layout.size_class(4 * MiB)
        assert pool_cap * share - slot < pool_["bytes_in_use"] <= pool_cap * share, pool_
        assert pin_cap * share - 4 * MiB < pool_["cma_pinned"] <= pin_cap * share, pool_
        assert after["pool"]["bytes_in_use"] <= pool_cap * share + slot, after["pool"]
    finally:
        if hog.poll() is None:
            go_on(hog)
        stop_process(hog)
    pool_ = wait_until(lambda: (lambda p: p if p["bytes_in_use"] == 0 and p["cma_pinned"] == 0 else None)(
        server.stats()["shmgrpc"]["pool"]), 10.0)
    assert pool_, server.stats()["shmgrpc"]["pool"]


# --- 5. a peer stopped past the lease ----------------------------------------------------------


@pytest.mark.parametrize("transport", ["auto", "shm", "cma"])
def test_a_stopped_peer_reads_data_loss_and_the_server_gets_its_memory_back(fresh_server, make_client,
                                                                            transport):
    """The server (lease 1 s) answers a server stream with six 4 MiB
    answers; the client reads the first and is stopped (SIGSTOP). Within the
    lease the server keeps the five unread ones; after it, it takes them
    back (measured: in use -> 0), and another client's answers reuse the
    memory. Resumed (SIGCONT), the client reads DATA_LOSS naming the lease
    for the first of them, never other bytes, and counts it as DataLossError."""
    lease = 1.0
    server = fresh_server(suite_env(transport, LEASE=f"{lease}s"))
    env = suite_env(transport)
    reader = child("stopped_reader", {"target": server.unix_target, "env": env, "count": 6, "size": 4 * MiB})
    try:
        assert said(reader)["read"] == 1
        os.kill(reader.pid, signal.SIGSTOP)
        stopped = time.monotonic()

        def in_use() -> int:
            pool_ = server.stats()["shmgrpc"]["pool"]
            return pool_["bytes_in_use"] + pool_["cma_pinned"]

        held = wait_until(lambda: in_use() >= 5 * 4 * MiB, 5.0)
        assert held, f"the five unread answers were expected in use: {server.stats()['shmgrpc']['pool']}"
        time.sleep(max(0.0, stopped + lease * 0.6 - time.monotonic()))
        assert in_use() >= 5 * 4 * MiB, "taken back within the lease"
        assert wait_until(lambda: in_use() == 0, lease + 3.0), server.stats()["shmgrpc"]["pool"]
        given_back = time.monotonic() - stopped
        assert given_back >= lease * 0.9, given_back
        other = make_client(server.unix_target, client_config(transport))
        for seq in range(6):  # the memory goes to other answers
            reply = other.stub.Unary(pb.Payload(seq=seq, body=b"x", reply_size=4 * MiB), timeout=CALL_TIMEOUT)
            assert reply.body == pattern(4 * MiB, seq)
        os.kill(reader.pid, signal.SIGCONT)
        out = go_on(reader)
    finally:
        if reader.poll() is None:  # a failed check above: let it finish on its own
            os.kill(reader.pid, signal.SIGCONT)
            reader.stdin.close()
            try:
                reader.wait(30)
            except subprocess.TimeoutExpired:
                pass
        stop_process(reader)
    assert out["wrong"] == [], out
    assert out["code"] == "DATA_LOSS" and "lease" in out["details"], out
    assert out["stats"]["errors"] == {"DataLossError": 1}, out["stats"]["errors"]
    assert server.stats()["echo"]["corrupt"] == 0


# --- 6. a response read after its call ended ---------------------------------------------------


def _slow_reads(monkeypatch, transport: str, seconds: float) -> None:
    """This process reads a response handle only `seconds` after it arrived
    (a reader descheduled at the wrong moment, made certain)."""
    if transport == "cma":
        real = pins.read

        def late(*args, **kwargs):
            time.sleep(seconds)
            return real(*args, **kwargs)

        monkeypatch.setattr(pins, "read", late)
    else:
        real_open = _attacher.Attacher.open

        def late_open(self, *args, **kwargs):
            time.sleep(seconds)
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(_attacher.Attacher, "open", late_open)


@pytest.mark.parametrize("transport", ["cma", "shm"])
@pytest.mark.parametrize("api", ["sync", "aio"])
def test_a_response_read_after_the_deadline_ends_the_call_deadline_exceeded(servers, make_client, monkeypatch,
                                                                            api, transport):
    """A bidi call with a 0.4 s deadline; the server answers at once, then
    sleeps past it. The client reads the answer's handle only after 0.9 s:
    by then the server's call ended with the deadline and it let go of the
    unread answer. Plain gRPC ends such a call DEADLINE_EXCEEDED; so must
    shmgrpc (not DATA_LOSS), counting no error."""
    server = servers.shared(suite_env(transport))
    before = server.stats()["shmgrpc"]
    request = pb.Payload(seq=1, body=b"q", reply_size=1 * MiB, delay=2.0)
    if api == "sync":
        client = make_client(server.unix_target, client_config(transport))
        list(client.stub.BidiStream(iter([pb.Payload(seq=1, reply_size=1 * MiB)]), timeout=CALL_TIMEOUT))
        mine = client.stats()
        _slow_reads(monkeypatch, transport, 0.9)
        with pytest.raises(grpc.RpcError) as info:
            list(client.stub.BidiStream(iter([request]), timeout=0.4))
        code, details, theirs = info.value.code(), info.value.details(), client.stats()
    else:
        async def run():
            channel = shmgrpc.aio.intercept_channel(
                grpc.aio.insecure_channel(server.unix_target, options=CHANNEL_OPTIONS),
                client_config(transport), options=CHANNEL_OPTIONS)
            stub = pb_grpc.EchoStub(channel)
            try:
                await learn_route_aio(stub)
                async for _ in stub.BidiStream(iter([pb.Payload(seq=1, reply_size=1 * MiB)]), timeout=CALL_TIMEOUT):
                    pass
                mine = channel.stats()
                _slow_reads(monkeypatch, transport, 0.9)
                try:
                    async for _ in stub.BidiStream(iter([request]), timeout=0.4):
                        pass
                except grpc.RpcError as err:
                    return err.code(), err.details(), mine, channel.stats()
                pytest.fail("the call was expected to fail")
            finally:
                await channel.close()

        code, details, mine, theirs = asyncio.run(run())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, details)
    assert details == "Deadline Exceeded", details
    assert theirs["errors"] == mine["errors"], theirs["errors"]
    after = wait_until(lambda: (lambda s: s if delta(s, before, "offloaded", "count") >= 1 else None)(
        server.stats()["shmgrpc"]), 5.0)
    assert after, "the server was expected to offload the answer"


# --- 7. a cma soak under pin pressure ----------------------------------------------------------


def test_cma_soak_under_pin_pressure_fails_nothing_plain_grpc_would_serve(fresh_server):
    """A sync and an aio server, two client processes each, all at once:
    bidi streams over cma, answered with 1-4 MiB under a 16 MiB pin budget
    on every side (messages often take the next rung: inline), a third of
    the calls cancelled after a random answer, another third with deadlines
    among the answers. Every answer right, every call ended OK, CANCELLED
    (ours) or DEADLINE_EXCEEDED (a deadline call), no error counted by any
    client; the servers live."""
    seconds = float(os.environ.get("PRESSURE_SOAK_SECONDS", "6"))
    env = suite_env("cma", CMA_MAX_PINNED="16MiB")
    servers = [fresh_server(env), fresh_server(env, flags=["--aio"])]
    procs: List[subprocess.Popen] = []
    try:
        for seed, server in enumerate(servers * 2, 1):
            procs.append(child("bidi_soak", {"target": server.unix_target, "env": env, "seconds": seconds,
                                             "seed": seed}))
        outs = [said(proc, seconds + 90) for proc in procs]
        for proc in procs:
            assert proc.wait(30) == 0, proc.stderr.read().decode()[-3000:]
    finally:
        for proc in procs:
            stop_process(proc)
    for out in outs:
        assert out["wrong"] == [], out["wrong"][:5]
        assert out["unexpected"] == [], (out["unexpected"][:5], out["outcomes"])
        assert not out["stats"]["errors"], out["stats"]["errors"]
        assert counts(out["stats"], "cma")[1] > 0, out["stats"]
    for server in servers:
        assert server.alive()
        stats = server.stats()
        assert stats["echo"]["corrupt"] == 0
        fallbacks = stats["shmgrpc"]["fallbacks"]
        assert fallbacks.get("cma_pinned_full", 0) + fallbacks.get("cma_peer_share_full", 0) > 0, fallbacks
