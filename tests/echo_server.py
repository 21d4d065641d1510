"""The test suite's server process: the Echo service of protos/echo_test.proto.

    python -m tests.echo_server --listen unix:/path/to/sock --listen 127.0.0.1:0

Serves on every --listen address (a unix socket, or host:port where port 0
picks a free one) through shmgrpc.server() (its ServerInterceptor built from
the SHMGRPC_* environment and told GRPC_OPTIONS), or with no interceptor at
all under --plain (--aio: grpc.aio; --non-dumpable: no process without
CAP_SYS_PTRACE may read it, as cma's reader). Once it serves it
prints one line, READY followed by JSON:

    {"pid": 123, "addresses": ["unix:/path/to/sock", "127.0.0.1:40123"], "offload": true}

and it stops gracefully on SIGTERM or SIGINT (or when the --parent process is
gone): server.stop(), interceptor.close(), exit status 0, so whatever the
interceptor created in /dev/shm is unlinked by its owner.

What the handlers do (the Payload knobs are documented in the .proto):

    Unary         checks the request, sleeps `delay`, answers it (see reply()).
    ServerStream  answers the request `seq` times, with seq 0, 1, ...;
                  sleeps `delay` before every answer but the first.
    ClientStream  checks every request and sleeps that request's `delay`
                  before pulling the next one; answers with a summary():
                  seq = message count, body_len_seen = total body bytes, and
                  one `items` entry per request: data = SHA-256 of the
                  request's deterministic serialization, numbers = [seq, body
                  length]. The first request's `reply_size` sizes the body.
    BidiStream    checks each request, answers it, sleeps its `delay` before
                  pulling the next one.
    Stats         this process's counters as JSON in `note` (see stats()).

"Checks" means: when `digest` is set, it must be the SHA-256 of `body`. A
mismatch means the transport delivered wrong bytes, which must never happen;
the call fails with OUT_OF_RANGE ("echo_server: corrupt ...") and the
`corrupt` counter goes up, so a test can tell it from shmgrpc's own errors.

The service logic lives in EchoLogic, apart from the sync servicer, so that
an asyncio flavour of this server only has to add its own servicer and
serve function (see SERVE at the bottom).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import random
import signal
import struct
import sys
import threading
import time
from concurrent import futures
from typing import Callable, Dict, List, Optional

import grpc

import shmgrpc
from protos import echo_test_pb2 as pb
from protos import echo_test_pb2_grpc as pb_grpc

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

READY = "echo-server ready "  # the fixture waits for a stdout line starting with this

# gRPC refuses messages over 4 MiB by default; with offload off (the
# fallback tests) large messages travel inline and need room.
MAX_MESSAGE = 1 * GiB
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # gRPC turns SO_REUSEPORT on by default on Linux: a second server could
    # then share a busy port silently instead of failing.
    ("grpc.so_reuseport", 0),
]
# Each streaming call holds a thread for its whole life; the concurrency
# tests run 8 client threads plus a few client processes at once.
SERVER_THREADS = 32
STOP_GRACE = 2.0  # seconds in-flight calls get after SIGTERM

# --- payloads ----------------------------------------------------------------
#
# pattern(size, seed): bytes a test and the server can both produce without
# sending them. One random 1 MiB block, rotated by the seed, tiled, with
# (seed, size, offset) stamped every 64 KiB: messages of other seeds or sizes,
# and windows shifted by any amount, never compare equal.

_BLOCK = random.Random(0x5EED).randbytes(1 * MiB)
_STAMP = struct.Struct("<IQI")  # seed, size, offset of the stamp
_STAMP_EVERY = 64 * KiB


def pattern(size: int, seed: int = 0) -> bytes:
    shift = (seed * 7919) % len(_BLOCK)
    tile = _BLOCK[shift:] + _BLOCK[:shift]
    buf = bytearray(tile * (size // len(tile) + 1))
    del buf[size:]
    for offset in range(0, size - _STAMP.size + 1, _STAMP_EVERY):
        _STAMP.pack_into(buf, offset, seed & 0xFFFFFFFF, size, offset)
    return bytes(buf)


def digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def fingerprint(message: pb.Payload) -> bytes:
    """What ClientStream reports for each request it saw."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).digest()


