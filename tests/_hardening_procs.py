"""Child processes of tests/test_hardening.py.

    python -m tests._hardening_procs ROLE SPEC_JSON

Each role does one thing a hardening test needs done in a process of its
own (so that a library defect that kills a process kills this one, not
pytest), and prints one JSON object as its last stdout line. Roles that
keep running print a first JSON line when ready and stop on SIGTERM or when
stdin closes. Nothing here is a test: the test asserts on what is printed.

Imports of grpc and shmgrpc happen inside the roles: the fork role must
build nothing before it forks, and the seccomp role filters before anything
else runs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

KiB = 1024
MiB = 1024 * KiB
UNARY = "/shmgrpc.testing.v1.Echo/Unary"


def emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def own_names(shm_dir: str, pid: Optional[int] = None) -> List[str]:
    """shmgrpc names of `pid` (default: this process) in shm_dir."""
    from shmgrpc import wire

    pid = os.getpid() if pid is None else pid
    out = []
    for name in os.listdir(shm_dir):
        match = wire.NAME_RE.match(name)
        if match and int(match.group(1)) == pid:
            out.append(name)
    return sorted(out)


def data_names(shm_dir: str, pid: Optional[int] = None) -> List[str]:
    return [n for n in own_names(shm_dir, pid) if not n.endswith("-id")]


def mapped_names(pid: str = "self") -> List[str]:
    """shmgrpc names mapped in a process (its /proc/<pid>/maps)."""
    from shmgrpc import wire

    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            path = line.split(None, 5)[5].strip() if len(line.split(None, 5)) > 5 else ""
            base = os.path.basename(path.replace(" (deleted)", ""))
            if wire.NAME_RE.match(base):
                out.add(base)
    return sorted(out)


def own_mappings() -> Dict[str, int]:
    """This process's own pool and id segments as mapped here: name (a file
    name under the shm dir, or "memfd-<pid>-<n>") -> bytes mapped."""
    from shmgrpc import wire

    pid = os.getpid()
    out: Dict[str, int] = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6:
                continue
            path = parts[5].strip().replace(" (deleted)", "")
            base = os.path.basename(path)
            if path.startswith("/memfd:"):
                base = path[len("/memfd:"):]
                if not base.startswith(f"memfd-{pid}-"):
                    continue
            else:
                match = wire.NAME_RE.match(base)
                if not match or int(match.group(1)) != pid:
                    continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out[base] = out.get(base, 0) + end - start
    return out


def _channel(target: str, env: Optional[Dict[str, str]]):
    """(raw grpc channel, what the stub uses, the shmgrpc wrapper or None)."""
    import grpc

    import shmgrpc
    from tests.echo_server import GRPC_OPTIONS

    options = GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
    raw = grpc.insecure_channel(target, options=options)
    if env is None:
        return raw, raw, None
    wrapper = shmgrpc.intercept_channel(raw, shmgrpc.Config.from_env(env), options=options)
    return raw, wrapper, wrapper


def _learn(stub, wrapper) -> None:
    """What a shmgrpc channel's first large call does (tests/conftest.py
    learn_route), done before a role's own calls so that they meet a settled
    channel: one Unary call at the threshold, which carries the hello and
    goes inline; the server's welcome in its trailers gives the channel its
    route. Unary then counts as answering large, so its calls carry the
    hello. Nothing for a plain channel."""
    if wrapper is None:
        return
    from protos import echo_test_pb2 as pb

    size = max(64 * KiB, wrapper._engine.config.threshold)
    reply = stub.Unary(pb.Payload(seq=0, body=b"r" * size), timeout=30)
    assert reply.body_len_seen == size


def _learn_server_stream(stub) -> None:
    """One ServerStream call answered with a large message, inline (the
    method has not answered this channel large before): from then on the
    method's calls carry the hello, so their large answers are offloaded."""
    from protos import echo_test_pb2 as pb

    got = list(stub.ServerStream(pb.Payload(seq=1, reply_size=1 * MiB), timeout=30))
    assert len(got) == 1 and len(got[0].body) == 1 * MiB


