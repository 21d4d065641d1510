"""The benchmark's server process, and everything both bench processes share.

`python -m shmgrpc.bench` starts this module as its own process:

    python -m shmgrpc._bench_server --unix PATH --parent PID

It serves on PATH and on a free 127.0.0.1 TCP port, always as a
shmgrpc.server() (a plain client simply gets inline messages), prints one
JSON line with its addresses on stdout once it serves, and stops cleanly on
SIGTERM or SIGINT, or when the bench process dies.

Messages are `google.protobuf.wrappers_pb2.BytesValue` with generic handlers:
no generated code is needed, and every call pays real protobuf serialize and
parse costs, as a user's would.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import random
import signal
import struct
import sys
import threading
from concurrent import futures
from typing import Dict, Iterator, List, Optional, Tuple

import grpc
from google.protobuf.wrappers_pb2 import BytesValue

import shmgrpc

KiB = 1024
MiB = 1024 * KiB

# --- The service ------------------------------------------------------------

SERVICE = "shmgrpc.bench.Bench"
ECHO = f"/{SERVICE}/Echo"  # unary: the request comes back
DOWNLOAD = f"/{SERVICE}/Download"  # server streaming: `count` messages of `size`
UPLOAD = f"/{SERVICE}/Upload"  # client streaming: a small JSON summary comes back
ECHO_STREAM = f"/{SERVICE}/EchoStream"  # bidi: each message comes back
PEAK = f"/{SERVICE}/Peak"  # control: memory since the last Peak, then reset
STATS = f"/{SERVICE}/Stats"  # control: this process's shmgrpc.stats()

# gRPC caps a message at 4 MiB by default and the option is a C int, so this
# is the largest value it takes; the bench moves 256 MiB messages.
MAX_MESSAGE = 2**31 - 1
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]

# A Download request: message size, message count (little endian uint64s).
STREAM_REQUEST = struct.Struct("<QQ")

# Streaming and bidi calls run concurrently with the control calls; a handful
# of threads is plenty and keeps a 2-core machine from thrashing.
SERVER_THREADS = 8

# --- The payload ------------------------------------------------------------
#
# Tiles of one random 64 KiB block, and in the first 8 bytes of every 4 KiB
# page the page's index and the payload's size:
#
#     offset 0            8                        4096          4104
#            | page 0 | size | block[8:4096] ...  | page 1 | size | block...
#              uint32  uint32                        uint32  uint32
#
# Random tiles alone repeat every 64 KiB, so a transport that returned the
# wrong window, or the bytes of an earlier, other-sized message, could pass a
# sampled check; the stamps make every page of every payload distinct. Any
# range can be rebuilt without the whole payload, so a process can check a
# message it never held.

PAGE = 4 * KiB
_BLOCK = random.Random(0x5_4D_67).randbytes(64 * KiB)
_STAMP = struct.Struct("<II")  # page index, payload size mod 2**32

# Up to this size the client compares every byte (a memcmp: milliseconds);
# above it, samples, so that checking a 256 MiB reply does not cost as much
# as the transfer it checks.
FULL_CHECK_MAX = 16 * MiB
# Windows compared in a sampled check, besides the first and the last page.
SAMPLE_WINDOWS = 8


def pattern(size: int, start: int = 0, stop: Optional[int] = None) -> bytes:
    """Bytes [start, stop) of the payload of `size` bytes."""
    stop = size if stop is None else stop
    if not 0 <= start <= stop <= size:
        raise ValueError(f"range [{start}, {stop}) is outside a payload of {size} bytes")
    first = start - start % PAGE  # whole pages, so every stamp is written whole
    last = -(-stop // PAGE) * PAGE
    phase = first % len(_BLOCK)
    tile = _BLOCK[phase:] + _BLOCK[:phase]  # so that byte i is _BLOCK[i % 64 KiB]
    buf = bytearray(last - first)
    for offset in range(0, len(buf), len(tile)):
        buf[offset : offset + len(tile)] = tile
    del buf[last - first :]  # the last tile may overshoot the end
    for page_start in range(first, last, PAGE):
        _STAMP.pack_into(buf, page_start - first, page_start // PAGE, size & 0xFFFFFFFF)
    with memoryview(buf) as view:
        return bytes(view[start - first : stop - first])


def sample_ranges(size: int) -> List[Tuple[int, int]]:
    """The first and last page, and windows spread evenly between them.

    The windows are not page aligned, so a shift by a few bytes shows too.
    """
    ranges = {(0, min(PAGE, size)), (max(0, size - PAGE), size)}
    for k in range(1, SAMPLE_WINDOWS + 1):
        start = size * k // (SAMPLE_WINDOWS + 1)
        ranges.add((start, min(size, start + PAGE)))
    return sorted(ranges)


class PayloadCheck:
    """Decides whether received bytes are the payload of `size`.

    With `full` (the payload itself) messages up to FULL_CHECK_MAX are
    compared whole; otherwise only the length and the sample windows are.
    """

    def __init__(self, size: int, full: Optional[bytes] = None) -> None:
        self.size = size
        self._full = full if full is not None and size <= FULL_CHECK_MAX else None
        self._samples = [
            (a, b, full[a:b] if full is not None else pattern(size, a, b)) for a, b in sample_ranges(size)
        ]

    @property
    def compares_whole(self) -> bool:
        return self._full is not None

    def problem(self, got: bytes, whole: bool = True) -> Optional[str]:
        """None if `got` is right, else what is wrong; `whole=False` samples."""
        if len(got) != self.size:
            return f"got {len(got)} bytes, expected {self.size}"
        if whole and self._full is not None:
            return None if got == self._full else _first_difference(got, self._full)
        for a, b, want in self._samples:
            if got[a:b] != want:
                return f"bytes [{a}, {b}) differ from the payload"
        return None


@functools.lru_cache(maxsize=4)
def _sampled_check(size: int) -> PayloadCheck:
    """Checks are built once per size (on the warm-up), not in measured calls."""
    return PayloadCheck(size)


def _first_difference(got: bytes, want: bytes) -> str:
    step = PAGE
    for offset in range(0, len(want), step):
        if got[offset : offset + step] != want[offset : offset + step]:
            return f"content differs in bytes [{offset}, {min(len(want), offset + step)})"
    return "content differs"


# --- Memory -----------------------------------------------------------------

# Fields of /proc/self/status the bench reports, all in kB there. VmHWM is the
# peak resident set since the last reset and counts shared pages this process
# touched; RssShmem is the shared part of the current resident set.
MEMORY_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def memory_status() -> Dict[str, int]:
    """This process's MEMORY_FIELDS in bytes (those the kernel shows)."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in MEMORY_FIELDS:
                status[name] = int(value.split()[0]) * KiB
    return status


