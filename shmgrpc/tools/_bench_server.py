"""The benchmark's server process, and everything both bench processes share.

`python -m shmgrpc.tools.bench` starts this module as its own process:

    python -m shmgrpc.tools._bench_server --unix PATH --parent PID [--api sync|aio]

It serves on PATH and on a free 127.0.0.1 TCP port, always as a
shmgrpc.server() (a plain client simply gets inline messages), or with
`--api aio` as a shmgrpc.aio.server() with async handlers for the same
methods, prints one JSON line with its pid and addresses on stdout once it
serves, and stops cleanly on SIGTERM or SIGINT, or when the bench process
dies.

Three message shapes (MESSAGES), each with its own set of methods:

    bytes    google.protobuf.BytesValue: one bytes field
    floats   protos/bench.proto Floats: one packed `repeated float`
    records  protos/bench.proto Records: repeated {int64, string, double, bytes}

Handlers are generic (no generated service code) and every call pays real
protobuf serialize and parse costs, as a user's would. The content of every
message is a function of its shape and size, so either process can build the
expected message, or check any part of a received one, without the other.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import json
import os
import random
import signal
import struct
import sys
import threading
import time
from concurrent import futures
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional, Tuple

import grpc
from google.protobuf.wrappers_pb2 import BytesValue

import shmgrpc
import shmgrpc.aio

KiB = 1024
MiB = 1024 * KiB

# --- The service ------------------------------------------------------------

SERVICE = "shmgrpc.bench.Bench"
# Per message shape (the method name's suffix: "" for bytes, "Floats", ...):
#   Echo        unary: the request comes back
#   Download    server streaming: `count` messages of `size` (a STREAM_REQUEST)
#   Upload      client streaming: a small JSON summary comes back
#   EchoStream  bidi: each message comes back as it arrives
PEAK = f"/{SERVICE}/Peak"  # control: memory since the last Peak, then reset
STATS = f"/{SERVICE}/Stats"  # control: this process's shmgrpc.stats(), and CPU_NS
# The Stats reply's key for this process's CPU time so far (user + system,
# every thread, ns): read first thing in the handler, so the bench can take
# a snapshot's own cost off what a sample's calls cost the server.
CPU_NS = "cpu_ns"

APIS = ("sync", "aio")  # the server's flavours: grpc.server(), grpc.aio.server()


def method(name: str, message: str) -> str:
    """'/shmgrpc.bench.Bench/EchoFloats' for ('Echo', 'floats')."""
    return f"/{SERVICE}/{name}{KINDS[message].suffix}"


# gRPC caps a message at 4 MiB by default and the option is a C int, so this
# is the largest value it takes; the bench moves 256 MiB messages.
MAX_MESSAGE = 2**31 - 1
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]

# A Download request (a BytesValue's value): message size, message count
# (little endian uint64s).
STREAM_REQUEST = struct.Struct("<QQ")

# Streaming and bidi calls run concurrently with the control calls; a handful
# of threads is plenty and keeps a 2-core machine from thrashing.
SERVER_THREADS = 8

# --- The bytes payload ------------------------------------------------------
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

# Every received message is checked, whole where that can be done off the
# clock: a memcmp of its bytes, or of its serialization. A unary reply or a
# ping-pong reply is compared whole between calls, at any size. The messages
# of other streams are kept for a whole comparison after the stream ends up
# to this size; bigger ones are spot-checked as they arrive (item count and
# sample windows), since keeping them would change the memory the stream
# runs in and comparing on the clock would change its time.
STREAM_KEEP_MAX = 16 * MiB
# Windows compared in a sampled check, besides the first and the last.
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


def sample_ranges(n: int, window: int = PAGE) -> List[Tuple[int, int]]:
    """The first and last window of n items, and windows spread evenly between.

    The windows are not aligned to anything, so a shift by a few items shows too.
    """
    ranges = {(0, min(window, n)), (max(0, n - window), n)}
    for k in range(1, SAMPLE_WINDOWS + 1):
        start = n * k // (SAMPLE_WINDOWS + 1)
        ranges.add((start, min(n, start + window)))
    return sorted(ranges)


def _first_difference(got: bytes, want: bytes, what: str = "content") -> str:
    if len(got) != len(want):
        return f"{what} is {len(got)} bytes, expected {len(want)}"
    step = PAGE
    for offset in range(0, len(want), step):
        if got[offset : offset + step] != want[offset : offset + step]:
            return f"{what} differs in bytes [{offset}, {min(len(want), offset + step)})"
    return f"{what} differs"


# --- Message shapes ---------------------------------------------------------
#
# A message of shape S "of size N" is the one whose serialization is about N
# bytes: N bytes for bytes, N // 4 floats, N // 44 records (at least one
# item). Each shape says how to build it, and how to read its items for a
# check without building the whole expected message.

MESSAGES = ("bytes", "floats", "records")


def bench_pb2() -> Any:
    """protos/bench_pb2.py, generated from protos/bench.proto (`make` does it)."""
    try:
        from protos import bench_pb2 as module
    except ImportError:
        # A checkout's root, when this runs from elsewhere.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if root in sys.path or not os.path.exists(os.path.join(root, "protos", "bench.proto")):
            raise ImportError(
                "the floats and records messages need protos/bench_pb2.py, generated from "
                "protos/bench.proto: run `make protos/bench_pb2.py` in the checkout"
            ) from None
        sys.path.append(root)
        return bench_pb2()
    return module


class Kind:
    """One message shape."""

    name = ""
    suffix = ""  # of its method names
    unit = ""  # what an item is, for messages
    item_bytes = 1  # wire bytes per item
    window = PAGE  # items per sample window

    @property
    def cls(self) -> Any:
        raise NotImplementedError

    def items_for(self, size: int) -> int:
        return max(1, size // self.item_bytes)

    def build(self, n: int) -> Any:
        """The message of n items."""
        raise NotImplementedError

    def view(self, message: Any) -> Any:
        """What the items are read from: indexable, with a len()."""
        raise NotImplementedError

    def whole(self, message: Any, view: Any) -> bytes:
        """What a whole check compares: the serialization."""
        return message.SerializeToString()

    def got(self, view: Any, a: int, b: int) -> Any:
        """Items [a, b) of a received message, comparable with expected()."""
        return list(view[a:b])

    def expected(self, n: int, a: int, b: int) -> Any:
        """Items [a, b) of the message of n items."""
        raise NotImplementedError


class BytesKind(Kind):
    name, suffix, unit = "bytes", "", "bytes"

    @property
    def cls(self) -> Any:
        return BytesValue

    def build(self, n: int) -> Any:
        return BytesValue(value=pattern(n))

    def view(self, message: Any) -> bytes:
        return message.value  # upb copies the field: read it once

    def whole(self, message: Any, view: bytes) -> bytes:
        return view

    def got(self, view: bytes, a: int, b: int) -> bytes:
        return view[a:b]

    def expected(self, n: int, a: int, b: int) -> bytes:
        return pattern(n, a, b)


# The floats are the bytes payload read as float32s, with bit 6 of each
# value's top byte cleared: the exponent stays below 128, so there is no NaN
# or infinity and every value compares equal to itself.
_FINITE = bytes(b & 0xBF for b in range(256))


def _float_bytes(n: int, a: int = 0, b: Optional[int] = None) -> bytearray:
    """The little endian float32s [a, b) of the floats message of n."""
    b = n if b is None else b
    raw = bytearray(pattern(4 * n, 4 * a, 4 * b))
    raw[3::4] = raw[3::4].translate(_FINITE)
    return raw


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class FloatsKind(Kind):
    name, suffix, unit = "floats", "Floats", "floats"
    item_bytes, window = 4, 64

    @property
    def cls(self) -> Any:
        return bench_pb2().Floats

    def build(self, n: int) -> Any:
        # Field 1, length delimited (packed): parsing it is one copy, where
        # appending n Python floats would take seconds.
        return self.cls.FromString(b"\x0a" + _varint(4 * n) + _float_bytes(n))

    def view(self, message: Any) -> Any:
        return message.values

    def expected(self, n: int, a: int, b: int) -> Any:
        return list(struct.unpack(f"<{b - a}f", _float_bytes(n, a, b)))


# A record on the wire, 44 bytes: field 1 of Records (tag, length 42), then
# its id (tag, 4-byte varint), name (tag, length 16, text), value (tag,
# double) and tag (tag, length 8, bytes). No field is zero or empty, so
# protobuf serializes the parsed message back to exactly these bytes.
_RECORD = struct.Struct("<3s4s2s16scd2s8s")
RECORD_BYTES = _RECORD.size
ID_BASE = 1 << 21  # ids from 2**21 to 2**28 - 1 (past protobuf's 2 GiB) are 4-byte varints
_GOLDEN = 0x9E3779B97F4A7C15  # spreads the tags' bits
_U64 = (1 << 64) - 1


def record_fields(n: int, i: int) -> Tuple[int, str, float, bytes]:
    """(id, name, value, tag) of record i of the records message of n."""
    return (ID_BASE + i, "rec%013d" % i, i + 0.5, ((i * _GOLDEN + n) & _U64).to_bytes(8, "little"))


class RecordsKind(Kind):
    name, suffix, unit = "records", "Records", "records"
    item_bytes, window = RECORD_BYTES, 8

    @property
    def cls(self) -> Any:
        return bench_pb2().Records

    def build(self, n: int) -> Any:
        # Written as wire bytes and parsed: ~1.5x faster than add() per
        # record (0.5 s for 16 MiB here). The fields are record_fields(), inlined.
        buf = bytearray(RECORD_BYTES * n)
        pack, size = _RECORD.pack_into, RECORD_BYTES
        for i in range(n):
            v = ID_BASE + i
            varint = bytes((v & 0x7F | 0x80, v >> 7 & 0x7F | 0x80, v >> 14 & 0x7F | 0x80, v >> 21))
            tag = ((i * _GOLDEN + n) & _U64).to_bytes(8, "little")
            name = b"rec%013d" % i
            pack(buf, size * i, b"\x0a\x2a\x08", varint, b"\x12\x10", name, b"\x19", i + 0.5, b"\x22\x08", tag)
        return self.cls.FromString(bytes(buf))

    def view(self, message: Any) -> Any:
        return message.records

    def got(self, view: Any, a: int, b: int) -> Any:
        return [(r.id, r.name, r.value, r.tag) for r in view[a:b]]

    def expected(self, n: int, a: int, b: int) -> Any:
        return [record_fields(n, i) for i in range(a, b)]


KINDS: Dict[str, Kind] = {kind.name: kind for kind in (BytesKind(), FloatsKind(), RecordsKind())}


class Check:
    """Decides whether a received message is the one of n items of a shape.

    Given `whole` (the expected whole(): the payload, or the serialization),
    it compares that; otherwise, or with `whole=False`, only the item count
    and the sample windows.
    """

    def __init__(self, kind: Kind, n: int, whole: Optional[bytes] = None) -> None:
        self.kind, self.n = kind, n
        self._whole = whole
        self.whole_checks = self.spot_checks = 0  # messages checked so far, each way
        self._samples = [(a, b, kind.expected(n, a, b)) for a, b in sample_ranges(n, kind.window)]

    @property
    def compares_whole(self) -> bool:
        return self._whole is not None

    def problem(self, message: Any, whole: bool = True, view: Any = None) -> Optional[str]:
        """None if `message` is right, else what is wrong; `whole=False` samples."""
        view = self.kind.view(message) if view is None else view
        expected = self._whole if whole else None
        if expected is not None:
            self.whole_checks += 1
        else:
            self.spot_checks += 1
        if len(view) != self.n:
            return f"got {len(view)} {self.kind.unit}, expected {self.n}"
        if expected is not None:
            got = self.kind.whole(message, view)
            if got == expected:
                return None
            return _first_difference(got, expected, "the payload" if got is view else "the serialization")
        for a, b, want in self._samples:
            if self.kind.got(view, a, b) != want:
                return f"{self.kind.unit} [{a}, {b}) differ from the payload"
        return None


class Payload:
    """The message of one shape and size, built, and how to check one received."""

    def __init__(self, message: str, size: int) -> None:
        self.kind = KINDS[message]
        self.size = size
        self.n = self.kind.items_for(size)
        self.message = self.kind.build(self.n)
        self.wire_size = self.message.ByteSize()
        # What a whole check compares with: a copy of the bytes, or the serialization.
        self.check = Check(self.kind, self.n, self.kind.whole(self.message, self.kind.view(self.message)))
        # What was built is what the samples expect (the builders and the
        # item functions are written separately).
        problem = self.check.problem(self.message, whole=False)
        if problem:
            raise AssertionError(f"the {message} payload of {size} bytes is not what checks expect: {problem}")


@functools.lru_cache(maxsize=4)
def server_check(message: str, n: int) -> Check:
    """The check for a received message of n items (built on the warm-up
    call, not in measured ones); whole up to STREAM_KEEP_MAX."""
    kind = KINDS[message]
    if n * kind.item_bytes > STREAM_KEEP_MAX:
        return Check(kind, n)
    built = kind.build(n)
    return Check(kind, n, kind.whole(built, kind.view(built)))


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


def shmgrpc_stats() -> shmgrpc.StatsSnapshot:
    """shmgrpc.stats() of this process: every engine's counters (the bench
    runs one call at a time, so a difference belongs to that call)."""
    return shmgrpc.stats()


# --- Handlers ---------------------------------------------------------------


class _Bench:
    """The methods. Only Download keeps state: the message it streams."""

    def __init__(self) -> None:
        # Download's message, built on the first request for a shape and
        # size (the warm-up call) and kept for one only, so the server's
        # resident set does not grow with every size benchmarked.
        self._lock = threading.Lock()  # guards _payload
        self._payload: Tuple[Tuple[str, int], Any] = (("", 0), None)

    def echo(self, request: Any, context) -> Any:
        return request

    def download(self, message: str, request: BytesValue, context) -> Iterator[Any]:
        size, count = STREAM_REQUEST.unpack(request.value)
        payload = self._payload_of(message, size)
        for _ in range(count):
            yield payload  # serialized anew for each message, as a new one would be

    def upload(self, message: str, requests: Iterator[Any], context) -> BytesValue:
        """Checks every message: spot checks as they come, then, once the
        stream has ended, whole comparisons of those up to STREAM_KEEP_MAX
        (kept until then); the time those take is reported, for the client
        to take off its clock."""
        tally = _Tally(message)
        for request in requests:
            tally.add(request)
        return tally.summary()

    def echo_stream(self, requests: Iterator[Any], context) -> Iterator[Any]:
        yield from requests

    def peak(self, request: BytesValue, context) -> BytesValue:
        status = memory_status()
        status["reset"] = reset_peak()
        return BytesValue(value=json.dumps(status).encode())

    def stats(self, request: BytesValue, context) -> BytesValue:
        cpu_ns = time.process_time_ns()
        return BytesValue(value=json.dumps({**shmgrpc_stats(), CPU_NS: cpu_ns}, default=str).encode())

    def _payload_of(self, message: str, size: int) -> Any:
        with self._lock:
            if self._payload[0] != (message, size):
                self._payload = (("", 0), None)  # let the old one go before building
                kind = KINDS[message]
                self._payload = ((message, size), kind.build(kind.items_for(size)))
            return self._payload[1]


class _Tally:
    """An upload's checks, message by message, and the summary it replies."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.count = self.items = 0
        self.problem: Optional[str] = None
        self.kept: List[Tuple[Check, Any, Any]] = []

    def add(self, request: Any) -> None:
        self.count += 1
        view = KINDS[self.message].view(request)
        self.items += len(view)
        check = server_check(self.message, len(view))
        if check.compares_whole:
            self.kept.append((check, request, view))
        elif self.problem is None:
            self.problem = check.problem(request, whole=False, view=view)

    def summary(self) -> BytesValue:
        start = time.perf_counter_ns()
        for check, request, view in self.kept:
            self.problem = self.problem or check.problem(request, view=view)
        check_ns = time.perf_counter_ns() - start if self.kept else 0
        summary = {
            "count": self.count,
            "items": self.items,
            "problem": self.problem,
            "check_ns": check_ns,
            "checked_whole": len(self.kept),
            "checked_sampled": self.count - len(self.kept),
        }
        self.kept.clear()
        return BytesValue(value=json.dumps(summary).encode())