def _error(err) -> Dict[str, str]:
    try:
        return {"code": err.code().name, "details": err.details() or ""}
    except Exception:  # not a finished call
        return {"code": type(err).__name__, "details": str(err)}


def _server_stats(target: str) -> dict:
    """The echo server's Stats, through a plain channel of our own."""
    import grpc

    from protos import echo_test_pb2 as pb
    from protos import echo_test_pb2_grpc as pb_grpc
    from tests.echo_server import GRPC_OPTIONS

    with grpc.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        return json.loads(pb_grpc.EchoStub(channel).Stats(pb.Control(), timeout=30).note)


# --- 1. truncation ----------------------------------------------------------------


def truncate_request(spec: dict) -> dict:
    """A real client offloads a request (the server maps our segment), then
    publishes a second message in a slot of that same segment, truncates the
    segment to 0 and sends the handle on a framed call. Then it calls again
    normally."""
    import grpc

    from protos import echo_test_pb2 as pb
    from protos import echo_test_pb2_grpc as pb_grpc
    from shmgrpc import wire
    from shmgrpc.transports import _pool as pool
    from tests.echo_server import digest, pattern

    shm_dir = spec["shm_dir"]
    size = spec["size"]
    raw_channel, channel, wrapper = _channel(spec["target"], spec["env"])
    stub = pb_grpc.EchoStub(channel)
    out: dict = {"pid": os.getpid()}

    def call(seq: int) -> bool:
        body = pattern(size, seq)
        reply = stub.Unary(pb.Payload(seq=seq, body=body, digest=digest(body), reply_size=16), timeout=30)
        return reply.seq == seq and reply.body_len_seen == size and reply.body == pattern(16, seq)

    _learn(stub, wrapper)
    out["first_ok"] = call(1)
    out["segments_before"] = data_names(shm_dir)
    engine = wrapper._engine
    hello, route = engine.client.call_state()
    peer = route.peer
    body = pattern(size, 2)
    data = pb.Payload(seq=2, body=body, digest=digest(body)).SerializeToString()
    slot, reason = engine.node.transports["shm"].slots.get_pool().alloc(len(data), (peer.pid, peer.start))
    assert slot is not None, reason
    slot.segment.mm[slot.offset : slot.offset + len(data)] = data
    pool.Pool.publish(slot)
    handle, ticket = slot.handle(), pool.Ticket(slot, slot.generation)
    out["forged_segment"] = handle.name
    # Any process of our uid may do this to any segment: open it by name.
    fd = os.open(os.path.join(shm_dir, handle.name), os.O_RDWR)
    os.ftruncate(fd, 0)
    os.close(fd)
    if spec.get("wait_before_send"):
        time.sleep(spec["wait_before_send"])  # past the server's trim interval
    raw = raw_channel.unary_unary(UNARY)
    started = time.monotonic()
    try:
        raw(wire.encode_shm(handle), metadata=[hello], timeout=30)
        out["truncated_call"] = {"code": "OK", "details": ""}
    except grpc.RpcError as err:
        out["truncated_call"] = _error(err)
    out["truncated_call"]["seconds"] = time.monotonic() - started
    out["after_ok"] = call(3)
    engine.release(ticket)
    out["segments_after"] = data_names(shm_dir)
    out["stats"] = wrapper.stats()
    channel.close()
    return out