# --- the service, whatever the server flavour --------------------------------


class Corrupt(Exception):
    """A request's body does not match its digest."""


class EchoLogic:
    """Counters and the per-message work every handler shares."""

    def __init__(self, interceptor=None):
        self.interceptor = interceptor
        self.pid = os.getpid()
        self._lock = threading.Lock()  # protects everything below
        self._counts: Dict[str, int] = {"calls": 0, "messages": 0, "checked": 0, "corrupt": 0}
        self._failures: List[Dict[str, str]] = []  # calls that ended with an error, latest last
        self._peak: Dict[str, int] = {}  # highest pool numbers seen while streaming

    def call(self) -> None:
        with self._lock:
            self._counts["calls"] += 1

    def check(self, request: pb.Payload) -> None:
        """Raise Corrupt if the request carries a digest its body does not match."""
        with self._lock:
            self._counts["messages"] += 1
        if not request.digest:
            return
        good = digest(request.body) == request.digest
        with self._lock:
            self._counts["checked"] += 1
            if not good:
                self._counts["corrupt"] += 1
        if not good:
            raise Corrupt(
                f"echo_server: corrupt body in message seq {request.seq} ({len(request.body)} bytes)"
            )

    def reply(self, request: pb.Payload, seq: Optional[int] = None) -> pb.Payload:
        """The request with the server's fields filled in, and its body
        replaced by pattern(reply_size, seq) when reply_size is set."""
        response = pb.Payload()
        response.CopyFrom(request)
        response.server_pid = self.pid
        response.body_len_seen = len(request.body)
        if seq is not None:
            response.seq = seq
        if request.reply_size:
            response.body = pattern(request.reply_size, response.seq)
            response.digest = digest(response.body)
        return response

    def summary(self, seen: List[pb.Payload]) -> pb.Payload:
        response = pb.Payload(seq=len(seen), server_pid=self.pid)
        response.body_len_seen = sum(len(m.body) for m in seen)
        for message in seen:
            response.items.add(data=fingerprint(message), numbers=[message.seq, len(message.body)])
        if seen and seen[0].reply_size:
            response.body = pattern(seen[0].reply_size, 0)
            response.digest = digest(response.body)
        return response

    def observe_pool(self) -> None:
        """Remember the highest pool numbers seen (the pool may never exceed
        its capacity, however a stream goes)."""
        pool = shmgrpc.stats()["pool"]
        with self._lock:
            for key, value in pool.items():
                self._peak[key] = max(self._peak.get(key, 0), value)

    def failed(self, method: str, context, err: BaseException) -> None:
        try:
            code = context.code()
            details = context.details()
        except Exception:  # an older grpc without ServicerContext.code()
            code, details = None, None
        if isinstance(details, bytes):
            details = details.decode("utf-8", "replace")
        with self._lock:
            self._failures.append(
                {
                    "method": method,
                    "code": code.name if code is not None else None,
                    "details": details or "",
                    "exception": f"{type(err).__name__}: {err}",
                }
            )
            del self._failures[:-50]

    def stats(self) -> Dict:
        with self._lock:
            echo = dict(self._counts, failures=list(self._failures), peak_pool=dict(self._peak))
        return {
            "pid": self.pid,
            "shmgrpc": shmgrpc.stats(),
            "interceptor": self.interceptor.stats() if self.interceptor is not None else None,
            # server.shmgrpc.status(): a PeerStatus per client route, in words
            "peer_status": [str(p) for p in self.interceptor.status()] if self.interceptor is not None else None,
            "echo": echo,
        }


