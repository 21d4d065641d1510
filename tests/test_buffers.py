"""shmgrpc.buffer_serializer / buffer_deserializer: methods whose messages
are buffers, against a real server process (tests/_buffer_peer.py).

What must hold: the bytes arrive equal in every RPC shape and API mix; what
the receiver gets from a co-located peer is a read-only view of shared
memory (it lies in a shared mapping of the receiving process), no copy; a
kept view keeps its slot (the sender reuses it for nothing else) until it is
released (release(), `with`, garbage collection, the process's exit); kept
views past the receiver's share make the sender go inline, never fail; a
forged handle still gets its status; plain gRPC peers work both ways.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List

import grpc
import pytest

import shmgrpc
import shmgrpc.aio
from shmgrpc import shmdir, wire
from shmgrpc.transports import _attacher, _layout, _pool
from shmgrpc.transports.shm import ShmSegment
from tests._buffer_peer import OPTIONS, digest, look, pattern
from tests.conftest import CALL_TIMEOUT, SHM_DIR, START_TIMEOUT, KiB, MiB, spawn, suite_env, wait_until

S, D = shmgrpc.buffer_serializer, shmgrpc.buffer_deserializer
LARGE = 1 * MiB
MIXES = ["sync-sync", "aio-aio", "sync-aio", "aio-sync"]


class Peer:
    """A _buffer_peer server process."""

    def __init__(self, tmp_path, api: str = "sync", plain: bool = False, **env: str):
        self.socket = str(tmp_path / f"buffers-{api}-{len(os.listdir(tmp_path))}.sock")
        spec = {"api": api, "socket": self.socket, "plain": plain}
        self.proc = spawn([sys.executable, "-m", "tests._buffer_peer", json.dumps(spec)], suite_env("auto", **env),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + START_TIMEOUT
        line = ""
        while not line.startswith("READY") and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
        assert line.startswith("READY"), f"buffer peer did not start ({self.proc.poll()})"
        info = json.loads(line.split(" ", 1)[1])
        self.pid, self.target = info["pid"], info["target"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


@pytest.fixture
def peers(tmp_path):
    started: List[Peer] = []

    def start(api: str = "sync", plain: bool = False, **env: str) -> Peer:
        peer = Peer(tmp_path, api, plain, **env)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        assert peer.stop() in (0, -signal.SIGKILL)


def config(transport: str = "auto", **env: str) -> shmgrpc.Config:
    return shmgrpc.Config.from_env(suite_env(transport, **env))


class SyncClient:
    def __init__(self, target: str, cfg: shmgrpc.Config, plain: bool = False):
        self.channel = grpc.insecure_channel(target, options=OPTIONS) if plain else \
            shmgrpc.insecure_channel(target, options=OPTIONS, config=cfg)
        ser, de = (None, None) if plain else (S, D)
        call = self.channel
        self.echo = call.unary_unary("/bufs.Buffers/Echo", request_serializer=ser, response_deserializer=de)
        self.look_ = call.unary_unary("/bufs.Buffers/Look", request_serializer=ser, response_deserializer=de)
        self.keep_ = call.unary_unary("/bufs.Buffers/Keep", request_serializer=ser, response_deserializer=de)
        self.drop_ = call.unary_unary("/bufs.Buffers/Drop", request_serializer=ser, response_deserializer=de)
        self.fork_ = call.unary_unary("/bufs.Buffers/Fork", request_serializer=ser, response_deserializer=de)
        self.count_ = call.unary_stream("/bufs.Buffers/Count", request_serializer=ser, response_deserializer=de)
        self.sum_ = call.stream_unary("/bufs.Buffers/Sum", request_serializer=ser, response_deserializer=de)
        self.each_ = call.stream_stream("/bufs.Buffers/Each", request_serializer=ser, response_deserializer=de)

    def run(self, name: str, *args: Any) -> Any:
        return getattr(self, name)(*args)

    def look(self, data: Any) -> Dict[str, Any]:
        return json.loads(bytes(self.look_(data, timeout=CALL_TIMEOUT)))

    def keep(self, data: Any) -> Dict[str, Any]:
        return json.loads(bytes(self.keep_(data, timeout=CALL_TIMEOUT)))

    def drop(self, how: str) -> List[bool]:
        return json.loads(bytes(self.drop_(json.dumps({"how": how}).encode(), timeout=CALL_TIMEOUT)))["same"]

    def shapes(self, size: int) -> Dict[str, Any]:
        """Each shape once with `size`-byte messages: what came back, looked at here."""
        data = [bytearray(pattern(size, i)) for i in range(3)]
        out: Dict[str, Any] = {"sent": [digest(d) for d in data]}
        out["unary"] = [look(self.echo(d, timeout=CALL_TIMEOUT)) for d in data]
        spec = json.dumps({"size": size, "count": 3}).encode()
        out["server_stream"] = [look(r) for r in self.count_(spec, timeout=CALL_TIMEOUT)]
        out["client_stream"] = json.loads(bytes(self.sum_(iter(data), timeout=CALL_TIMEOUT)))
        out["bidi"] = [look(r) for r in self.each_(iter(data), timeout=CALL_TIMEOUT)]
        return out

    def stats(self) -> Dict[str, Any]:
        return self.channel.stats()

    def close(self) -> None:
        self.channel.close()


class AioClient:
    """The same calls through shmgrpc.aio, each run in this client's own loop."""

    def __init__(self, target: str, cfg: shmgrpc.Config):
        self.target, self.cfg = target, cfg
        self.loop = asyncio.new_event_loop()
        self.channel = self._run(self._open)

    async def _open(self):
        return shmgrpc.aio.insecure_channel(self.target, options=OPTIONS, config=self.cfg)

    def _run(self, make_coroutine, *args: Any) -> Any:
        return self.loop.run_until_complete(make_coroutine(*args))

    def _mc(self, kind: str, name: str):
        return getattr(self.channel, kind)(f"/bufs.Buffers/{name}", request_serializer=S, response_deserializer=D)

    def _unary(self, name: str, data: Any, timeout: float = CALL_TIMEOUT) -> Any:
        async def call():
            return await self._mc("unary_unary", name)(data, timeout=timeout)
        return self._run(call)

    def look(self, data: Any) -> Dict[str, Any]:
        return json.loads(bytes(self._unary("Look", data)))

    def keep(self, data: Any) -> Dict[str, Any]:
        return json.loads(bytes(self._unary("Keep", data)))

    def drop(self, how: str) -> List[bool]:
        return json.loads(bytes(self._unary("Drop", json.dumps({"how": how}).encode())))["same"]

    def echo(self, data: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return self._unary("Echo", data, timeout)

    def shapes(self, size: int) -> Dict[str, Any]:
        async def run() -> Dict[str, Any]:
            data = [bytearray(pattern(size, i)) for i in range(3)]
            out: Dict[str, Any] = {"sent": [digest(d) for d in data]}
            out["unary"] = [look(await self._mc("unary_unary", "Echo")(d, timeout=CALL_TIMEOUT)) for d in data]
            spec = json.dumps({"size": size, "count": 3}).encode()
            out["server_stream"] = [look(r) async for r in self._mc("unary_stream", "Count")(spec, timeout=CALL_TIMEOUT)]
            out["client_stream"] = json.loads(bytes(await self._mc("stream_unary", "Sum")(iter(data), timeout=CALL_TIMEOUT)))
            out["bidi"] = [look(r) async for r in self._mc("stream_stream", "Each")(iter(data), timeout=CALL_TIMEOUT)]
            return out

        return self._run(run)

    def stats(self) -> Dict[str, Any]:
        return self.channel.stats()

    def close(self) -> None:
        self._run(self.channel.close)
        self.loop.close()


def client_for(api: str, target: str, cfg: shmgrpc.Config):
    return AioClient(target, cfg) if api == "aio" else SyncClient(target, cfg)


@pytest.mark.parametrize("mix", MIXES)
def test_every_shape_carries_the_bytes_and_large_ones_arrive_as_views_of_shared_memory(peers, mix):
    client_api, server_api = mix.split("-")
    peer = peers(server_api)
    client = client_for(client_api, peer.target, config())
    try:
        client.look(pattern(LARGE, 0))  # the route is learned from this call (inline)
        # Each method once with large messages: a method whose small request
        # never carried a large one carries no hello until its first large
        # answer, which comes inline (README "What travels").
        client.shapes(LARGE)
        for size in (4 * KiB, LARGE, 8 * MiB):
            out = client.shapes(size)
            sent = out["sent"]
            large = size >= LARGE
            for shape in ("unary", "server_stream", "client_stream", "bidi"):
                got = out[shape]
                if shape == "server_stream":  # the server's own pattern(size, i)
                    assert [g["digest"] for g in got] == [digest(pattern(size, i)) for i in range(3)]
                else:
                    assert [g["digest"] for g in got] == sent, (shape, size)
                assert all(g["type"] == "memoryview" and g["readonly"] for g in got), (shape, got)
                # received here (responses) or by the server (client_stream's
                # requests): a view of shared memory exactly when large
                assert [g["shared"] for g in got] == [large] * 3, (shape, size, got)
        stats = client.stats()
        assert stats["offloaded"]["count"] >= 4 * 3 * 2 and stats["restored"]["count"] >= 3 * 3 * 2, stats
        assert not stats["errors"], stats["errors"]
    finally:
        client.close()


@pytest.mark.parametrize("how", ["release", "with", "gc"])
@pytest.mark.parametrize("server_api", ["sync", "aio"])
def test_a_kept_buffer_keeps_its_slot_until_it_is_released(peers, server_api, how):
    peer = peers(server_api)
    client = SyncClient(peer.target, config())
    try:
        client.look(pattern(LARGE, 0))  # learn the route
        kept = [client.keep(pattern(LARGE, 10 + i)) for i in range(3)]
        assert all(k["shared"] for k in kept), kept
        held = client.stats()["pool"]["bytes_in_use"]
        assert held >= 3 * LARGE, client.stats()["pool"]
        # Traffic of the same size: the kept slots are the server's, never reused.
        for i in range(6):
            data = pattern(LARGE, 100 + i)
            assert digest(client.echo(data, timeout=CALL_TIMEOUT)) == digest(data)
        assert client.stats()["pool"]["bytes_in_use"] >= 3 * LARGE
        assert client.drop(how) == [True, True, True]  # every kept view still held its own bytes
        # Acknowledged now: the client's pool frees them at its next look.
        client.echo(pattern(LARGE, 200), timeout=CALL_TIMEOUT)
        assert wait_until(lambda: client.echo(b"x", timeout=CALL_TIMEOUT) is not None
                          and client.stats()["pool"]["bytes_in_use"] < 2 * LARGE, 10), client.stats()["pool"]
    finally:
        client.close()


@pytest.mark.parametrize("transport, server_api", [("memfd", "sync"), ("shm", "sync"), ("memfd", "aio")])
def test_a_forked_child_letting_go_of_inherited_views_gives_back_nothing(peers, transport, server_api, monkeypatch):
    """A server process keeps three buffers and forks; the child releases
    and collects its inherited copies of the views, and exits. The slots
    stay the parent's: still in use in the sender's pool, never reused by
    the traffic that follows, every kept view its own bytes."""
    # gRPC's fork support (on by default) restarts its threads in a child,
    # which crashes one forked mid-call now and then (plain grpcio too).
    monkeypatch.setenv("GRPC_ENABLE_FORK_SUPPORT", "0")
    peer = peers(server_api, SHMGRPC_TRANSPORT=transport)
    client = SyncClient(peer.target, config(transport=transport))
    try:
        client.look(pattern(LARGE, 0))
        assert all(client.keep(pattern(LARGE, 10 + i))["shared"] for i in range(3))
        forked = json.loads(bytes(client.fork_(b"{}", timeout=CALL_TIMEOUT)))
        assert forked == {"child": 0, "same": [True, True, True]}, forked
        for i in range(6):  # would take the slots if the child had acknowledged them
            data = pattern(LARGE, 100 + i)
            assert digest(client.echo(data, timeout=CALL_TIMEOUT)) == digest(data)
        assert client.stats()["pool"]["bytes_in_use"] >= 3 * LARGE, client.stats()["pool"]
        assert client.drop("gc") == [True, True, True]
    finally:
        client.close()


@pytest.mark.parametrize("transport", ["memfd", "shm"])
def test_kept_buffers_are_given_back_when_their_process_exits(peers, transport):
    peer = peers("sync", SHMGRPC_TRANSPORT=transport)
    client = SyncClient(peer.target, config(transport=transport))
    try:
        client.look(pattern(LARGE, 0))
        assert all(client.keep(pattern(LARGE, i))["shared"] for i in range(3))
        assert client.stats()["pool"]["bytes_in_use"] >= 3 * LARGE
        os.kill(peer.pid, signal.SIGKILL)
        peer.proc.wait(10)
        # The janitor (every 5 s) sees the reader gone: nothing stays in use.
        assert wait_until(lambda: client.stats()["pool"]["bytes_in_use"] == 0, 15), client.stats()["pool"]
    finally:
        client.close()


@pytest.mark.parametrize("transport", ["memfd", "shm"])
def test_kept_buffers_past_the_readers_share_make_the_sender_go_inline(peers, transport):
    peer = peers("sync")
    # 8 MiB of pool, half of it per reader: four 1 MiB slots at most. (Under
    # auto, cma would carry the rest: its reader keeps a copy of its own.)
    client = SyncClient(peer.target, config(transport, pool_size="8MiB", segment_size="2MiB"))
    try:
        client.look(pattern(LARGE, 0))
        kept = [client.keep(pattern(LARGE, i)) for i in range(8)]
        shared = [k["shared"] for k in kept]
        assert shared == [True] * 4 + [False] * 4, shared  # offloaded, then inline once the share is kept
        assert all(k["digest"] == digest(pattern(LARGE, i)) for i, k in enumerate(kept))
        stats = client.stats()
        assert stats["fallbacks"].get("peer_share_full", 0) >= 1, stats["fallbacks"]
        assert client.drop("release") == [True] * 8
        assert wait_until(lambda: client.keep(pattern(LARGE, 99))["shared"], 10)  # room again
    finally:
        client.close()


def test_forged_handles_on_a_buffer_method_get_their_status_fast(peers):
    peer = peers("sync")
    client = SyncClient(peer.target, config())
    try:
        client.look(pattern(LARGE, 0))
        state = client.channel._engine.client.call_state()
        assert state is not None and state[1] is not None
        hello = state[0]
        raw = grpc.insecure_channel(peer.target, options=OPTIONS)
        look_raw = raw.unary_unary("/bufs.Buffers/Look")
        forged = {
            "memfd segment never sent": (wire.encode_memfd(wire.MemfdHandle(LARGE, os.urandom(16), 1, 4096, 0, 10**6,
                                                                           wire.FLAG_HOLDS)),
                                         grpc.StatusCode.DATA_LOSS),
            "shm segment of nobody": (wire.encode_shm(wire.ShmHandle(LARGE, os.urandom(16), 1, 4096, 0,
                                                                     "shmgrpc-1-1-0123456789abcdef-1", wire.FLAG_HOLDS)),
                                      grpc.StatusCode.DATA_LOSS),
        }
        for what, (handle, code) in forged.items():
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                look_raw(handle, metadata=[hello], timeout=CALL_TIMEOUT)
            assert err.value.code() in (code, grpc.StatusCode.INVALID_ARGUMENT), (what, err.value.details())
            assert err.value.details().startswith("shmgrpc: "), err.value.details()
            assert time.monotonic() - start < 1.0, what
        raw.close()
        data = pattern(LARGE, 7)
        assert digest(client.echo(data, timeout=CALL_TIMEOUT)) == digest(data)  # still serving
    finally:
        client.close()


@pytest.mark.parametrize("server_api", ["sync", "aio"])
def test_plain_peers_work_both_ways(peers, server_api):
    # A shmgrpc client with the buffer codec, a server without shmgrpc written for bytes.
    plain_server = peers(server_api, plain=True)
    client = SyncClient(plain_server.target, config())
    try:
        data = bytearray(pattern(LARGE, 1))
        got = client.look(data)
        assert got["type"] == "bytes" and got["digest"] == digest(data)
        back = client.echo(data, timeout=CALL_TIMEOUT)
        assert isinstance(back, memoryview) and back.readonly and digest(back) == digest(data)
        assert client.stats()["offloaded"]["count"] == 0
    finally:
        client.close()
    # A plain gRPC client sending bytes, a shmgrpc server with the buffer codec.
    server = peers(server_api)
    plain = SyncClient(server.target, config(), plain=True)
    try:
        data = pattern(LARGE, 2)
        got = json.loads(plain.look_(data, timeout=CALL_TIMEOUT))
        assert got["type"] == "memoryview" and got["readonly"] and got["digest"] == digest(data)
        assert not got["shared"]
        assert plain.echo(data, timeout=CALL_TIMEOUT) == data
    finally:
        plain.close()


def test_numpy_arrays_travel_both_ways_without_a_copy_on_receipt(peers):
    numpy = pytest.importorskip("numpy")
    peer = peers("aio")
    client = SyncClient(peer.target, config())
    try:
        client.look(pattern(LARGE, 0))
        array = numpy.arange(4 * MiB // 8, dtype=numpy.float64)
        got = client.look(array)
        assert got["shared"] and got["digest"] == digest(array.tobytes())
        back = numpy.frombuffer(client.echo(array, timeout=CALL_TIMEOUT), numpy.float64)
        assert back[0] == 0 and back[-1] == array[-1] and not back.flags.writeable
        assert look(back)["shared"]  # the array lies in the shared mapping
        strided = array[::2]  # not contiguous: sent as its C-order copy
        assert digest(client.echo(strided, timeout=CALL_TIMEOUT)) == digest(strided.tobytes())
    finally:
        client.close()


def test_a_revoked_slot_is_not_handed_out_while_a_late_reader_holds_it():
    """The race the quarantine closes (transports/_pool.py), in one process
    with the real pool and a real segment: the sender revokes an unread use
    (its call ended) just as a reader marks it HELD; the slot must not be
    handed out again until that reader lets go."""
    now = [1000.0]
    inst = os.urandom(16)
    pool = _pool.Pool(SHM_DIR, 8 * MiB, 1 * MiB, 60.0, inst, clock=lambda: now[0], kinds={"shm": ShmSegment})
    try:
        me = (os.getpid(), shmdir.process_start(os.getpid()))
        slot, reason = pool.alloc(LARGE, me)
        assert slot is not None, reason
        slot.segment.mm[slot.offset : slot.offset + 4] = b"KEPT"
        pool.publish(slot)
        token, index = slot.token, slot.index
        pool.release(_pool.Ticket(slot, slot.generation))  # the call ended unread: revoked
        base = 64 + _layout.SLOT_HEADER * index
        _layout.claim(slot.segment.mm, base, token, _layout.HELD)  # a reader's HELD, racing the revocation
        now[0] += 10 * _pool.QUARANTINE_SECONDS
        others = [pool.alloc(LARGE, me)[0] for _ in range(3)]
        assert all(o is not None and (o.segment, o.index) != (slot.segment, index) for o in others), \
            "a held slot was handed out"
        assert bytes(slot.segment.mm[slot.offset : slot.offset + 4]) == b"KEPT"
        _layout.claim(slot.segment.mm, base, token, _layout.ACKED)  # the reader lets go
        for o in others:
            pool.release(_pool.Ticket(o, o.generation))
        now[0] += 10 * _pool.QUARANTINE_SECONDS
        pool.trim_idle(idle_seconds=1e9)  # a reclaim pass
        assert pool.stats().bytes_in_use == 0
    finally:
        pool.close()


class _ClosedConn:
    """A side connection as the pool sees it once closed: `process` is the
    peer's (pid, start) as Conn records it, None from another pid namespace."""

    alive = False

    def __init__(self, process):
        self.process = process


def test_slots_of_a_reader_whose_process_exited_are_free_at_once():
    """A revoked use waits out its quarantine only while its reader may still
    be writing; a reader whose process exited (a real one, killed) cannot.
    Its revoked and its HELD slots come back at the next look. A closed side
    connection whose process is alive, or cannot be seen, still waits."""
    import subprocess
    import sys

    now = [1000.0]
    # one segment of 16 slots: no alloc below needs a reclaim (that would
    # hand a freed slot out again before we look)
    pool = _pool.Pool(SHM_DIR, 32 * MiB, 16 * MiB, 60.0, os.urandom(16), clock=lambda: now[0],
                      kinds={"shm": ShmSegment})
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = (child.pid, shmdir.process_start(child.pid))
        child.kill()
        child.wait()
        me = (os.getpid(), shmdir.process_start(os.getpid()))
        readers = {"exited": dead, "exited via its connection": _ClosedConn(dead),
                   "closed, process alive": _ClosedConn(me), "closed, unseen": _ClosedConn(None)}
        slots = {}
        for name, reader in readers.items():
            for state in (None, _layout.HELD):
                slot, reason = pool.alloc(LARGE, reader)
                assert slot is not None, reason
                pool.publish(slot)
                if state is not None:  # read and kept
                    _layout.claim(slot.segment.mm, 64 + _layout.SLOT_HEADER * slot.index, slot.token, state)
                pool.release(_pool.Ticket(slot, slot.generation))  # the call ended (unread: revoked)
                slots[name, state] = slot
        busy = lambda: {k for k, s in slots.items() if (s.segment.name, s.index) in pool._busy}  # noqa: E731
        pool.reclaim()  # no time has passed: no quarantine is over
        # the exited readers' slots are free; HELD ones of a closed connection
        # whose process may live are orphaned (never handed out again)
        assert busy() == {("closed, process alive", None), ("closed, unseen", None)}
        assert sum(s.orphans for s in {s.segment for s in slots.values()}) == 2
        now[0] += 10 * _pool.QUARANTINE_SECONDS
        pool.reclaim()
        assert busy() == set()  # the quarantine is over
        assert pool.stats().bytes_in_use == 0
        orphaned = {(s.segment.name, s.index) for k, s in slots.items() if k[1] == _layout.HELD
                    and k[0].startswith("closed")}
        assert all(pool.alloc(LARGE, me)[0] is not None for _ in range(4))
        assert not orphaned & set(pool._busy), "an orphaned slot was handed out again"
    finally:
        child.kill()
        child.wait()
        pool.close()


def test_the_array_bench_measures_the_three_ways(tmp_path):
    pytest.importorskip("numpy")
    from tests.conftest import run_python

    out = tmp_path / "bufbench"
    code = ("import json, sys; from shmgrpc.tools import bufbench; "
            "bufbench.main(['--sizes', '1MiB', '--rounds', '1', '--out', sys.argv[1]]); "
            "print(json.dumps(json.load(open(sys.argv[1] + '/results.json'))))")
    results = run_python(code, str(out), timeout=120)
    cells = {c["way"]: c for c in results["cells"]}
    assert set(cells) == {"grpc-tobytes", "shmgrpc-protobuf", "shmgrpc-buffer"}
    assert cells["shmgrpc-buffer"]["server_array_in"].startswith("shared: "), cells["shmgrpc-buffer"]
    assert not cells["grpc-tobytes"]["server_array_in"].startswith("shared: ")
    assert (out / "report.txt").read_text().count("\n") >= 3


def test_a_view_let_go_while_its_attacher_is_busy_is_acknowledged_later_without_a_deadlock():
    """The last reference to a kept view may go anywhere: inside the
    attacher's own locked section of this very thread (the cyclic collector
    runs at any allocation). Its finalizer must neither block there nor lose
    the acknowledgement."""
    from shmgrpc._buffer import kept_view

    inst = os.urandom(16)
    pool = _pool.Pool(SHM_DIR, 4 * MiB, 1 * MiB, 60.0, inst, kinds={"shm": ShmSegment})
    attacher = _attacher.Attacher(SHM_DIR, 1 << 30)
    try:
        slot, reason = pool.alloc(LARGE, (os.getpid(), shmdir.process_start(os.getpid())))
        assert slot is not None, reason
        slot.segment.mm[slot.offset : slot.offset + LARGE] = pattern(LARGE, 5)
        pool.publish(slot)
        h = slot.handle()
        view, seg = attacher.open(h, inst, hold=True)
        view.release()
        kept = kept_view(seg.mm, h.offset, h.length, lambda: attacher.unhold(h, seg))
        assert digest(kept) == digest(pattern(LARGE, 5))
        state_at = 64 + _layout.SLOT_HEADER * h.slot + 8
        state = lambda: int.from_bytes(slot.segment.mm[state_at : state_at + 4], "little")  # noqa: E731
        assert state() == _layout.HELD
        with attacher._lock:  # as if the collector ran inside it
            del kept
        assert state() == _layout.HELD  # not acknowledged yet: queued
        attacher.settle()
        assert state() == _layout.ACKED
        pool.release(_pool.Ticket(slot, slot.generation))
        assert pool.stats().bytes_in_use == 0  # acknowledged: freed at once
    finally:
        attacher.close()
        pool.close()