def truncate_response(spec: dict) -> dict:
    """A server stream of two offloaded responses; after reading the first
    (so this process maps the server's segment) and once the server has
    published the second, truncate the server's segment and read on."""
    import grpc

    from protos import echo_test_pb2 as pb
    from protos import echo_test_pb2_grpc as pb_grpc
    from tests.echo_server import pattern

    shm_dir, server_pid, size = spec["shm_dir"], spec["server_pid"], spec["size"]
    raw_channel, channel, wrapper = _channel(spec["target"], spec["env"])
    stub = pb_grpc.EchoStub(channel)
    out: dict = {"pid": os.getpid()}
    _learn(stub, wrapper)
    _learn_server_stream(stub)

    def server_offloaded() -> int:
        return _server_stats(spec["target"])["shmgrpc"]["by_transport"]["shm"]["offloaded"]["count"]

    base = server_offloaded()
    stream = stub.ServerStream(pb.Payload(seq=2, reply_size=size, delay=spec["delay"]), timeout=30)
    first = next(stream)
    out["first_ok"] = first.body == pattern(size, 0)
    theirs = [n for n in mapped_names() if n.startswith(f"shmgrpc-{server_pid}-") and not n.endswith("-id")]
    out["mapped_before"] = theirs
    deadline = time.monotonic() + 10
    while server_offloaded() < base + 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the second response is written and published
    out["server_offloaded"] = server_offloaded() - base
    time.sleep(0.2)  # the handler has returned: the server touches nothing now
    victim = theirs[0]
    fd = os.open(os.path.join(shm_dir, victim), os.O_RDWR)
    os.ftruncate(fd, 0)
    os.close(fd)
    out["victim"] = victim
    try:
        second = next(stream)
        out["second"] = {"code": "OK", "details": "", "right": second.body == pattern(size, 1)}
    except grpc.RpcError as err:
        out["second"] = _error(err)
    out["mapped_after"] = mapped_names()
    # The server goes on: a new response, offloaded through a new segment.
    reply = stub.Unary(pb.Payload(seq=7, body=b"again", reply_size=size), timeout=30)
    out["after_ok"] = reply.body == pattern(size, 7)
    out["stats"] = wrapper.stats()
    channel.close()
    return out


# --- 2. fork ----------------------------------------------------------------------------


def _fork_worker(socket_path: str, watch: int) -> int:
    from concurrent import futures

    import shmgrpc
    from protos import echo_test_pb2_grpc as pb_grpc
    from tests.echo_server import GRPC_OPTIONS, EchoLogic, SyncEcho

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = shmgrpc.server(futures.ThreadPoolExecutor(8), options=GRPC_OPTIONS)
    pb_grpc.add_EchoServicer_to_server(SyncEcho(EchoLogic(server.shmgrpc)), server)
    if server.add_insecure_port(f"unix:{socket_path}") == 0:
        return 3
    server.start()
    emit({"worker": os.getpid(), "socket": socket_path})
    while not stop.wait(0.2):
        if os.getppid() != watch:
            break
    server.stop(1).wait()
    server.shmgrpc.close()
    return 0


def fork_workers(spec: dict) -> dict:
    """The pre-fork pattern: import shmgrpc (and, with `preuse`, build an
    engine and offload into its pool), then fork one worker per socket, each
    of which builds and runs its own shmgrpc server. On SIGTERM: stop the
    workers and report their exit statuses."""
    import shmgrpc  # imported; nothing built unless preuse
    from shmgrpc.transports import _pool as pool
    from shmgrpc import shmdir

    shm_dir = spec["shm_dir"]
    engine = None
    if spec.get("preuse"):
        from shmgrpc._core import Engine

        engine = Engine(shmgrpc.Config.from_env(spec["env"]), "client")
        assert engine.ready(), engine.status()
        me = (os.getpid(), shmdir.process_start(os.getpid()))
        slot, reason = engine.node.transports["shm"].slots.get_pool().alloc(1 * MiB, me)
        assert slot is not None, reason
        slot.segment.mm[slot.offset : slot.offset + 5] = b"hello"
        pool.Pool.publish(slot)
        if "memfd" in engine.order:  # a listening side socket and its reader thread
            side = engine.node.get_side()
            assert side is not None and side.listen()
    parent_names = own_names(shm_dir)
    sys.stdout.flush()
    me = os.getpid()
    workers = []
    for socket_path in spec["sockets"]:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _fork_worker(socket_path, me)
            except BaseException as err:  # noqa: BLE001 - reported, then the exit status says it
                sys.stderr.write(f"worker {os.getpid()}: {type(err).__name__}: {err}\n")
            finally:
                sys.stderr.flush()
                os._exit(code)
        workers.append(pid)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    emit({"parent": me, "workers": workers, "parent_names": parent_names})
    watch = spec["watch"]
    while not stop.wait(0.2):
        if os.getppid() != watch:
            break
    for pid in workers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    statuses = {}
    for pid in workers:
        _, status = os.waitpid(pid, 0)
        statuses[str(pid)] = os.waitstatus_to_exitcode(status)
    out = {"exited": statuses, "parent_names_after": own_names(shm_dir),
           "parent_data": None}
    if engine is not None:
        seg = slot.segment
        out["parent_data"] = bytes(seg.mm[slot.offset : slot.offset + 5]).decode()
        engine.close()
    return out


