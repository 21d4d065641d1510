"""Child processes of tests/test_pressure.py.

    python -c "from tests._pressure_procs import main; main()" ROLE SPEC_JSON

Each role is one client process the test drives: it prints JSON lines
(the last one its result) and, where the test must act at a given moment
(stop it, let another client run), it says so on stdout and waits for a
line on stdin. Nothing here is a test: the test asserts on what is printed.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Dict, List, Optional

from tests._hardening_procs import emit, run_role

KiB = 1024
MiB = 1024 * KiB


def _channel(target: str, env: Dict[str, str]):
    """(the shmgrpc channel, its stub) with the suite's gRPC options."""
    import grpc

    import shmgrpc
    from protos import echo_test_pb2_grpc as pb_grpc
    from tests.echo_server import GRPC_OPTIONS

    options = GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
    channel = shmgrpc.intercept_channel(grpc.insecure_channel(target, options=options),
                                        shmgrpc.Config.from_env(env), options=options)
    return channel, pb_grpc.EchoStub(channel)


def _learn(stub) -> None:
    """Settle the channel's route, and make ServerStream and BidiStream
    methods that answered large (tests/conftest.py learn_route): from then on
    their calls carry the hello, so large answers are offloaded."""
    from protos import echo_test_pb2 as pb

    stub.Unary(pb.Payload(seq=0, body=b"r" * (64 * KiB)), timeout=30)
    assert len(list(stub.ServerStream(pb.Payload(seq=1, reply_size=1 * MiB), timeout=30))) == 1
    assert len(list(stub.BidiStream(iter([pb.Payload(seq=1, reply_size=1 * MiB)]), timeout=30))) == 1


def hog(spec: dict) -> dict:
    """Start `streams` server streams of `count` answers of `size` bytes and
    read none of them (the answers pile up on the server's side, offloaded
    for us); say so, wait for a line on stdin, cancel them all."""
    from protos import echo_test_pb2 as pb

    channel, stub = _channel(spec["target"], spec["env"])
    _learn(stub)
    calls = [stub.ServerStream(pb.Payload(seq=spec["count"], reply_size=spec["size"]), timeout=120)
             for _ in range(spec["streams"])]
    emit({"started": len(calls), "pid": os.getpid()})
    sys.stdin.readline()
    for call in calls:
        call.cancel()
    stats = channel.stats()
    channel.close()
    return {"stats": stats}


def stopped_reader(spec: dict) -> dict:
    """One server stream of `count` answers of `size` bytes (offloaded to
    us): read the first, say so, wait for a line on stdin (the test stops
    this process meanwhile), then read the rest: each must be the right
    bytes, or the call must fail; say how it ended."""
    import grpc

    from protos import echo_test_pb2 as pb
    from tests.echo_server import pattern

    channel, stub = _channel(spec["target"], spec["env"])
    _learn(stub)
    call = stub.ServerStream(pb.Payload(seq=spec["count"], reply_size=spec["size"]), timeout=120)
    wrong: List[int] = []
    got = 0
    first = next(call)
    got += 1
    if first.seq != 0 or first.body != pattern(spec["size"], 0):
        wrong.append(0)
    emit({"read": got, "pid": os.getpid()})
    sys.stdin.readline()
    code, details = "OK", ""
    try:
        for r in call:
            if r.seq != got or r.body != pattern(spec["size"], got):
                wrong.append(got)
            got += 1
    except grpc.RpcError as err:
        code, details = err.code().name, err.details()
    stats = channel.stats()
    channel.close()
    return {"got": got, "wrong": wrong, "code": code, "details": details, "stats": stats}


def _code(err) -> str:
    import grpc

    if err is None:
        return "OK"
    if isinstance(err, grpc.FutureCancelledError):
        return "CANCELLED"
    return err.code().name


def bidi_soak(spec: dict) -> dict:
    """Bidi streams for `seconds`, answered large (cma under a small pin
    budget on both sides), with cancels after a random number of answers
    and deadlines that fall among the answers. Every answer is checked byte
    for byte; a call may end only as plain gRPC could have ended it: OK,
    CANCELLED after our cancel, DEADLINE_EXCEEDED on a call with a
    deadline."""
    import grpc

    from protos import echo_test_pb2 as pb
    from tests.echo_server import digest, pattern

    rng = random.Random(spec["seed"])
    channel, stub = _channel(spec["target"], spec["env"])
    _learn(stub)
    # Pressure, certain from the start: a stream of 4 MiB answers read
    # slowly, so the server pins more of them for us than our share.
    slow = stub.ServerStream(pb.Payload(seq=6, reply_size=4 * MiB), timeout=30)
    got = [next(slow)]
    time.sleep(0.3)
    got += list(slow)
    assert [r.body for r in got] == [pattern(4 * MiB, i) for i in range(6)]
    sizes = spec.get("sizes", [4 * KiB, 256 * KiB, 1 * MiB, 3 * MiB])
    replies = spec.get("replies", [0, 1 * MiB, 2 * MiB, 4 * MiB])
    outcomes: Dict[str, int] = {}
    unexpected: List[str] = []
    wrong: List[str] = []
    seq = 1000 * spec["seed"]
    end = time.monotonic() + spec["seconds"]
    while time.monotonic() < end:
        roll = rng.random()
        mode = "cancel" if roll < 0.3 else "deadline" if roll < 0.6 else "normal"
        reply = rng.choice(replies)
        sent = []
        for _ in range(rng.randint(1, 6)):
            seq += 1
            body = pattern(rng.choice(sizes), seq)
            sent.append(pb.Payload(seq=seq, body=body, digest=digest(body), reply_size=reply,
                                   delay=rng.choice([0.0, 0.0, 0.01, 0.03])))
        timeout = rng.uniform(0.01, 0.15) if mode == "deadline" else 30
        cancel_after = rng.randint(0, len(sent) - 1)
        call = stub.BidiStream(iter(sent), timeout=timeout)
        err = None
        try:
            for i, r in enumerate(call):
                m = sent[i]
                if r.seq != m.seq or r.body != (pattern(reply, m.seq) if reply else m.body):
                    wrong.append(f"bidi {mode} seq {m.seq}")
                if mode == "cancel" and i >= cancel_after:
                    call.cancel()
        except grpc.RpcError as e:
            err = e
        code = _code(err)
        key = f"{mode}/{code}"
        outcomes[key] = outcomes.get(key, 0) + 1
        allowed = {"normal": ("OK",), "cancel": ("CANCELLED", "OK"), "deadline": ("DEADLINE_EXCEEDED", "OK")}[mode]
        if code not in allowed and len(unexpected) < 50:
            unexpected.append(f"{key}: {err.details() if err is not None else ''}")
    stats = channel.stats()
    channel.close()
    return {"pid": os.getpid(), "outcomes": outcomes, "unexpected": unexpected, "wrong": wrong, "stats": stats}


ROLES = {
    "hog": hog,
    "stopped_reader": stopped_reader,
    "bidi_soak": bidi_soak,
}


def main(argv: Optional[List[str]] = None) -> int:
    return run_role(ROLES, argv)


if __name__ == "__main__":
    sys.exit(main())