class _AioBench:
    """The same methods as async handlers, for a grpc.aio server."""

    def __init__(self) -> None:
        self._sync = _Bench()

    async def echo(self, request: Any, context) -> Any:
        return request

    async def download(self, message: str, request: BytesValue, context) -> AsyncIterator[Any]:
        for payload in self._sync.download(message, request, context):
            yield payload

    async def upload(self, message: str, requests: AsyncIterator[Any], context) -> BytesValue:
        tally = _Tally(message)
        async for request in requests:
            tally.add(request)
        return tally.summary()

    async def echo_stream(self, requests: AsyncIterator[Any], context) -> AsyncIterator[Any]:
        async for request in requests:
            yield request

    async def peak(self, request: BytesValue, context) -> BytesValue:
        return self._sync.peak(request, context)

    async def stats(self, request: BytesValue, context) -> BytesValue:
        return self._sync.stats(request, context)


def _handlers(bench: Any) -> grpc.GenericRpcHandler:
    control: Dict[str, Any] = dict(request_deserializer=BytesValue.FromString,
                                   response_serializer=BytesValue.SerializeToString)
    methods: Dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Peak": grpc.unary_unary_rpc_method_handler(bench.peak, **control),
        "Stats": grpc.unary_unary_rpc_method_handler(bench.stats, **control),
    }
    for message, kind in KINDS.items():
        try:
            cls = kind.cls
        except ImportError:  # protos/bench_pb2.py not generated: bytes only
            continue
        io: Dict[str, Any] = dict(request_deserializer=cls.FromString, response_serializer=cls.SerializeToString)
        methods.update(
            {
                f"Echo{kind.suffix}": grpc.unary_unary_rpc_method_handler(bench.echo, **io),
                f"Download{kind.suffix}": grpc.unary_stream_rpc_method_handler(
                    functools.partial(bench.download, message),
                    request_deserializer=BytesValue.FromString,
                    response_serializer=cls.SerializeToString,
                ),
                f"Upload{kind.suffix}": grpc.stream_unary_rpc_method_handler(
                    functools.partial(bench.upload, message),
                    request_deserializer=cls.FromString,
                    response_serializer=BytesValue.SerializeToString,
                ),
                f"EchoStream{kind.suffix}": grpc.stream_stream_rpc_method_handler(bench.echo_stream, **io),
            }
        )
    return grpc.method_handlers_generic_handler(SERVICE, methods)


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
        _ready(tcp_port, unix_path)
        stop.wait()
    finally:
        server.stop(grace=1).wait()
        # Let go of the shared memory now rather than at exit: the library's
        # exit hook reaches only engines still alive then.
        server.shmgrpc.close()


async def serve_aio(unix_path: str) -> None:
    """serve(), as a grpc.aio server: every handler runs on one event loop."""
    server = shmgrpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((_handlers(_AioBench()),))
    tcp_port = server.add_insecure_port("127.0.0.1:0")
    server.add_insecure_port(f"unix:{unix_path}")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    try:
        _ready(tcp_port, unix_path)
        await stop.wait()
    finally:
        await server.stop(1)
        server.shmgrpc.close()


def _ready(tcp_port: int, unix_path: str) -> None:
    print(json.dumps({"pid": os.getpid(), "tcp_port": tcp_port, "unix": unix_path}), flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shmgrpc.tools._bench_server")
    parser.add_argument("--unix", required=True, help="unix socket path to listen on")
    parser.add_argument("--parent", type=int, required=True, help="pid of the bench process")
    parser.add_argument("--api", choices=APIS, default="sync", help="grpc.server() or grpc.aio.server()")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    if args.api == "aio":
        asyncio.run(serve_aio(args.unix))
    else:
        serve(args.unix)


if __name__ == "__main__":
    main()