# --- a generic client ------------------------------------------------------------------


def client(spec: dict) -> dict:
    """Unary calls of the given sizes (after _learn, unless `learn` is
    false); with `until_offloaded`, the list is
    repeated until a call offloaded its request `settle` times in a row or
    that many seconds passed. Every call's outcome is recorded, never raised.

    deny: "both" or "writev": a seccomp filter first (tests/_seccomp.py)."""
    if spec.get("deny"):
        from tests._seccomp import deny_process_vm

        deny_process_vm(readv=spec["deny"] == "both")
    import logging

    import grpc

    from protos import echo_test_pb2 as pb
    from protos import echo_test_pb2_grpc as pb_grpc
    from tests.echo_server import digest, pattern

    records: List[dict] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append({"level": record.levelname, "message": record.getMessage()})

    logging.getLogger("shmgrpc").addHandler(Keep())
    logging.getLogger("shmgrpc").setLevel(logging.DEBUG)
    _, channel, wrapper = _channel(spec["target"], spec.get("env"))
    stub = pb_grpc.EchoStub(channel)
    if spec.get("learn", True):
        _learn(stub, wrapper)
    server_before = _server_stats(spec["target"])["shmgrpc"] if spec.get("server_stats") else None
    calls = spec["calls"]
    until = spec.get("until_offloaded")
    settle = spec.get("settle", 1)
    started = time.monotonic()
    results = []
    streak = 0
    seq = 0
    while True:
        for size, reply_size in calls:
            seq += 1
            body = pattern(size, seq)
            before = wrapper.stats()["offloaded"]["count"] if wrapper else 0
            t0 = time.monotonic()
            result = {"seq": seq, "size": size, "t": round(t0 - started, 3)}
            try:
                reply = stub.Unary(
                    pb.Payload(seq=seq, body=body, digest=digest(body), reply_size=reply_size), timeout=30
                )
                expected = pattern(reply_size, seq) if reply_size else body
                result.update(code="OK", right=reply.body == expected and reply.body_len_seen == size)
            except grpc.RpcError as err:
                result.update(_error(err))
            result["seconds"] = round(time.monotonic() - t0, 3)
            result["offloaded"] = (wrapper.stats()["offloaded"]["count"] if wrapper else 0) - before
            results.append(result)
            streak = streak + 1 if result["offloaded"] else 0
        if until is None or streak >= settle or time.monotonic() - started > until:
            break
        time.sleep(spec.get("pause", 0.2))
    out = {"pid": os.getpid(), "results": results, "stats": wrapper.stats() if wrapper else None,
           "status": None, "log": records, "server_before": server_before}
    if wrapper is not None:
        st = wrapper.status()
        out["status"] = {"transport": st.transport, "transports": list(st.transports), "reason": st.reason}
    channel.close()
    return out


# --- 4. a small /dev/shm ------------------------------------------------------------------


