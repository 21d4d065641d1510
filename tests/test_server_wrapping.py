"""The sync server's wrapped handler is made once per route and method and
shared by every call; a response offloaded by it is tied to its own call by
the very object the behavior returned (shmgrpc/_server.py, _pending).

Here a user's interceptor outside shmgrpc moves every behavior to a thread
of its own pool ("hop": gRPC then serializes the response in another thread
than the one that ran shmgrpc's behavior; on grpc.aio, another task) or
hands back a copy of each response ("replace"), on a sync and a grpc.aio
server. Whatever it does, every response must arrive whole
and offloaded, and the server's pool must be empty once the client has read
them: a response tied to the wrong call could be freed under its reader
(DATA_LOSS) or kept for a whole lease.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent import futures

import grpc
import pytest

import shmgrpc
from tests._wrapped_server import pattern
from tests.conftest import (
    CALL_TIMEOUT, START_TIMEOUT, STOP_TIMEOUT, client_config, read_line, shm_names, spawn, stop_process, suite_env,
)

MiB = 1024 * 1024


@pytest.fixture(params=[(kind, mode) for kind in ("sync", "aio") for mode in ("none", "hop", "replace")],
                ids=lambda p: "-".join(p))
def wrapped_server(request):
    kind, mode = request.param
    with tempfile.TemporaryDirectory(prefix="shmgrpc-wrapped-") as tmp:
        path = f"{tmp}/s.sock"
        proc = spawn([sys.executable, "-m", "tests._wrapped_server", mode, path, *(["--aio"] if kind == "aio" else [])],
                     env=suite_env("auto"),
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert read_line(proc, START_TIMEOUT).strip() == "ready"
            yield f"unix:{path}"
        finally:
            proc.stdin.close()  # the server stops and lets go of its shared memory
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                stop_process(proc)
            assert proc.returncode == 0 and shm_names(proc.pid) == [], "the server did not stop cleanly"


def _stats(channel) -> dict:
    return json.loads(channel.unary_unary("/wrapped.W/Stats")(b"", timeout=CALL_TIMEOUT))


def test_responses_of_a_shared_wrapped_handler_reach_their_own_calls(wrapped_server):
    channel = shmgrpc.intercept_channel(grpc.insecure_channel(wrapped_server), client_config("auto"))
    try:
        get = channel.unary_unary("/wrapped.W/Get")
        stream = channel.unary_stream("/wrapped.W/Stream")
        # Small requests, large answers: the first Get answers large inline
        # (no hello yet), the second carries the hello and learns the route,
        # the first Stream answers large inline; from then on both methods'
        # calls carry the hello and their answers are offloaded.
        for _ in range(2):
            assert get(str(MiB).encode(), timeout=CALL_TIMEOUT) == pattern(MiB)
        assert list(stream(str(MiB).encode(), timeout=CALL_TIMEOUT))[0] == pattern(MiB, 0)
        before = _stats(channel)["offloaded"]["count"]
        sizes = [MiB + 7 * i for i in range(12)]
        with futures.ThreadPoolExecutor(4) as pool:  # calls of several client threads at once
            got = list(pool.map(lambda n: get(str(n).encode(), timeout=CALL_TIMEOUT), sizes))
            streamed = list(pool.map(lambda n: list(stream(str(n).encode(), timeout=CALL_TIMEOUT)), sizes[:4]))
        assert [len(g) for g in got] == sizes and all(g == pattern(n) for g, n in zip(got, sizes))
        for messages, n in zip(streamed, sizes[:4]):
            assert messages == [pattern(n, seed) for seed in range(3)]
        after = _stats(channel)
        assert after["offloaded"]["count"] - before == len(sizes) + 3 * 4, after["by_transport"]
        assert channel.stats()["restored"]["count"] >= len(sizes) + 3 * 4
        deadline = time.monotonic() + 5
        while after["pool"]["bytes_in_use"] and time.monotonic() < deadline:
            time.sleep(0.1)
            after = _stats(channel)
        assert after["pool"]["bytes_in_use"] == 0, after["pool"]
    finally:
        channel.close()