def _sleep(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


class SyncEcho(pb_grpc.EchoServicer):
    """The sync servicer: EchoLogic plus grpc's blocking handler shapes."""

    def __init__(self, logic: EchoLogic):
        self.logic = logic

    def _guard(self, method: str, context, body: Callable):
        self.logic.call()
        try:
            return body()
        except Corrupt as err:
            self.logic.failed(method, context, err)
            context.abort(grpc.StatusCode.OUT_OF_RANGE, str(err))
        except BaseException as err:
            self.logic.failed(method, context, err)
            raise

    def Unary(self, request, context):
        def body():
            self.logic.check(request)
            _sleep(request.delay)
            return self.logic.reply(request)

        return self._guard("Unary", context, body)

    def ServerStream(self, request, context):
        self.logic.call()
        try:
            self.logic.check(request)
            for i in range(request.seq):
                if i:
                    _sleep(request.delay)
                yield self.logic.reply(request, seq=i)
        except Corrupt as err:
            self.logic.failed("ServerStream", context, err)
            context.abort(grpc.StatusCode.OUT_OF_RANGE, str(err))
        except BaseException as err:
            self.logic.failed("ServerStream", context, err)
            raise

    def ClientStream(self, request_iterator, context):
        def body():
            seen = []
            for request in request_iterator:
                self.logic.check(request)
                seen.append(request)
                self.logic.observe_pool()
                _sleep(request.delay)
            return self.logic.summary(seen)

        return self._guard("ClientStream", context, body)

    def BidiStream(self, request_iterator, context):
        self.logic.call()
        try:
            for request in request_iterator:
                self.logic.check(request)
                yield self.logic.reply(request)
                self.logic.observe_pool()
                _sleep(request.delay)
        except Corrupt as err:
            self.logic.failed("BidiStream", context, err)
            context.abort(grpc.StatusCode.OUT_OF_RANGE, str(err))
        except BaseException as err:
            self.logic.failed("BidiStream", context, err)
            raise

    def Stats(self, request, context):
        return pb.Payload(note=json.dumps(self.logic.stats()), server_pid=self.logic.pid)


# --- serving -----------------------------------------------------------------


def _bind(server, address: str) -> str:
    """Add one listening address; returns it with the real port."""
    port = server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"echo_server: cannot listen on {address}")
    if address.startswith("unix:"):
        return address
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"


def _watch_parent(parent: int, stop: threading.Event) -> None:
    """Stop when the test run that started us is gone (it was killed)."""
    while not stop.wait(0.5):
        if os.getppid() != parent:
            stop.set()


def serve_sync(args, stop: threading.Event, ready: Callable[[List[str], bool], None]) -> None:
    executor = futures.ThreadPoolExecutor(max_workers=SERVER_THREADS, thread_name_prefix="echo")
    if args.plain:
        server, interceptor = grpc.server(executor, options=GRPC_OPTIONS), None
    else:
        # shmgrpc.server() installs its ServerInterceptor innermost and tells
        # it the server's options (the raised message-size limits).
        server = shmgrpc.server(executor, options=GRPC_OPTIONS)
        interceptor = server.shmgrpc
    pb_grpc.add_EchoServicer_to_server(SyncEcho(EchoLogic(interceptor)), server)
    try:
        addresses = [_bind(server, address) for address in args.listen]
        server.start()
        ready(addresses, interceptor is not None)
        while not stop.wait(1.0):  # a timed wait: signal handlers run in between
            pass
        server.stop(STOP_GRACE).wait()
    finally:
        if interceptor is not None:
            interceptor.close()


# Server flavours by name. An asyncio flavour adds its own entry (and an
# option to pick it) and reuses EchoLogic for everything but the handler shapes.
SERVE = {"sync": serve_sync}


# --- the asyncio flavour (--aio) ---------------------------------------------


async def _asleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