def small_shm(spec: dict) -> dict:
    """Run inside `unshare -m`: mount a small tmpfs, serve from it, then one
    client with one message that fills most of it, then a second client."""
    from tests.echo_server import READY

    shm_dir, sock = spec["dir"], spec["socket"]
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spec['mib']}m,mode=1777", "tmpfs", shm_dir],
                   check=True)
    env = dict(os.environ)
    env.update({"SHMGRPC_SHM_DIR": shm_dir, "SHMGRPC_TRANSPORT": "shm", "SHMGRPC_THRESHOLD": "64KiB", "SHMGRPC_CMA_THRESHOLD": "64KiB"})
    out: dict = {}

    def used() -> int:
        st = os.statvfs(shm_dir)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    log_path = os.path.join(os.path.dirname(sock), "server.log")
    with open(log_path, "w+b") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.echo_server", "--listen", f"unix:{sock}", "--parent", str(os.getpid())],
            env=env, stdout=subprocess.PIPE, stderr=log,
        )
        try:
            line = server.stdout.readline().decode()
            assert line.startswith(READY), line
            server_pid = json.loads(line[len(READY):])["pid"]
            out["server_pid"] = server_pid

            def run_client(client_spec: dict) -> dict:
                proc = subprocess.run(
                    [sys.executable, "-m", "tests._hardening_procs", "client", json.dumps(client_spec)],
                    env=env, capture_output=True, text=True, timeout=60,
                )
                lines = [x for x in proc.stdout.splitlines() if x.strip()]
                result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {}
                result["exit"] = proc.returncode
                result["stderr"] = proc.stderr[-2000:]
                return result

            client_env = {"SHMGRPC_SHM_DIR": shm_dir, "SHMGRPC_TRANSPORT": "shm", "SHMGRPC_THRESHOLD": "64KiB", "SHMGRPC_CMA_THRESHOLD": "64KiB"}
            target = f"unix:{sock}"
            out["used_at_start"] = used()
            first = run_client({"target": target, "env": client_env, "calls": [[spec["first"], 16]]})
            out["first"] = {k: first.get(k) for k in ("exit", "results", "stats", "stderr", "pid")}
            out["used_after_first"] = used()
            out["names_after_first"] = sorted(os.listdir(shm_dir))
            second = run_client({
                "target": target, "env": client_env, "calls": [[spec["second"], 16]],
                "until_offloaded": spec["until"], "settle": 2, "pause": 0.1,
            })
            out["second"] = {k: second.get(k) for k in ("exit", "results", "stats", "stderr", "pid")}
            out["used_after_second"] = used()
            out["server_stats"] = _server_stats(target)["shmgrpc"]
            out["server_alive"] = server.poll() is None
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
            try:
                out["server_exit"] = server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                out["server_exit"] = server.wait()
            log.seek(0)
            out["server_log"] = log.read().decode("utf-8", "replace")[-3000:]
    out["names_at_end"] = sorted(os.listdir(shm_dir))
    subprocess.run(["umount", shm_dir], check=False)
    return out


# --- 5. a pool owner for the race tests -------------------------------------------------