def reset_peak() -> bool:
    """Make VmHWM start again from the current RSS; False if not allowed.

    Writing "5" to clear_refs resets only the peak (proc(5)), not the pages'
    referenced bits, so it is cheap.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def shmgrpc_stats() -> dict:
    """shmgrpc.stats() of this process: every engine's counters (the bench
    runs one call at a time, so a difference belongs to that call)."""
    return shmgrpc.stats()


# --- Handlers ---------------------------------------------------------------


class _Bench:
    """The methods. Only Download keeps state: the payload it streams."""

    def __init__(self) -> None:
        # Download's payload, built on the first request for a size (the
        # warm-up call) and kept for one size only, so the server's resident
        # set does not grow with every size benchmarked.
        self._lock = threading.Lock()  # guards _payload
        self._payload: Tuple[int, bytes] = (0, b"")

    def echo(self, request: BytesValue, context) -> BytesValue:
        return request

    def download(self, request: BytesValue, context) -> Iterator[BytesValue]:
        size, count = STREAM_REQUEST.unpack(request.value)
        payload = self._payload_of(size)
        for _ in range(count):
            yield BytesValue(value=payload)

    def upload(self, requests: Iterator[BytesValue], context) -> BytesValue:
        count = total = 0
        problem = None
        for message in requests:
            count += 1
            total += len(message.value)
            problem = problem or _sampled_check(len(message.value)).problem(message.value, whole=False)
        summary = {"count": count, "bytes": total, "problem": problem}
        return BytesValue(value=json.dumps(summary).encode())

    def echo_stream(self, requests: Iterator[BytesValue], context) -> Iterator[BytesValue]:
        yield from requests

    def peak(self, request: BytesValue, context) -> BytesValue:
        status = memory_status()
        status["reset"] = reset_peak()
        return BytesValue(value=json.dumps(status).encode())

    def stats(self, request: BytesValue, context) -> BytesValue:
        return BytesValue(value=json.dumps(shmgrpc_stats(), default=str).encode())

    def _payload_of(self, size: int) -> bytes:
        with self._lock:
            if self._payload[0] != size:
                self._payload = (0, b"")  # let the old one go before building
                self._payload = (size, pattern(size))
            return self._payload[1]


def _handlers(bench: _Bench) -> grpc.GenericRpcHandler:
    io = dict(
        request_deserializer=BytesValue.FromString,
        response_serializer=BytesValue.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(bench.echo, **io),
            "Download": grpc.unary_stream_rpc_method_handler(bench.download, **io),
            "Upload": grpc.stream_unary_rpc_method_handler(bench.upload, **io),
            "EchoStream": grpc.stream_stream_rpc_method_handler(bench.echo_stream, **io),
            "Peak": grpc.unary_unary_rpc_method_handler(bench.peak, **io),
            "Stats": grpc.unary_unary_rpc_method_handler(bench.stats, **io),
        },
    )


# --- Process ----------------------------------------------------------------

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGTERM us when the bench dies, even by SIGKILL, so a
    crashed bench never leaves a server (and its shared memory) behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        sys.exit("bench server: the bench process is gone")


def serve(unix_path: str) -> None:
    # grpc.server() with shmgrpc installed innermost and told the server's
    # options (its message-size limits); the config comes from SHMGRPC_*.
    server = shmgrpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_THREADS), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((_handlers(_Bench()),))
    tcp_port = server.add_insecure_port("127.0.0.1:0")
    server.add_insecure_port(f"unix:{unix_path}")

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    try:
        ready = {"pid": os.getpid(), "tcp_port": tcp_port, "unix": unix_path}
        print(json.dumps(ready), flush=True)
        stop.wait()
    finally:
        server.stop(grace=1).wait()
        # Let go of the shared memory now rather than at exit: the library's
        # exit hook reaches only engines still alive then.
        server.shmgrpc.close()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shmgrpc._bench_server")
    parser.add_argument("--unix", required=True, help="unix socket path to listen on")
    parser.add_argument("--parent", type=int, required=True, help="pid of the bench process")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    serve(args.unix)


if __name__ == "__main__":
    main()