class AioEcho(pb_grpc.EchoServicer):
    """The grpc.aio servicer: EchoLogic plus coroutine and async-generator
    handler shapes (what SyncEcho does, awaiting instead of blocking)."""

    def __init__(self, logic: EchoLogic):
        self.logic = logic

    async def Unary(self, request, context):
        self.logic.call()
        try:
            self.logic.check(request)
            await _asleep(request.delay)
            return self.logic.reply(request)
        except Corrupt as err:
            self.logic.failed("Unary", context, err)
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(err))
        except BaseException as err:
            self.logic.failed("Unary", context, err)
            raise

    async def ServerStream(self, request, context):
        self.logic.call()
        try:
            self.logic.check(request)
            for i in range(request.seq):
                if i:
                    await _asleep(request.delay)
                yield self.logic.reply(request, seq=i)
        except Corrupt as err:
            self.logic.failed("ServerStream", context, err)
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(err))
        except BaseException as err:
            self.logic.failed("ServerStream", context, err)
            raise

    async def ClientStream(self, request_iterator, context):
        self.logic.call()
        try:
            seen = []
            async for request in request_iterator:
                self.logic.check(request)
                seen.append(request)
                self.logic.observe_pool()
                await _asleep(request.delay)
            return self.logic.summary(seen)
        except Corrupt as err:
            self.logic.failed("ClientStream", context, err)
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(err))
        except BaseException as err:
            self.logic.failed("ClientStream", context, err)
            raise

    async def BidiStream(self, request_iterator, context):
        self.logic.call()
        try:
            async for request in request_iterator:
                self.logic.check(request)
                yield self.logic.reply(request)
                self.logic.observe_pool()
                await _asleep(request.delay)
        except Corrupt as err:
            self.logic.failed("BidiStream", context, err)
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(err))
        except BaseException as err:
            self.logic.failed("BidiStream", context, err)
            raise

    async def Stats(self, request, context):
        return pb.Payload(note=json.dumps(self.logic.stats()), server_pid=self.logic.pid)


def serve_aio(args, stop: threading.Event, ready: Callable[[List[str], bool], None]) -> None:
    asyncio.run(_serve_aio(args, stop, ready))


async def _serve_aio(args, stop: threading.Event, ready: Callable[[List[str], bool], None]) -> None:
    import shmgrpc.aio

    if args.plain:
        server, interceptor = grpc.aio.server(options=GRPC_OPTIONS), None
    else:
        # shmgrpc.aio.server() installs its ServerInterceptor innermost and
        # tells it the server's options (the raised message-size limits).
        server = shmgrpc.aio.server(options=GRPC_OPTIONS)
        interceptor = server.shmgrpc
    pb_grpc.add_EchoServicer_to_server(AioEcho(EchoLogic(interceptor)), server)
    try:
        addresses = [_bind(server, address) for address in args.listen]
        await server.start()
        ready(addresses, interceptor is not None)
        while not stop.is_set():  # set by the signal handlers (and the parent watch)
            await asyncio.sleep(0.2)
        await server.stop(STOP_GRACE)
    finally:
        if interceptor is not None:
            interceptor.close()


SERVE["aio"] = serve_aio


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.echo_server", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", action="append", required=True, help="unix:PATH or HOST:PORT; repeatable")
    parser.add_argument("--plain", action="store_true", help="serve without shmgrpc's interceptor")
    parser.add_argument("--parent", type=int, default=0, help="stop when this pid is no longer our parent")
    parser.add_argument(
        "--aio", action="store_true", help="serve with grpc.aio (shmgrpc.aio.ServerInterceptor)"
    )
    parser.add_argument(
        "--non-dumpable", action="store_true",
        help="prctl(PR_SET_DUMPABLE, 0) first: a process without CAP_SYS_PTRACE may not read this one (cma)",
    )
    args = parser.parse_args(argv)
    if args.non_dumpable:
        import ctypes

        PR_SET_DUMPABLE = 4  # <linux/prctl.h>
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise SystemExit(f"echo_server: prctl(PR_SET_DUMPABLE, 0) failed: errno {ctypes.get_errno()}")
    # Like any real server: shmgrpc's logger has only a NullHandler, so its
    # warnings reach stderr (the test's server.log()) only through a handler
    # the program installs.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:%(name)s:%(message)s")

    stop = threading.Event()
    # Before serving: a SIGTERM that arrives during start-up still stops us cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.parent:
        threading.Thread(target=_watch_parent, args=(args.parent, stop), daemon=True).start()

    def ready(addresses: List[str], offload: bool) -> None:
        line = {"pid": os.getpid(), "addresses": addresses, "offload": offload}
        print(READY + json.dumps(line), flush=True)

    SERVE["aio" if args.aio else "sync"](args, stop, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