def race_writer(spec: dict) -> None:
    """Publish slots for a reader in another process: `big` slots, each in a
    segment of its own, and `small` slots packed into few segments. Prints
    {inst, big, small} (handles as hex). Then, per stdin line: "retire"
    destroys the first half of the big segments (as an owner does when it
    evicts them); EOF closes everything."""
    from shmgrpc import wire
    from shmgrpc.transports import _pool as pool
    from shmgrpc import shmdir
    from shmgrpc.transports.shm import ShmSegment
    from tests.echo_server import pattern

    shm_dir = spec["shm_dir"]
    reader = (spec["reader_pid"], shmdir.process_start(spec["reader_pid"]))
    inst = os.urandom(16)
    kinds = {"shm": ShmSegment}
    big_pool = pool.Pool(shm_dir, 256 * MiB, 128 * KiB, 3600.0, inst, kinds=kinds)
    small_pool = pool.Pool(shm_dir, 16 * MiB, 1 * MiB, 3600.0, inst, kinds=kinds)

    def publish(p: "pool.Pool", size: int, seed: int) -> str:
        data = pattern(size, seed)
        slot, reason = p.alloc(size, reader)
        assert slot is not None, reason
        slot.segment.mm[slot.offset : slot.offset + size] = data
        pool.Pool.publish(slot)
        return wire.encode_shm(slot.handle()).hex()

    big = [publish(big_pool, spec["big_size"], i) for i in range(spec["big"])]
    small = [publish(small_pool, spec["small_size"], 100_000 + i) for i in range(spec["small"])]
    emit({"pid": os.getpid(), "inst": inst.hex(), "big": big, "small": small})
    for line in sys.stdin:
        if line.strip() == "retire":
            with big_pool._lock:
                names = sorted(big_pool._segments)[: len(big_pool._segments) // 2]
                segments = [big_pool._segments.pop(n) for n in names]
            for segment in segments:
                segment.destroy()
            emit({"retired": names})
    big_pool.close()
    small_pool.close()
    emit({})


# --- 7. one pool per process --------------------------------------------------------------


def one_pool(spec: dict) -> dict:
    """Several channels in one process, all busy at once with large requests;
    a sampler records the most this process ever had mapped and on disk."""
    import grpc

    import shmgrpc
    from protos import echo_test_pb2 as pb
    from protos import echo_test_pb2_grpc as pb_grpc
    from tests.echo_server import digest, pattern

    shm_dir = spec["shm_dir"]
    channels = [_channel(t, spec["env"]) for t in spec["targets"]]
    peak = {"bytes_mapped": 0, "files": 0, "maps": 0, "segments": 0}
    names_seen = set()
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            st = shmgrpc.stats()["pool"]
            files = 0
            for name in own_names(shm_dir):
                names_seen.add(name)
                try:
                    files += os.stat(os.path.join(shm_dir, name)).st_size
                except FileNotFoundError:
                    pass
            maps = own_mappings()
            names_seen.update(maps)
            for key, value in (("bytes_mapped", st["bytes_mapped"]), ("segments", st["segments"]),
                               ("files", files), ("maps", sum(maps.values()))):
                peak[key] = max(peak[key], value)
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    errors: List[str] = []
    wrong = []

    def work(index: int, stub) -> None:
        try:
            for round_ in range(spec["rounds"]):
                sizes = spec["sizes"]
                messages = [pattern(s, index * 100 + round_ * 10 + k) for k, s in enumerate(sizes)]

                def requests():
                    for k, body in enumerate(messages):
                        yield pb.Payload(seq=k, body=body, digest=digest(body), delay=spec["delay"])

                summary = stub.ClientStream(requests(), timeout=60)
                if summary.body_len_seen != sum(sizes) or summary.seq != len(sizes):
                    wrong.append((index, round_))
                body = pattern(sizes[-1], index)
                reply = stub.Unary(pb.Payload(seq=index, body=body, digest=digest(body)), timeout=60)
                if reply.body != body:
                    wrong.append((index, round_, "unary"))
        except grpc.RpcError as err:
            errors.append(f"{index}: {_error(err)}")

    threads = [threading.Thread(target=work, args=(i, pb_grpc.EchoStub(c[1]))) for i, c in enumerate(channels)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    sampler.join(5)
    out = {
        "pid": os.getpid(),
        "peak": peak,
        "names_seen": sorted(names_seen),
        "errors": errors,
        "wrong": wrong,
        "channel_stats": [c[2].stats() for c in channels],
        "process_pool": shmgrpc.stats()["pool"],
    }
    for c in channels:
        c[1].close()
    return out


# --- 9. an owner that will be SIGKILLed ----------------------------------------------------


def doomed_owner(spec: dict) -> None:
    """An engine with an id segment and a pool segment; prints its names and
    waits to be killed."""
    import shmgrpc
    from shmgrpc import shmdir
    from shmgrpc._core import Engine

    engine = Engine(shmgrpc.Config.from_env(spec["env"]), "client")
    assert engine.ready(), engine.status()
    me = (os.getpid(), shmdir.process_start(os.getpid()))
    slot, reason = engine.node.transports["shm"].slots.get_pool().alloc(1 * MiB, me)
    assert slot is not None, reason
    emit({"pid": os.getpid(), "names": own_names(spec["shm_dir"])})
    time.sleep(600)


# --- 11. soak ------------------------------------------------------------------------------


def soak(spec: dict) -> dict:
    """Random calls of every shape for `seconds`: sizes 4 KiB..8 MiB, some
    cancelled, some with deadlines too short for them. Every answer is
    checked byte for byte; every failure must be the one its mode expects."""
    import grpc

    from protos import echo_test_pb2 as pb
    from protos import echo_test_pb2_grpc as pb_grpc
    from tests.echo_server import digest, fingerprint, pattern

    rng = random.Random(spec["seed"])
    _, channel, wrapper = _channel(spec["target"], spec["env"])
    stub = pb_grpc.EchoStub(channel)
    _learn(stub, wrapper)
    sizes = [4 * KiB, 60 * KiB, 200 * KiB, 1 * MiB, 3 * MiB, 8 * MiB]
    outcomes: Dict[str, int] = {}
    unexpected: List[str] = []
    wrong: List[str] = []
    seq = 1000 * spec["seed"]
    end = time.monotonic() + spec["seconds"]

    def message(size: int, **knobs) -> "pb.Payload":
        nonlocal seq
        seq += 1
        body = pattern(size, seq)
        return pb.Payload(seq=seq, body=body, digest=digest(body), **knobs)

    def expect(kind: str, mode: str, err: Optional[Exception], allowed) -> None:
        if err is None:
            code = "OK"
        elif isinstance(err, grpc.FutureCancelledError):
            code = "CANCELLED"
        else:
            code = err.code().name
        key = f"{kind}/{mode}/{code}"
        outcomes[key] = outcomes.get(key, 0) + 1
        if code not in allowed and len(unexpected) < 50:
            details = "" if err is None or isinstance(err, grpc.FutureCancelledError) else err.details()
            unexpected.append(f"{key}: {details}")

    def expect_cancelled(kind: str, mode: str, future, within: float) -> None:
        """Cancel `future` within `within` seconds; it must end CANCELLED."""
        time.sleep(rng.uniform(0.0, within))
        future.cancel()
        err = None
        try:
            future.result(timeout=30)
        except (grpc.RpcError, grpc.FutureCancelledError) as e:
            err = e
        expect(kind, mode, err, ("CANCELLED",))

    def check(what: str, ok: bool) -> None:
        if not ok:
            wrong.append(f"{what} seq {seq}")

    while time.monotonic() < end:
        kind = rng.choice(["unary", "server_stream", "client_stream", "bidi"])
        roll = rng.random()
        mode = "cancel" if roll < 0.08 else "deadline" if roll < 0.16 else "normal"
        size = rng.choice(sizes)
        reply = rng.choice([0, 0, 4 * KiB, 2 * MiB, 8 * MiB])
        err = None
        try:
            if kind == "unary":
                if mode == "normal":
                    m = message(size, reply_size=reply)
                    r = stub.Unary(m, timeout=30)
                    check("unary", r.body == (pattern(reply, m.seq) if reply else m.body))
                    expect(kind, mode, None, ("OK",))
                elif mode == "deadline":
                    try:
                        stub.Unary(message(size, delay=0.3, reply_size=reply), timeout=0.1)
                    except grpc.RpcError as e:
                        err = e
                    expect(kind, mode, err, ("DEADLINE_EXCEEDED",))
                else:
                    future = stub.Unary.future(message(size, delay=0.3, reply_size=reply), timeout=30)
                    expect_cancelled(kind, mode, future, 0.05)
            elif kind == "server_stream":
                # ServerStream answers `seq` times, body i = pattern(reply_size, i)
                count = rng.randint(1, 4)
                body = pattern(min(size, 64 * KiB), count)
                m = pb.Payload(seq=count, body=body, digest=digest(body), reply_size=reply or size,
                               delay=0.3 if mode != "normal" else 0.0)
                call = stub.ServerStream(m, timeout=0.15 if mode == "deadline" else 30)
                got = 0
                try:
                    for i, r in enumerate(call):
                        got += 1
                        check("server_stream", r.seq == i and r.body == pattern(m.reply_size, i))
                        if mode == "cancel":
                            call.cancel()
                    if mode == "normal":
                        check("server_stream count", got == count)
                except grpc.RpcError as e:
                    err = e
                # a call whose last answer came before the cancel or the deadline ends OK
                allowed = {"normal": ("OK",), "deadline": ("DEADLINE_EXCEEDED", "OK"),
                           "cancel": ("CANCELLED", "OK")}[mode]
                expect(kind, mode, err, allowed)
            elif kind == "client_stream":
                sent = [message(rng.choice(sizes), reply_size=reply) for _ in range(rng.randint(1, 4))]
                if mode != "normal":
                    sent[0].delay = 0.3
                if mode == "cancel":
                    future = stub.ClientStream.future(iter(sent), timeout=30)
                    expect_cancelled(kind, mode, future, 0.1)
                else:
                    try:
                        r = stub.ClientStream(iter(sent), timeout=0.1 if mode == "deadline" else 30)
                        check("client_stream", [i.data for i in r.items] == [fingerprint(x) for x in sent])
                        check("client_stream body", r.body == (pattern(reply, 0) if reply else b""))
                    except grpc.RpcError as e:
                        err = e
                    expect(kind, mode, err, ("OK",) if mode == "normal" else ("DEADLINE_EXCEEDED",))
            else:
                sent = [message(rng.choice(sizes), reply_size=reply) for _ in range(rng.randint(1, 4))]
                if mode == "deadline":
                    sent[0].delay = 0.3
                call = stub.BidiStream(iter(sent), timeout=0.1 if mode == "deadline" else 30)
                try:
                    for i, r in enumerate(call):
                        m = sent[i]
                        check("bidi", r.seq == m.seq and r.body == (pattern(reply, m.seq) if reply else m.body))
                        if mode == "cancel":
                            call.cancel()
                except grpc.RpcError as e:
                    err = e
                allowed = {"normal": ("OK",), "deadline": ("DEADLINE_EXCEEDED",), "cancel": ("CANCELLED", "OK")}[mode]
                expect(kind, mode, err, allowed)
        except grpc.RpcError as e:  # anything not caught above is unexpected
            expect(kind, mode, e, ())
    out = {"pid": os.getpid(), "outcomes": outcomes, "unexpected": unexpected, "wrong": wrong,
           "stats": wrapper.stats()}
    channel.close()
    return out


ROLES = {
    "truncate_request": truncate_request,
    "truncate_response": truncate_response,
    "fork_workers": fork_workers,
    "client": client,
    "small_shm": small_shm,
    "race_writer": race_writer,
    "one_pool": one_pool,
    "doomed_owner": doomed_owner,
    "soak": soak,
}


def run_role(roles: Dict[str, Callable[[dict], Any]], argv: Optional[List[str]] = None) -> int:
    """`python -m tests.<module> ROLE SPEC_JSON`: runs roles[ROLE](spec) and
    emits what it returns."""
    argv = sys.argv[1:] if argv is None else argv
    role, spec = argv[0], json.loads(argv[1])
    result = roles[role](spec)
    if result is not None:
        emit(result)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_role(ROLES, argv)


if __name__ == "__main__":
    sys.exit(main())
