"""Many calls at once: threads sharing one channel, and processes sharing one
server. Every payload is distinct and every answer is checked in full, so a
slot handed to two messages at once, or a handle read twice, shows up as
wrong bytes rather than as a number."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading

from protos import echo_test_pb2 as pb
from tests.conftest import CALL_TIMEOUT, CLIENT_SCRIPT, MiB, counts, delta, spawn, suite_env
from tests.echo_server import digest, pattern

THREADS = 8
CALLS = 20
PROCESSES = 3
PROCESS_CALLS = 8


def test_threads_share_one_channel(client, echo_server, transport):
    # The handshake first, so that the counts below are of these calls alone
    # (calls that start while another thread shakes hands wait for it).
    client.stub.Unary(pb.Payload(seq=1), timeout=CALL_TIMEOUT)
    before_all = echo_server.stats()
    before = before_all["shmgrpc"]
    failures = []
    done = [0] * THREADS
    start = threading.Barrier(THREADS)

    def worker(index: int) -> None:
        rng = random.Random(index)
        start.wait()
        for call in range(CALLS):
            seq = index * 1000 + call
            body = pattern(rng.randint(1 * MiB, 4 * MiB), seq)
            shape = rng.choice(["unary", "bidi"])
            request = pb.Payload(seq=seq, body=body, digest=digest(body))
            try:
                if shape == "unary":
                    responses = [client.stub.Unary(request, timeout=CALL_TIMEOUT)]
                else:
                    responses = list(client.stub.BidiStream(iter([request]), timeout=CALL_TIMEOUT))
            except Exception as err:  # reported below with the others
                failures.append(f"thread {index} call {call}: {err!r}")
                continue
            if [(r.seq, r.body, r.body_len_seen) for r in responses] != [(seq, body, len(body))]:
                failures.append(f"thread {index} call {call} ({shape}): wrong answer")
            else:
                done[index] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not failures, failures[:5]
    assert done == [CALLS] * THREADS
    total = THREADS * CALLS
    stats = client.stats()
    assert counts(stats, transport) == (total, total)
    assert not stats["errors"] and not stats["fallbacks"]
    after = echo_server.stats()
    assert delta(after["shmgrpc"], before, "by_transport", transport, "restored", "count") == total
    assert delta(after["shmgrpc"], before, "by_transport", transport, "offloaded", "count") == total
    assert after["echo"]["corrupt"] == before_all["echo"]["corrupt"]


def test_processes_share_one_server(echo_server, transport):
    before_all = echo_server.stats()
    before = before_all["shmgrpc"]
    env = suite_env(transport)
    procs = []
    for seed in range(PROCESSES):
        spec = {
            "target": echo_server.unix_target,
            "env": env,
            "calls": PROCESS_CALLS,
            "size": (seed + 1) * MiB,
            "reply_size": (3 - seed) * MiB,
            "seed": seed + 1,
        }
        procs.append(
            spawn(
                [sys.executable, "-c", CLIENT_SCRIPT, json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outs.append(json.loads(out.splitlines()[-1]))

    assert len({o["pid"] for o in outs}) == PROCESSES
    for out in outs:
        assert out["ok"] == PROCESS_CALLS and out["bad"] == []
        assert counts(out["stats"], transport) == (PROCESS_CALLS, PROCESS_CALLS)
        assert not out["stats"]["errors"]
    after = echo_server.stats()
    total = PROCESSES * PROCESS_CALLS
    assert delta(after["shmgrpc"], before, "by_transport", transport, "restored", "count") == total
    assert delta(after["shmgrpc"], before, "by_transport", transport, "offloaded", "count") == total
    assert after["echo"]["corrupt"] == before_all["echo"]["corrupt"]
