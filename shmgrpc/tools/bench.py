"""How much faster shmgrpc makes large messages, measured: `python -m shmgrpc.tools.bench`.

A server process (shmgrpc.tools._bench_server, always a shmgrpc.server() or
shmgrpc.aio.server(): a plain client simply gets inline messages) and this
client, on the same host. Each *mode* is a way for the client to reach it,
over a channel of its own:

    grpc-tcp    plain gRPC over 127.0.0.1 TCP
    grpc-unix   plain gRPC over a unix socket (the baseline)
    memfd       shmgrpc.intercept_channel, transport=memfd, over the unix socket
    shm         shmgrpc.intercept_channel, transport=shm, over the unix socket
    cma         shmgrpc.intercept_channel, transport=cma, over the unix socket
    grpc-unix-md
                plain gRPC over the unix socket, every call carrying one
                metadata element as long as shmgrpc's hello (not run unless
                named in --modes)

Each *api* (--apis) is the gRPC API of each side, client - server:

    sync        grpc on both sides (grpc.insecure_channel, grpc.server)
    aio         grpc.aio on both sides (grpc.aio.insecure_channel and
                shmgrpc.aio.intercept_channel, shmgrpc.aio.server with async
                handlers), the client's calls awaited on one event loop
    aio-sync    an aio client, a sync server
    sync-aio    a sync client, an aio server

Every mode runs in every api; a sync and an aio server run side by side as
needed (one process each). The default is all four apis; `make bench`
passes BENCH_APIS (sync: the README's tables) to keep within its time, and
`make bench BENCH_APIS=sync,aio` (or `python -m shmgrpc.tools.bench --apis
sync,aio ...`) measures grpc.aio beside it, at about twice the time.

Beside each time, the CPU time it took (user + system, every thread of
the process, gRPC's own included), per call or per message: the client's
(time.process_time_ns over the same stretches the clock runs), the
server's (its process CPU time in the Stats reply the bench takes after
every sample, less what one such snapshot costs it, measured at the start
with nothing between snapshots, and less the comparisons of an upload),
their sum, and the sum against grpc-unix's of the same api.

Messages below shmgrpc's threshold (128 KiB unless SHMGRPC_THRESHOLD says
otherwise) travel inline in every mode, so at 4 KiB the shmgrpc rows
measure what merely having shmgrpc on the channel costs; grpc-unix-md shows
how much of that gRPC itself charges for the hello every call carries.

Each *message* shape (--messages) is what a message holds, sized so that its
serialization is about the target size:

    bytes    one bytes field (google.protobuf.BytesValue)
    floats   one packed `repeated float` (protos/bench.proto): size / 4 floats
    records  repeated {int64 id, string name (16 chars), double value,
             bytes tag (8)} (protos/bench.proto): size / 44 records, where
             protobuf's own per-field parse and serialize work dominates

Each RPC *shape* (--shapes) is a call pattern: unary (echo: the payload goes
and comes back), server_stream (download), client_stream (upload), pingpong
(a bidi stream where the client sends one message and waits for it to come
back before sending the next) and bidi (a bidi echo stream the client feeds
as fast as gRPC takes it, so messages overlap; not run by default). A stream
sends one prebuilt message `count` times (each serialized anew): about
--stream-bytes a stream, between 2 and 64 messages. Stream times are per
message.

Each *malloc* phase (--malloc) runs everything, both processes and every
mode, plain gRPC included, with glibc's default malloc, with
SHMGRPC_MALLOC=keep (freed memory kept warm; see shmgrpc.tune_malloc), or
with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 ("hugepages": glibc asks for
transparent huge pages on what it maps, so a fresh buffer faults 2 MiB at a
time; freed memory still goes back to the kernel). `make bench` runs all
three. Since the keep settings must be made before any thread starts, and
GLIBC_TUNABLES is read when a process starts, each phase is then a process
of its own:
this one runs `python -m shmgrpc.tools.bench ... --malloc PHASE --out OUT/PHASE`
once per phase, then prints a combined table whose speedups are against
plain gRPC over unix with the default malloc (what an application has
unless it opts in) and, in brackets, against plain gRPC over unix with the
same malloc.

Method: for each message, size and shape, one warm-up call per api and
mode (connections, handshakes and pool growth are not measured), then
`--repeat` rounds, each running every api and mode once with the order
rotated round by round; the statistic is the median. Messages of 64 KiB
and less get four times the rounds, each unary sample a batch four times
smaller: their cells measure a few percent, which five short samples on a
busy machine cannot.
Beside each size, the in-process *floor*: protobuf serialize, one copy
into a pre-faulted shared mapping, parse from it; that is what a
shared-memory transport cannot avoid. It takes a turn in every round too. After each size's rounds, one more unary
echo per mode measures both processes' peak memory.

Every message that comes back, or that the server receives in an upload,
is checked, off the clock wherever that is exact. Unary and ping-pong
replies are compared whole (the bytes, or the serialization) between calls
or turns, each call or turn being timed alone. Other streams keep their
messages up to 16 MiB and compare them whole once the stream has ended (in
an upload the server reports the time its comparisons took, for the client
to take off). Bigger stream messages are spot-checked as they arrive, on
the clock: item count and ten windows of items, enough to catch a wrong,
shifted, stale or truncated message in microseconds, except that reading a
bytes field copies it, as an application reading it would.

The default plan, sized so that `make bench` (three malloc phases, sync
api only) stays within about 15 minutes on a 2-core VM: ~4-5 minutes for
the default phase and ~3-4 for each of the others on a quiet machine; each
further api adds as much again.

    message   unary (K = KiB, M = MiB)         streams (the other shapes)
    bytes     4K 64K 256K 1M 4M 16M 64M 256M   64K 256K 1M 4M 16M 64M
    floats    4K 1M 16M 64M                    16M
    records   4K 1M 16M                        1M

256 MiB (seconds per call with plain gRPC and the default malloc: ~100 s
of a phase) is run for unary bytes only: other shapes and messages show
nothing there that 64 MiB does not. floats and records run their streams
at one size each: floats where the transport matters (16 MiB), records
where protobuf's per-record work already dominates (1 MiB; a stream of 64
records messages, each compared whole, is ~1 minute a phase). records stop
at 16 MiB for the same reason (64 MiB: 1.5 million records, ~1 s per echo
in every mode). Streams carry --stream-bytes (64 MiB), so that 64 MiB
streams are 2 messages and 16 MiB ones 4. --sizes replaces every ladder;
--quick is a smoke test (4 KiB, 1 MiB, 16 MiB, unary).

With --out, beside results.json and report.txt, two figures (matplotlib:
`pip install 'shmgrpc[plot]'`): speedup.png, the one to read first, how
many times faster than plain gRPC over unix each transport is against
message size (the unary bytes echo where it ran), a panel per api, a line
style per malloc phase; and throughput.png, payload MiB/s of every mode,
message and shape.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import mmap
import os
import platform
import selectors
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
from google.protobuf import __version__ as protobuf_version
from google.protobuf.wrappers_pb2 import BytesValue

import shmgrpc
import shmgrpc.aio

from . import _bench_server as srv
from ._table import format_table
from .._malloc import HUGETLB_TUNABLE, hugetlb_requested, thp_mode, tune_malloc, with_hugetlb
from .._core import ChannelStatus
from ..config import Config, format_size, parse_size
from ..errors import ConfigError

KiB, MiB = srv.KiB, srv.MiB

MESSAGES = srv.MESSAGES
SHAPES = ("unary", "server_stream", "client_stream", "pingpong", "bidi")
DEFAULT_SHAPES = ("unary", "server_stream", "client_stream", "pingpong")
PAYLOAD_UP = ("unary", "client_stream", "pingpong", "bidi")  # shapes whose requests carry the payload
PAYLOAD_DOWN = ("unary", "server_stream", "pingpong", "bidi")  # shapes whose replies do
# Sizes per message: (unary, streams); see the module text.
LADDERS = {
    "bytes": ("4KiB,64KiB,256KiB,1MiB,4MiB,16MiB,64MiB,256MiB", "64KiB,256KiB,1MiB,4MiB,16MiB,64MiB"),
    "floats": ("4KiB,1MiB,16MiB,64MiB", "16MiB"),
    "records": ("4KiB,1MiB,16MiB", "1MiB"),
}
QUICK_SIZES = "4KiB,1MiB,16MiB"
QUICK_SHAPES = ("unary",)
METADATA_MODE = "grpc-unix-md"
PLAIN_MODES = ("grpc-tcp", "grpc-unix", METADATA_MODE)
SHMGRPC_MODES = ("memfd", "shm", "cma")  # each is also the transport it forces
MODES = PLAIN_MODES + SHMGRPC_MODES
DEFAULT_MODES = tuple(mode for mode in MODES if mode != METADATA_MODE)
# METADATA_MODE's element: a key of no meaning to the server, and a value as
# long as a client's hello (wire.encode_hello: 190 characters here).
HELLO_LIKE = ("bench-pad", "x" * 190)
BASELINE = "grpc-unix"  # what shmgrpc replaces: the same socket, plain gRPC
# Client API - server API, each grpc (sync) or grpc.aio; one word: both sides.
APIS = ("sync", "aio", "aio-sync", "sync-aio")
DEFAULT_APIS = APIS
SYNC_API = "sync"  # what the aio cells are compared with
MALLOCS = ("default", "keep", "hugepages")
BASE_MALLOC = "default"  # what an application has unless it opts in

# Fewer rounds make the median a coin toss on a busy machine.
DEFAULT_REPEAT = 5
# Cells of small messages are cheap, and a few percent is what they measure:
# five samples of a fraction of a second each follow the load of a shared
# machine rather than the code. They get SMALL_ROUNDS times the rounds, each
# unary batch SMALL_ROUNDS times smaller (the same calls in all), so that
# their median spans many more moments of the machine.
SMALL_MESSAGE = 64 * KiB
SMALL_ROUNDS = 4
# The in-process floor takes its turn in every round, as a mode does, so
# that it sees the same moments of a busy machine.
FLOOR = "floor"

# A stream carries about this many bytes: at 64 MiB a stream is two
# messages, at 1 MiB and below STREAM_MAX_COUNT.
DEFAULT_STREAM_BYTES = 64 * MiB
STREAM_MIN_COUNT = 2  # one message would be a unary call in disguise
STREAM_MAX_COUNT = 64  # enough for per-message costs to dominate at 4 KiB

# A hung call becomes an error instead of a stuck benchmark; a 256 MiB plain
# gRPC stream takes well under a minute on 2 cores.
CALL_TIMEOUT = 300.0
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL


# --- Options ----------------------------------------------------------------


def _sizes(text: str) -> List[int]:
    try:
        sizes = [parse_size(part, "--sizes") for part in text.split(",") if part.strip()]
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes={text!r}: expected sizes of at least 1 byte")
    return sorted(set(sizes))


def _size(text: str) -> int:
    try:
        return parse_size(text, "--stream-bytes")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _choices(allowed: Sequence[str], option: str) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"{option}={text!r}: expected a comma-separated list of {', '.join(allowed)}"
            )
        return [name for name in allowed if name in names]  # canonical order

    return parse


def _ladders_help() -> str:
    return "; ".join(f"{message}: unary {unary}, streams {streams}" for message, (unary, streams) in LADDERS.items())


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m shmgrpc.tools.bench",
        description="Benchmark shmgrpc against plain gRPC on this host.",
    )
    parser.add_argument(
        "--messages",
        type=_choices(MESSAGES, "--messages"),
        help=f"message shapes among {', '.join(MESSAGES)} (default: all)",
    )
    parser.add_argument(
        "--sizes", type=_sizes, help=f"message sizes for every message and shape (default: {_ladders_help()})"
    )
    parser.add_argument(
        "--shapes",
        type=_choices(SHAPES, "--shapes"),
        help=f"RPC shapes among {', '.join(SHAPES)} (default {','.join(DEFAULT_SHAPES)})",
    )
    parser.add_argument(
        "--modes",
        type=_choices(MODES, "--modes"),
        default=list(DEFAULT_MODES),
        help=f"modes among {', '.join(MODES)} (default: all but {METADATA_MODE})",
    )
    parser.add_argument(
        "--apis",
        type=_choices(APIS, "--apis"),
        default=list(DEFAULT_APIS),
        help="client API - server API among sync, aio (grpc.aio on both sides), aio-sync (aio client, sync "
        "server), sync-aio (sync client, aio server); every mode runs in each (default: all four)",
    )
    parser.add_argument(
        "--repeat", type=int, default=DEFAULT_REPEAT,
        help=f"rounds per cell (default {DEFAULT_REPEAT}; {SMALL_ROUNDS} times as many for messages of "
             f"{SMALL_MESSAGE // KiB} KiB and less)"
    )
    parser.add_argument(
        "--stream-bytes",
        type=_size,
        default=DEFAULT_STREAM_BYTES,
        help=f"about how many bytes one stream carries (default {DEFAULT_STREAM_BYTES // MiB}MiB)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"sizes {QUICK_SIZES}, unary only (explicit options win)",
    )
    parser.add_argument(
        "--malloc",
        type=_choices(MALLOCS, "--malloc"),
        default=[BASE_MALLOC],
        help="malloc phases among default, keep, hugepages (default: default); more than one (make bench "
        "runs all three) runs each in a process of its own and combines them. keep: both processes, every "
        "mode (plain gRPC too), with SHMGRPC_MALLOC=keep (glibc keeps freed memory warm; see "
        f"shmgrpc.tune_malloc); hugepages: the same with GLIBC_TUNABLES={HUGETLB_TUNABLE}",
    )
    parser.add_argument(
        "--out",
        help="directory for results.json, report.txt, speedup.png and throughput.png "
        "(with two malloc phases: each phase's in OUT/PHASE, the combined ones in OUT)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.messages is None:
        args.messages = list(MESSAGES)
    if args.shapes is None:
        args.shapes = list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    if args.sizes is None and args.quick:
        args.sizes = _sizes(QUICK_SIZES)
    args.plan = make_plan(args.messages, args.shapes, args.sizes)
    return args


def make_plan(
    messages: Sequence[str], shapes: Sequence[str], sizes: Optional[List[int]]
) -> Dict[str, Dict[str, List[int]]]:
    """Sizes per message and shape: `sizes` everywhere, or the LADDERS."""
    plan = {}
    for message in messages:
        unary, streams = (_sizes(ladder) for ladder in LADDERS[message])
        plan[message] = {shape: list(sizes or (unary if shape == "unary" else streams)) for shape in shapes}
    return plan


# --- Output helpers ---------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def short_size(size: int) -> str:
    """'4K', '256M': for plot ticks."""
    for unit, scale in (("G", 1024 * MiB), ("M", MiB), ("K", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def fmt_ms(value: Optional[float]) -> str:
    """Milliseconds with three significant digits, '-' for no value."""
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def ms(ns: Optional[float]) -> str:
    return fmt_ms(None if ns is None else ns / 1e6)


def ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


# --- The server processes ---------------------------------------------------


def sides(api: str) -> Tuple[str, str]:
    """('aio', 'sync') for 'aio-sync': the client's API, the server's."""
    client, _, server = api.partition("-")
    return client, server or client


@dataclasses.dataclass
class Server:
    process: subprocess.Popen
    pid: int
    tcp_port: int
    unix_path: str


def _package_env() -> Dict[str, str]:
    """The environment, with this very shmgrpc importable (installed or not:
    a checkout) in the processes the bench starts."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def start_server(unix_path: str, api: str = "sync") -> Server:
    """Start the bench server (grpc or grpc.aio) and wait for its ready line."""
    module = srv.__name__
    command = [sys.executable, "-m", module, "--unix", unix_path, "--parent", str(os.getpid()), "--api", api]
    # Its own session: Ctrl-C reaches only the bench, which then stops the
    # server itself (stop_server), in order.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, env=_package_env(), start_new_session=True, text=True
    )
    try:
        ready = _read_ready_line(process)
    except BaseException:
        stop_server(process)
        raise
    return Server(process, ready["pid"], ready["tcp_port"], ready["unix"])


def _read_ready_line(process: subprocess.Popen) -> dict:
    assert process.stdout is not None  # started with stdout=PIPE
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(SERVER_START_TIMEOUT):
            raise RuntimeError(f"the bench server did not start within {SERVER_START_TIMEOUT:.0f} s")
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"the bench server exited with status {process.wait()} before serving")
    return json.loads(line)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within SERVER_STOP_GRACE."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(SERVER_STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout:
        process.stdout.close()


# --- Modes: channels and stubs ----------------------------------------------


@dataclasses.dataclass
class Methods:
    """One message shape's bench methods as callables on one channel."""

    echo: Callable
    download: Callable
    upload: Callable
    echo_stream: Callable

    @classmethod
    def on(cls, channel: "Calls", message: str) -> "Methods":
        kind = srv.KINDS[message].cls
        payload: Dict[str, Any] = dict(request_serializer=kind.SerializeToString, response_deserializer=kind.FromString)
        return cls(
            echo=channel.unary_unary(srv.method("Echo", message), **payload),
            download=channel.unary_stream(
                srv.method("Download", message),
                request_serializer=BytesValue.SerializeToString,
                response_deserializer=kind.FromString,
            ),
            upload=channel.stream_unary(
                srv.method("Upload", message),
                request_serializer=kind.SerializeToString,
                response_deserializer=BytesValue.FromString,
            ),
            echo_stream=channel.stream_stream(srv.method("EchoStream", message), **payload),
        )


@dataclasses.dataclass
class Stubs:
    """The bench methods of every message shape, and the control calls."""

    methods: Dict[str, Methods]  # by message shape
    peak: Callable
    stats: Callable

    @classmethod
    def on(cls, channel: "Calls", messages: Sequence[str]) -> "Stubs":
        control: Dict[str, Any] = dict(request_serializer=BytesValue.SerializeToString, response_deserializer=BytesValue.FromString)
        return cls(
            methods={message: Methods.on(channel, message) for message in messages},
            peak=channel.unary_unary(srv.PEAK, **control),
            stats=channel.unary_unary(srv.STATS, **control),
        )


# Each mode gets connections of its own: by default gRPC shares one
# connection between channels with equal targets and options, and then plain
# and shmgrpc calls would interleave on it.
CHANNEL_OPTIONS = srv.GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]

# A cell's column: (api, mode), e.g. ("aio", "memfd").
Column = Tuple[str, str]


def column_name(column: Column) -> str:
    """'memfd' for a sync cell (as before there were apis), 'aio:memfd' else."""
    api, mode = column
    return mode if api == SYNC_API else f"{api}:{mode}"


def open_channel(target: str) -> grpc.Channel:
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=SERVER_START_TIMEOUT)
    return channel


async def open_aio_channel(target: str) -> grpc.aio.Channel:
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    await asyncio.wait_for(channel.channel_ready(), SERVER_START_TIMEOUT)
    return channel


@dataclasses.dataclass
class Clients:
    """Stubs per column, and the channels to close when done. The aio
    channels live on `loop`, which runs each of their samples in turn."""

    loop: asyncio.AbstractEventLoop = dataclasses.field(default_factory=asyncio.new_event_loop)
    stubs: Dict[Column, Stubs] = dataclasses.field(default_factory=dict)
    channels: List[grpc.Channel] = dataclasses.field(default_factory=list)
    aio_channels: List[grpc.aio.Channel] = dataclasses.field(default_factory=list)
    shmgrpc: Dict[Column, Any] = dataclasses.field(default_factory=dict)  # shmgrpc.Channel or shmgrpc.aio.Channel

    def close(self) -> None:
        # A shmgrpc channel closes the grpc channel it wraps and lets go of
        # its shared memory.
        for channel in self.channels:
            channel.close()
        for aio_channel in self.aio_channels:
            self.loop.run_until_complete(aio_channel.close())
        self.loop.close()

    def statuses(self) -> Dict[Column, ChannelStatus]:
        return {column: shmgrpc.channel_status(channel) for column, channel in self.shmgrpc.items()}


def open_modes(
    apis: Sequence[str], names: Sequence[str], messages: Sequence[str], servers: Dict[str, Server], clients: Clients
) -> None:
    """Open a channel per api and mode into `clients`."""
    for api in apis:
        client_api, server_api = sides(api)
        server = servers[server_api]
        for name in names:
            target = f"127.0.0.1:{server.tcp_port}" if name == "grpc-tcp" else f"unix:{server.unix_path}"
            channel: Union[grpc.Channel, grpc.aio.Channel]
            # Told the channel's options, shmgrpc offloads replies up to the
            # raised receive limit (without them it assumes gRPC's 4 MiB).
            config = Config.from_env(transport=name) if name in SHMGRPC_MODES else None
            if client_api == "aio":
                channel = clients.loop.run_until_complete(open_aio_channel(target))
                if config:
                    channel = shmgrpc.aio.intercept_channel(channel, config, options=CHANNEL_OPTIONS)
                clients.aio_channels.append(channel)
            else:
                channel = open_channel(target)
                if config:
                    channel = shmgrpc.intercept_channel(channel, config, options=CHANNEL_OPTIONS)
                clients.channels.append(channel)
            if config:
                clients.shmgrpc[(api, name)] = channel
            calls = _WithMetadata(channel) if name == METADATA_MODE else channel
            clients.stubs[(api, name)] = Stubs.on(calls, messages)


# What Stubs.on makes its multicallables with.
Calls = Union[grpc.Channel, grpc.aio.Channel, "_WithMetadata"]


class _WithMetadata:
    """A channel's multicallables (grpc or grpc.aio), each call carrying
    HELLO_LIKE as well (the bench passes no metadata of its own)."""

    def __init__(self, channel: Union[grpc.Channel, grpc.aio.Channel]) -> None:
        self._channel = channel

    def _wrap(self, multicallable: Callable) -> Callable:
        return functools.partial(multicallable, metadata=(HELLO_LIKE,))

    def unary_unary(self, *args: Any, **kwargs: Any) -> Callable:
        return self._wrap(self._channel.unary_unary(*args, **kwargs))

    def unary_stream(self, *args: Any, **kwargs: Any) -> Callable:
        return self._wrap(self._channel.unary_stream(*args, **kwargs))

    def stream_unary(self, *args: Any, **kwargs: Any) -> Callable:
        return self._wrap(self._channel.stream_unary(*args, **kwargs))

    def stream_stream(self, *args: Any, **kwargs: Any) -> Callable:
        return self._wrap(self._channel.stream_stream(*args, **kwargs))


# --- One measured call per shape --------------------------------------------


@dataclasses.dataclass
class Job:
    """What one cell sends: `count` messages of one shape and `size` bytes."""

    message: str
    shape: str
    size: int
    count: int
    payload: srv.Payload

    @property
    def check(self) -> srv.Check:
        return self.payload.check


class Stopwatch:
    """Wall time and this process's CPU time (every thread: gRPC's own do
    part of a call's work) over the timed stretches of one sample."""

    def __init__(self) -> None:
        self.wall_ns = self.cpu_ns = 0
        self._wall = self._cpu = 0

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter_ns(), time.process_time_ns()

    def stop(self) -> None:
        self.wall_ns += time.perf_counter_ns() - self._wall
        self.cpu_ns += time.process_time_ns() - self._cpu


NOTHING_REMOTE = (0, 0)


@dataclasses.dataclass
class Outcome:
    """What a runner returns for one sample."""

    watch: Stopwatch
    problem: Optional[str] = None
    remote: Tuple[int, int] = NOTHING_REMOTE  # messages the server checked (whole, spot-checked)
    calls: int = 1  # the sample's calls: its times are per call
    server_off_ns: int = 0  # the server's own time off the clock (an upload's whole comparisons)

    @property
    def wall_ns(self) -> int:
        return self.watch.wall_ns // self.calls

    @property
    def cpu_ns(self) -> int:
        return self.watch.cpu_ns // self.calls


def directions(shape: str) -> int:
    """How often each message crosses: twice in an echo, else once."""
    return (shape in PAYLOAD_UP) + (shape in PAYLOAD_DOWN)


def stream_count(shape: str, size: int, stream_bytes: int) -> int:
    if shape == "unary":
        return 1
    return max(STREAM_MIN_COUNT, min(STREAM_MAX_COUNT, stream_bytes // size))


def _messages(job: Job) -> Iterator[Any]:
    for _ in range(job.count):
        yield job.payload.message


async def _aio_messages(job: Job) -> AsyncIterator[Any]:
    for _ in range(job.count):
        yield job.payload.message


class _Drain:
    """A reply stream's messages as they come: (count, replies kept for a
    whole check, problem).

    Replies up to STREAM_KEEP_MAX are kept and compared whole after the
    clock stops; bigger ones get the spot check here, on the clock.
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        self.count = 0
        self.kept: List[Any] = []
        self.problem: Optional[str] = None

    def add(self, reply: Any) -> None:
        self.count += 1
        if self.job.size <= srv.STREAM_KEEP_MAX:
            self.kept.append(reply)
        elif self.problem is None:
            self.problem = self.job.check.problem(reply, whole=False)

    def verdict(self) -> Optional[str]:
        if self.count != self.job.count:
            return f"got {self.count} messages, expected {self.job.count}"
        problem = self.problem
        for reply in self.kept:
            problem = problem or self.job.check.problem(reply)
        return problem


# A sample of small echoes is a batch: one ~1 ms call mostly measures the
# scheduler's wake-up jitter. Batches carry about this many payload bytes.
BATCH_BYTES = 16 * MiB
MAX_BATCH = 200


def rounds_for(size: int, repeat: int) -> int:
    return repeat * SMALL_ROUNDS if size <= SMALL_MESSAGE else repeat


def rounds_text(repeat: int) -> str:
    """How many rounds the report's medians are of."""
    return (f"median of {repeat} interleaved rounds "
            f"({rounds_for(SMALL_MESSAGE, repeat)} for messages of {format_size(SMALL_MESSAGE)} and less)")


def batch_calls(job: Job) -> int:
    # A cell with more rounds (rounds_for) takes as many fewer calls a round.
    return max(1, min(MAX_BATCH, BATCH_BYTES // max(1, job.size)) // rounds_for(job.size, 1))


def _upload_outcome(watch: Stopwatch, reply: BytesValue, job: Job) -> Outcome:
    summary = json.loads(reply.value)
    # The server's whole comparisons ran after the last message, before it
    # replied: off the clock.
    watch.wall_ns -= summary["check_ns"]
    outcome = Outcome(watch, remote=(summary["checked_whole"], summary["checked_sampled"]),
                      server_off_ns=summary["check_ns"])
    items = job.count * job.payload.n
    if summary["count"] != job.count or summary["items"] != items:
        outcome.problem = (f"server got {summary['count']} messages, {summary['items']} items; "
                           f"expected {job.count}, {items}")
    else:
        outcome.problem = summary["problem"] and f"server: {summary['problem']}"
    return outcome


# Sync clients (grpc). Each runner's stopwatch runs only while the call
# does: checks between calls or after a stream are off both clocks.


def run_unary(methods: Methods, job: Job) -> Outcome:
    """Time of one echo: the mean over a batch for small payloads. Each call
    is timed alone and its reply checked between calls, off the clock."""
    calls, request = batch_calls(job), job.payload.message
    watch, problem = Stopwatch(), None
    for _ in range(calls):
        watch.start()
        reply = methods.echo(request, timeout=CALL_TIMEOUT)
        watch.stop()
        problem = problem or job.check.problem(reply)
        del reply  # every call starts from the same memory
    return Outcome(watch, problem, calls=calls)


def run_server_stream(methods: Methods, job: Job) -> Outcome:
    request = BytesValue(value=srv.STREAM_REQUEST.pack(job.size, job.count))
    watch, drain = Stopwatch(), _Drain(job)
    watch.start()
    for reply in methods.download(request, timeout=CALL_TIMEOUT):
        drain.add(reply)
    watch.stop()
    return Outcome(watch, drain.verdict())


def run_client_stream(methods: Methods, job: Job) -> Outcome:
    watch = Stopwatch()
    watch.start()
    reply = methods.upload(_messages(job), timeout=CALL_TIMEOUT)
    watch.stop()
    return _upload_outcome(watch, reply, job)


def run_bidi(methods: Methods, job: Job) -> Outcome:
    watch, drain = Stopwatch(), _Drain(job)
    watch.start()
    for reply in methods.echo_stream(_messages(job), timeout=CALL_TIMEOUT):
        drain.add(reply)
    watch.stop()
    return Outcome(watch, drain.verdict())


def run_pingpong(methods: Methods, job: Job) -> Outcome:
    """One bidi stream, one message in flight: the next request is sent only
    once the previous reply is in. Each reply is checked while nothing is
    in flight, off the clock."""
    turn = threading.Semaphore(0)  # released once per reply
    ended = threading.Event()

    def requests() -> Iterator[Any]:
        # gRPC's request thread pulls these; it waits here for each reply.
        for _ in range(job.count):
            yield job.payload.message
            if not turn.acquire(timeout=CALL_TIMEOUT) or ended.is_set():
                return

    count, problem, watch = 0, None, Stopwatch()
    watch.start()
    try:
        for reply in methods.echo_stream(requests(), timeout=CALL_TIMEOUT):
            watch.stop()
            count += 1
            problem = problem or job.check.problem(reply)
            del reply
            watch.start()
            turn.release()
        watch.stop()  # the end of the stream
    finally:
        ended.set()
        turn.release()
    if count != job.count:
        problem = f"got {count} messages, expected {job.count}"
    return Outcome(watch, problem)


RUNNERS = {
    "unary": run_unary,
    "server_stream": run_server_stream,
    "client_stream": run_client_stream,
    "pingpong": run_pingpong,
    "bidi": run_bidi,
}


# aio clients (grpc.aio): the same shapes, awaited on the Clients' loop.


async def aio_unary(methods: Methods, job: Job) -> Outcome:
    calls, request = batch_calls(job), job.payload.message
    watch, problem = Stopwatch(), None
    for _ in range(calls):
        watch.start()
        reply = await methods.echo(request, timeout=CALL_TIMEOUT)
        watch.stop()
        problem = problem or job.check.problem(reply)
        del reply
    return Outcome(watch, problem, calls=calls)


async def aio_server_stream(methods: Methods, job: Job) -> Outcome:
    request = BytesValue(value=srv.STREAM_REQUEST.pack(job.size, job.count))
    watch, drain = Stopwatch(), _Drain(job)
    watch.start()
    async for reply in methods.download(request, timeout=CALL_TIMEOUT):
        drain.add(reply)
    watch.stop()
    return Outcome(watch, drain.verdict())


async def aio_client_stream(methods: Methods, job: Job) -> Outcome:
    watch = Stopwatch()
    watch.start()
    reply = await methods.upload(_aio_messages(job), timeout=CALL_TIMEOUT)
    watch.stop()
    return _upload_outcome(watch, reply, job)


async def aio_bidi(methods: Methods, job: Job) -> Outcome:
    watch, drain = Stopwatch(), _Drain(job)
    watch.start()
    async for reply in methods.echo_stream(_aio_messages(job), timeout=CALL_TIMEOUT):
        drain.add(reply)
    watch.stop()
    return Outcome(watch, drain.verdict())


async def aio_pingpong(methods: Methods, job: Job) -> Outcome:
    """run_pingpong with grpc.aio's own way: write, read, write, ..."""
    call = methods.echo_stream(timeout=CALL_TIMEOUT)
    count, problem, watch = 0, None, Stopwatch()
    watch.start()
    for _ in range(job.count):
        await call.write(job.payload.message)
        reply = await call.read()
        watch.stop()
        if reply is grpc.aio.EOF:
            break
        count += 1
        problem = problem or job.check.problem(reply)
        del reply
        watch.start()
    else:
        await call.done_writing()
        if await call.read() is not grpc.aio.EOF:
            problem = problem or "the stream went on after the last reply"
        watch.stop()  # the end of the stream
    if count != job.count:
        call.cancel()
        problem = f"got {count} messages, expected {job.count}"
    return Outcome(watch, problem)


AIO_RUNNERS = {
    "unary": aio_unary,
    "server_stream": aio_server_stream,
    "client_stream": aio_client_stream,
    "pingpong": aio_pingpong,
    "bidi": aio_bidi,
}


# --- shmgrpc's counters: did the big messages really take the fast path? ----


def _diff(after, before):
    """after - before for every number in two nested dicts of counters."""
    if isinstance(after, dict):
        before = before if isinstance(before, dict) else {}
        return {key: _diff(value, before.get(key)) for key, value in after.items()}
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        return after - (before if isinstance(before, (int, float)) else 0)
    return None


def _add(total: dict, delta: dict) -> dict:
    for key, value in delta.items():
        if isinstance(value, dict):
            _add(total.setdefault(key, {}), value)
        elif value is not None:
            total[key] = total.get(key, 0) + value
    return total


# Counters that grow with traffic; "pool" holds gauges, whose difference
# means nothing.
COUNTERS = ("offloaded", "restored", "inline", "fallbacks", "by_transport")


def counters(stats: Optional[Mapping[str, Any]]) -> dict:
    return {key: stats[key] for key in COUNTERS if stats and key in stats}


# Snapshots with nothing between them that calibrate a Stats call's own cost.
PROBE_CALIBRATION = 15


class StatsProbe:
    """Snapshots of shmgrpc.stats() in the client and in every server, as
    deltas per sample, and each server's CPU time, which its Stats reply
    carries.

    A server's CPU time between two snapshots includes what one Stats call
    costs it (the end of one, the start of the next). `cost` is that, by
    server: the median over snapshots with nothing between them, for each
    sample to take off.
    """

    def __init__(self, controls: Dict[str, Stubs]) -> None:
        self._controls = controls  # by the server's API
        self._last = self._snapshot()
        self.cost = {api: 0 for api in controls}
        idle = [self.delta()[2] for _ in range(PROBE_CALIBRATION)]
        self.cost = {api: int(statistics.median(cpu[api] for cpu in idle)) for api in controls}

    def _snapshot(self) -> Tuple[dict, Dict[str, dict]]:
        servers = {
            api: json.loads(control.stats(BytesValue(), timeout=CALL_TIMEOUT).value)
            for api, control in self._controls.items()
        }
        return counters(srv.shmgrpc_stats()), servers

    def delta(self) -> Tuple[dict, Dict[str, dict], Dict[str, int]]:
        """Since the last call: the client's counter changes, and by server
        API each server's counter changes and CPU time (ns)."""
        now = self._snapshot()
        client = _diff(now[0], self._last[0])
        servers = {api: _diff(counters(stats), counters(self._last[1][api])) for api, stats in now[1].items()}
        cpu = {api: stats[srv.CPU_NS] - self._last[1][api][srv.CPU_NS] for api, stats in now[1].items()}
        self._last = now
        return client, servers, cpu


def offload_shortfall(job: Job, mode: str, client_delta: dict) -> Optional[str]:
    """Why this sample may not have taken mode's fast path, or None.

    The client offloads what it sends and restores what it receives; every
    message at or above the threshold should do one or the other through the
    transport the mode forces (not a fallback to another one, nor inline).
    """
    sent = job.count if job.shape in PAYLOAD_UP else 0
    received = job.count if job.shape in PAYLOAD_DOWN else 0
    counts = client_delta.get("by_transport", {}).get(mode, {})
    offloaded = counts.get("offloaded", {}).get("count", 0)
    restored = counts.get("restored", {}).get("count", 0)
    if offloaded >= sent and restored >= received:
        return None
    return (
        f"through {mode}, the client offloaded {offloaded} of {sent} messages sent and restored "
        f"{restored} of {received} received; fallbacks: {client_delta.get('fallbacks') or 'none'}"
    )


# --- The in-process floor ---------------------------------------------------


def floor_one_way(payload: srv.Payload, buf: mmap.mmap) -> int:
    """Serialize, copy into a shared mapping, parse from it: the ns taken."""
    start = time.perf_counter_ns()
    wire = payload.message.SerializeToString()
    buf[: len(wire)] = wire
    with memoryview(buf)[: len(wire)] as view:
        message = payload.kind.cls.FromString(view)
    elapsed = time.perf_counter_ns() - start
    del wire
    problem = payload.check.problem(message, whole=False)
    if problem:
        raise AssertionError(f"the floor's round trip changed the payload: {problem}")
    return elapsed


@contextlib.contextmanager
def floor_buffer(payload: srv.Payload) -> Iterator[mmap.mmap]:
    """A mapping for floor_one_way, warmed up."""
    length = payload.wire_size
    # A shared anonymous mapping is shmem, as a /dev/shm segment is; writing
    # every page first keeps page faults out of the measurement, as a warm
    # pool would.
    with mmap.mmap(-1, length) as buf:
        for offset in range(0, length, mmap.PAGESIZE):
            buf[offset] = 0
        floor_one_way(payload, buf)
        yield buf


# --- Peak memory ------------------------------------------------------------


def measure_peak(echo: Callable[[Any], Any], control: Stubs, job: Job) -> dict:
    """Peak memory of both processes over one unary echo (`echo` returns the
    reply, with grpc or grpc.aio), after resets; the reply is checked once
    the client's memory is read."""
    client_reset = srv.reset_peak()
    client_base = srv.memory_status()
    server_base = json.loads(control.peak(BytesValue(), timeout=CALL_TIMEOUT).value)  # also resets
    reply = echo(job.payload.message)
    client = srv.memory_status()
    server = json.loads(control.peak(BytesValue(), timeout=CALL_TIMEOUT).value)
    problem = job.check.problem(reply)
    del reply
    if problem:
        raise ValueError(problem)
    return {
        "client": _peak_summary(client, client_base["VmRSS"], client_reset, job.size),
        "server": _peak_summary(server, server_base["VmRSS"], server_base["reset"], job.size),
    }


def _peak_summary(status: dict, base_rss: int, was_reset: bool, size: int) -> dict:
    summary = {
        "vm_hwm_mib": status["VmHWM"] / MiB,
        "vm_hwm_x_payload": status["VmHWM"] / size,
        "rss_before_mib": base_rss / MiB,
        "growth_mib": (status["VmHWM"] - base_rss) / MiB,
        "growth_x_payload": (status["VmHWM"] - base_rss) / size,
        "peak_was_reset": was_reset,  # False: VmHWM is the process's lifetime peak
    }
    if "RssShmem" in status:
        summary["rss_shmem_after_mib"] = status["RssShmem"] / MiB
    return summary


# --- The run ----------------------------------------------------------------


def _median(samples: List[int]) -> Optional[float]:
    return statistics.median(samples) if samples else None


@dataclasses.dataclass
class Cell:
    """One (message, shape, size, api, mode): its samples and what was seen along the way."""

    message: str
    shape: str
    size: int
    wire_size: int
    count: int
    api: str
    mode: str
    samples_ns: List[int] = dataclasses.field(default_factory=list)
    # CPU time per sample, in the unit of samples_ns (per call, or per
    # stream): this process's, and the server's.
    client_cpu_ns: List[int] = dataclasses.field(default_factory=list)
    server_cpu_ns: List[int] = dataclasses.field(default_factory=list)
    errors: List[str] = dataclasses.field(default_factory=list)
    shortfalls: List[str] = dataclasses.field(default_factory=list)
    client_stats: dict = dataclasses.field(default_factory=dict)
    server_stats: dict = dataclasses.field(default_factory=dict)
    peak: Optional[dict] = None
    checked_whole: int = 0  # messages compared whole, warm-up included
    checked_sampled: int = 0  # messages spot-checked

    @property
    def column(self) -> Column:
        return self.api, self.mode

    @property
    def median_ns(self) -> Optional[float]:
        return _median(self.samples_ns)

    def per_message(self, median: Optional[float]) -> Optional[float]:
        return None if median is None or self.errors else median / self.count

    @property
    def per_message_ns(self) -> Optional[float]:
        return self.per_message(self.median_ns)

    def cpu_per_message_ns(self) -> Dict[str, Optional[float]]:
        """Medians per message: client, server, and of their sum per sample."""
        both = [client + server for client, server in zip(self.client_cpu_ns, self.server_cpu_ns)]
        return {
            "client": self.per_message(_median(self.client_cpu_ns)),
            "server": self.per_message(_median(self.server_cpu_ns)),
            "sum": self.per_message(_median(both)),
        }


def _last(samples: List[int]) -> Optional[int]:
    return samples[-1] if samples else None


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


class Bench:
    """The run: cells filled message by message, size by size, shape by shape."""

    def __init__(self, args: argparse.Namespace, clients: Clients, controls: Dict[str, Stubs], config: Config):
        self.args = args
        self.clients = clients
        self.stubs = clients.stubs
        self.columns: List[Column] = list(clients.stubs)
        self.apis = list(dict.fromkeys(api for api, _ in self.columns))
        self.modes = list(dict.fromkeys(mode for _, mode in self.columns))
        self.controls = controls  # by the server's API
        self.threshold = config.threshold
        self.cma_threshold = config.cma_threshold
        # shmgrpc.stats() shows whether the big messages took the fast path;
        # the servers' Stats replies carry their CPU time.
        self.probe = StatsProbe(controls)
        # Each shmgrpc column's channel status at the end of the run.
        self.channels: Dict[Column, shmgrpc.ChannelStatus] = {}
        self.cells: Dict[Tuple[str, str, int, str, str], Cell] = {}
        self.floors: Dict[Tuple[str, int], List[int]] = {}
        self.warnings: List[str] = []

    def run(self) -> None:
        for message in self.args.messages:
            plan = self.args.plan[message]
            for size in sorted({size for sizes in plan.values() for size in sizes}):
                shapes = [shape for shape in self.args.shapes if size in plan[shape]]
                progress(f"== {message} {format_size(size)}: building the payload")
                payload = srv.Payload(message, size)
                self.floors[(message, size)] = []
                unary = None
                with floor_buffer(payload) as buf:
                    for shape in shapes:
                        count = stream_count(shape, size, self.args.stream_bytes)
                        job = Job(message, shape, size, count, payload)
                        cells = self.run_cell(job, buf)
                        unary = (cells, job) if shape == "unary" else unary
                # Now that the floor's mapping is gone from the resident set.
                if unary:
                    self.measure_peaks(*unary)
                del payload, unary, job  # before the next size's payload is built

    def run_cell(self, job: Job, floor_buf: mmap.mmap) -> Dict[Column, Cell]:
        key = (job.message, job.shape, job.size)
        cells = {column: Cell(*key, job.payload.wire_size, job.count, *column) for column in self.columns}
        for column in self.columns:
            self.cells[key + column] = cells[column]
        label = f"{job.message} {job.shape} {format_size(job.size)}" + (f" x{job.count}" if job.count > 1 else "")
        progress(f"-- {label}: warm-up")
        for column in self.columns:
            self.sample(cells[column], job, record=False)
        floors = self.floors[(job.message, job.size)]
        turns: List[Any] = self.columns + [FLOOR]
        rounds = rounds_for(job.size, self.args.repeat)
        for round_ in range(rounds):
            first = round_ % len(turns)
            for name in turns[first:] + turns[:first]:
                if name == FLOOR:
                    floors.append(floor_one_way(job.payload, floor_buf))
                else:
                    self.sample(cells[name], job, record=True)
            latest = "  ".join(
                f"{column_name(column)} {ms(_last(cells[column].samples_ns))}" for column in self.columns
            )
            progress(
                f"   {label} round {round_ + 1}/{rounds}, ms: {latest}  (floor one way {ms(floors[-1])})"
            )
        return cells

    def echo(self, column: Column, message: str) -> Callable[[Any], Any]:
        """One unary echo on column's channel, waited for, with grpc or grpc.aio."""
        echo = self.stubs[column].methods[message].echo
        if sides(column[0])[0] == "aio":
            return lambda request: self.clients.loop.run_until_complete(
                _awaited(echo(request, timeout=CALL_TIMEOUT))
            )
        return functools.partial(echo, timeout=CALL_TIMEOUT)

    def measure_peaks(self, cells: Dict[Column, Cell], job: Job) -> None:
        """Peak memory over one more echo per column (the pool is warm by now)."""
        for column, cell in cells.items():
            if cell.errors:
                continue
            where = f"peak memory, {job.message} {format_size(job.size)} {column_name(column)}"
            control = self.controls[sides(cell.api)[1]]
            try:
                cell.peak = measure_peak(self.echo(column, job.message), control, job)
            except grpc.RpcError as exc:
                self.warn(f"{where}: {exc.code().name}: {exc.details()}")
            except ValueError as exc:  # the reply was wrong
                cell.errors.append(f"{where}: {exc}")
                self.warn(f"{where}: {exc}")
        self.probe.delta()  # these calls belong to no cell

    def sample(self, cell: Cell, job: Job, record: bool) -> None:
        if cell.errors:  # one broken column must not stop the others
            return
        whole, spot = job.check.whole_checks, job.check.spot_checks
        methods = self.stubs[cell.column].methods[job.message]
        outcome: Optional[Outcome] = None
        try:
            if sides(cell.api)[0] == "aio":
                outcome = self.clients.loop.run_until_complete(AIO_RUNNERS[job.shape](methods, job))
            else:
                outcome = RUNNERS[job.shape](methods, job)
            problem, remote = outcome.problem, outcome.remote
        except grpc.RpcError as exc:
            problem, remote = f"{exc.code().name}: {exc.details()}", NOTHING_REMOTE
        cell.checked_whole += job.check.whole_checks - whole + remote[0]
        cell.checked_sampled += job.check.spot_checks - spot + remote[1]
        if problem:
            cell.errors.append(problem)
            self.warn(f"{job.message} {job.shape} {format_size(job.size)} {column_name(cell.column)}: {problem}")
        self.account(cell, job, outcome if record and not problem else None)

    def account(self, cell: Cell, job: Job, outcome: Optional[Outcome]) -> None:
        """Attribute shmgrpc's counters and the server's CPU time since the
        last sample to this one (if `outcome`: a sample to record), and check
        that a big message took the mode's fast path."""
        client, servers, server_cpu = self.probe.delta()
        if outcome is None:
            return
        server_api = sides(cell.api)[1]
        cell.samples_ns.append(outcome.wall_ns)
        cell.client_cpu_ns.append(outcome.cpu_ns)
        # Less what the snapshot itself cost the server, and its own checks.
        busy = server_cpu[server_api] - self.probe.cost[server_api] - outcome.server_off_ns
        cell.server_cpu_ns.append(busy // outcome.calls)
        _add(cell.client_stats, client)
        _add(cell.server_stats, servers[server_api])
        if cell.mode in SHMGRPC_MODES and job.payload.wire_size >= self.fast_path_from(cell.mode):
            shortfall = offload_shortfall(job, cell.mode, client)
            where = f"{job.message} {job.shape} {format_size(job.size)} {column_name(cell.column)}"
            if shortfall and not cell.shortfalls:
                self.warn(f"{where}: {shortfall}")
            if shortfall:
                cell.shortfalls.append(shortfall)

    def fast_path_from(self, mode: str) -> int:
        """The smallest message mode's transport carries: cma also has a
        threshold of its own (SHMGRPC_CMA_THRESHOLD, 512 KiB by default);
        below it a message goes inline, as it should, not short of anything."""
        return max(self.threshold, self.cma_threshold) if mode == "cma" else self.threshold

    def record_channels(self, statuses: Dict[Column, shmgrpc.ChannelStatus]) -> None:
        """Each shmgrpc column's channel status; a warning for a channel that
        does not (or no longer does) use its mode's transport."""
        self.channels = dict(statuses)
        for (api, mode), status in statuses.items():
            if status.transport != mode:
                self.warn(f"the {column_name((api, mode))} channel ends the run with transport "
                          f"{status.transport}: {status.reason}")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        progress(f"!! {message}")


# --- results.json -----------------------------------------------------------


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine_info() -> dict:
    from google.protobuf.internal import api_implementation

    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": protobuf_version,
        "protobuf_backend": api_implementation.Type(),
        # cma needs ptrace rights over the peer: 0 grants them between processes
        # of one user, 1 only over descendants or processes that opted in with
        # PR_SET_PTRACER (the kernel's Documentation/admin-guide/LSM/Yama.rst).
        "yama_ptrace_scope": _read("/proc/sys/kernel/yama/ptrace_scope"),
        "transparent_hugepages": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_line(machine: dict) -> str:
    """'2023-..., 2 cores (AMD EPYC ...), Linux 6.1, Python 3.11.7, ...': for README tables."""
    return (
        f"{machine['date']}; {machine['cores']} cores ({machine['cpu_model'] or 'unknown CPU'}), "
        f"Linux {machine['kernel']}, Python {machine['python']}, grpcio {machine['grpcio']}, "
        f"protobuf {machine['protobuf']} ({machine['protobuf_backend']})"
    )


def mib_per_s(shape: str, size: int, ms_per_message: Optional[float]) -> Optional[float]:
    """Payload MiB moved per second; an echo moves its payload twice."""
    if not ms_per_message:
        return None
    return directions(shape) * size / MiB / (ms_per_message / 1e3)


def _ms(ns: Optional[float]) -> Optional[float]:
    return None if ns is None else ns / 1e6


def _cell_json(cell: Cell) -> dict:
    cpu = cell.cpu_per_message_ns()
    client_api, server_api = sides(cell.api)
    return {
        "message": cell.message,
        "shape": cell.shape,
        "size": cell.size,
        "wire_size": cell.wire_size,
        "count": cell.count,
        "api": cell.api,
        "client_api": client_api,
        "server_api": server_api,
        "mode": cell.mode,
        "samples_ms": [_ms(ns) for ns in cell.samples_ns],
        "median_ms": _ms(cell.median_ns),
        "per_message_ms": _ms(cell.per_message_ns),
        # CPU time, user + system, every thread of the process: samples in
        # the unit of samples_ms, medians per message (the sum's is the
        # median of the per-sample sums).
        "client_cpu_samples_ms": [_ms(ns) for ns in cell.client_cpu_ns],
        "server_cpu_samples_ms": [_ms(ns) for ns in cell.server_cpu_ns],
        "client_cpu_per_message_ms": _ms(cpu["client"]),
        "server_cpu_per_message_ms": _ms(cpu["server"]),
        "cpu_per_message_ms": _ms(cpu["sum"]),
        "throughput_mib_s": mib_per_s(cell.shape, cell.size, _ms(cell.per_message_ns)),
        "errors": cell.errors,
        "fast_path_shortfalls": cell.shortfalls,
        "checked_whole": cell.checked_whole,
        "checked_sampled": cell.checked_sampled,
        "client_shmgrpc_stats": cell.client_stats,
        "server_shmgrpc_stats": cell.server_stats,
        "peak_memory": cell.peak,
    }


def results(
    bench: Bench, command: str, malloc: str, notes: List[str], elapsed_s: float, interrupted: bool
) -> dict:
    data: Dict[str, Any] = {
        "command": command,
        "machine": machine_info(),
        "malloc": malloc,
        "elapsed_s": round(elapsed_s, 1),
        "interrupted": interrupted,
        "options": {
            "messages": bench.args.messages,
            "shapes": bench.args.shapes,
            "plan": bench.args.plan,
            "modes": bench.modes,
            "apis": bench.apis,
            "repeat": bench.args.repeat,
            "stream_bytes": bench.args.stream_bytes,
            "threshold": bench.threshold,
            "cma_threshold": bench.cma_threshold,
            "stream_keep_max": srv.STREAM_KEEP_MAX,
        },
        "units": "times in ms (CPU: user + system, all threads of a process); streams: per message; "
        "throughput: payload MiB/s, echoes count both ways; speedups and cpu ratios against "
        f"{BASELINE} of the same api",
        "cells": [_cell_json(cell) for cell in bench.cells.values()],
        "floor": [
            {
                "message": message,
                "size": size,
                "one_way_samples_ms": [_ms(ns) for ns in samples],
                "one_way_median_ms": _ms(statistics.median(samples)),
            }
            for (message, size), samples in bench.floors.items()
            if samples
        ],
        "shmgrpc_pool": srv.shmgrpc_stats().get("pool"),
        "shmgrpc_channels": {column_name(column): dataclasses.asdict(status)
                             for column, status in bench.channels.items()},
        "shmgrpc_channel_text": {column_name(column): status_text(status)
                                 for column, status in bench.channels.items()},
        "server_cpu_per_snapshot_ms": {api: _ms(cost) for api, cost in bench.probe.cost.items()},
        "notes": notes,
        "warnings": bench.warnings,
    }
    # Derived per cell, as the report shows them.
    view = Results(data)
    for cell in data["cells"]:
        key = (cell["message"], cell["shape"], cell["size"])
        per_message = view.per_message(*key, cell["mode"], cell["api"])
        cell[f"speedup_vs_{BASELINE}"] = _div(view.per_message(*key, BASELINE, cell["api"]), per_message)
        cell[f"speedup_vs_{SYNC_API}_api"] = _div(view.per_message(*key, cell["mode"], SYNC_API), per_message)
        cell[f"cpu_ratio_to_{BASELINE}"] = _div(view.cpu(*key, cell["mode"], cell["api"]),
                                                view.cpu(*key, BASELINE, cell["api"]))
        cell["ratio_to_floor"] = _div(per_message, view.floor(*key))
    return data


def status_text(status: shmgrpc.ChannelStatus) -> str:
    """'transport shm; co-located server pid 42' ("inline": plain gRPC)."""
    transports = ", then ".join(status.transports) or status.transport
    return f"transport {transports}; {status.reason}" + ("" if status.settled else " (not settled)")


# --- Reports, from results.json ---------------------------------------------


class Results:
    """One phase's results.json, indexed for the reports and the plot."""

    def __init__(self, data: dict) -> None:
        self.data = data
        options = data["options"]
        self.modes: List[str] = options["modes"]
        self.apis: List[str] = options.get("apis", [SYNC_API])
        self.plan: Dict[str, Dict[str, List[int]]] = options["plan"]
        self.repeat: int = options["repeat"]
        self.threshold: int = options["threshold"]
        self.cells = {
            (c["message"], c["shape"], c["size"], c.get("api", SYNC_API), c["mode"]): c for c in data["cells"]
        }
        self.floors = {(f["message"], f["size"]): f["one_way_median_ms"] for f in data["floor"]}

    def pairs(self) -> List[Tuple[str, str]]:
        """(message, shape) in the order they ran."""
        return [(m, s) for m in MESSAGES if m in self.plan for s in SHAPES if s in self.plan[m]]

    def sizes(self, message: str, shape: str, api: Optional[str] = None) -> List[int]:
        """The sizes measured, in api's cells or in any api's."""
        apis = self.apis if api is None else [api]
        return [
            size
            for size in self.plan.get(message, {}).get(shape, [])
            if any((message, shape, size, a, mode) in self.cells for a in apis for mode in self.modes)
        ]

    def cell(self, message: str, shape: str, size: int, mode: str, api: str = SYNC_API) -> Optional[dict]:
        return self.cells.get((message, shape, size, api, mode))

    def per_message(self, message: str, shape: str, size: int, mode: str, api: str = SYNC_API) -> Optional[float]:
        cell = self.cell(message, shape, size, mode, api)
        return None if cell is None or cell["errors"] else cell["per_message_ms"]

    def cpu(self, message: str, shape: str, size: int, mode: str, api: str = SYNC_API,
            side: str = "") -> Optional[float]:
        """CPU ms per message: client and server summed, or `side`'s alone."""
        cell = self.cell(message, shape, size, mode, api)
        key = f"{side}_cpu_per_message_ms" if side else "cpu_per_message_ms"
        return None if cell is None or cell["errors"] else cell.get(key)

    def floor(self, message: str, shape: str, size: int) -> Optional[float]:
        """The floor per reported unit: one way, or both ways for echoes."""
        one_way = self.floors.get((message, size))
        return None if one_way is None else one_way * directions(shape)


MESSAGE_TITLES = {
    "bytes": "bytes (one bytes field)",
    "floats": "floats (packed repeated float)",
    "records": "records (repeated {int64, string, double, bytes}, 44 B each)",
}
SHAPE_TITLES = {
    "unary": "unary echo: ms per call (request and reply)",
    "server_stream": "server streaming (download): ms per message",
    "client_stream": "client streaming (upload): ms per message",
    "pingpong": "bidi ping-pong (one message in flight, each comes back): ms per message",
    "bidi": "bidi echo stream, pipelined (each comes back): ms per message",
}


API_TITLES = {
    "sync": "grpc client, grpc server",
    "aio": "grpc.aio client, grpc.aio server",
    "aio-sync": "grpc.aio client, grpc server",
    "sync-aio": "grpc client, grpc.aio server",
}


def _cell_text(cell: Optional[dict]) -> str:
    if cell is None:
        return "-"
    if cell["errors"]:
        return "ERROR"
    # '*': some messages did not take the fast path (see the warnings).
    return fmt_ms(cell["per_message_ms"]) + ("*" if cell["fast_path_shortfalls"] else "")


def _title(message: str, shape: str, api: Optional[str] = None) -> str:
    title = f"{MESSAGE_TITLES[message]} / {SHAPE_TITLES[shape]}"
    return title if api is None else f"{title}\n  api {api}: {API_TITLES[api]}"


TABLE_LEGEND = (
    f"ms = median time; speedup = {BASELINE} ms / mode ms (same api); vs sync = the sync api's ms / this "
    "api's (same mode);\ncpu client, server = median CPU time (user + system, all threads) of each process, "
    f"ms per call or message; sum/{BASELINE} = CPU sum / {BASELINE}'s CPU sum (same api)"
)


def table(view: Results, message: str, shape: str, api: str = SYNC_API) -> str:
    """A row per size and mode: time, speedups, CPU time of both processes."""
    fast = [mode for mode in SHMGRPC_MODES if mode in view.modes]
    vs_sync = api != SYNC_API and SYNC_API in view.apis
    header = ["size", "mode", "ms", "speedup"] + (["vs sync"] if vs_sync else [])
    header += ["cpu client", "server", "sum", f"sum/{BASELINE}", "/floor", "floor"]
    rows = [header]
    for size in view.sizes(message, shape, api):
        key = (message, shape, size)
        base, base_cpu = view.per_message(*key, BASELINE, api), view.cpu(*key, BASELINE, api)
        floor = view.floor(*key)
        for index, mode in enumerate(view.modes):
            per, cpu = view.per_message(*key, mode, api), view.cpu(*key, mode, api)
            first = index == 0
            row = [format_size(size) if first else "", mode, _cell_text(view.cell(*key, mode, api))]
            row.append("" if mode == BASELINE else ratio(_div(base, per)))
            if vs_sync:
                row.append(ratio(_div(view.per_message(*key, mode, SYNC_API), per)))
            row += [fmt_ms(view.cpu(*key, mode, api, side)) for side in ("client", "server")]
            row += [fmt_ms(cpu), "" if mode == BASELINE else ratio(_div(cpu, base_cpu))]
            row += [ratio(_div(per, floor)) if mode in fast else "", fmt_ms(floor) if first else ""]
            rows.append(row)
    return "\n".join(format_table(rows))


def below_threshold_note(view: Results, message: str, shape: str, api: str = SYNC_API) -> List[str]:
    """What shmgrpc on the channel costs where it only passes messages through."""
    notes = []
    for size in view.sizes(message, shape, api):
        cells = [view.cell(message, shape, size, mode, api) for mode in view.modes]
        if any(cell and cell["wire_size"] >= view.threshold for cell in cells):
            continue
        base = view.per_message(message, shape, size, BASELINE, api)
        costs = [
            f"{mode} {100 * (overhead - 1):+.1f}%"
            for mode in (METADATA_MODE,) + SHMGRPC_MODES
            for overhead in [_div(view.per_message(message, shape, size, mode, api), base)]
            if overhead is not None
        ]
        if costs:
            notes.append(
                f"{format_size(size)}, below the {format_size(view.threshold)} threshold (inline): "
                f"{', '.join(costs)} vs {BASELINE}"
            )
    return notes


PEAK_MIN_SIZE = MiB  # smaller echoes barely move the resident set


def peak_table(view: Results) -> str:
    """Per process: the peak, and how far it rose above the resident set the
    call started from, both in MiB and as a multiple of the payload."""
    rows = [["message", "size", "mode"]]
    for side in ("client", "server"):
        rows[0] += [f"{side} peak", "(x)", "+call", "(x)", "shmem"]
    for message in view.plan:
        for size in view.sizes(message, "unary"):
            if size < PEAK_MIN_SIZE:
                continue
            for api, mode in ((api, mode) for api in view.apis for mode in view.modes):
                cell = view.cell(message, "unary", size, mode, api)
                if not cell or not cell["peak_memory"]:
                    continue
                row = [message, format_size(size), column_name((api, mode))]
                for side in ("client", "server"):
                    peak = cell["peak_memory"][side]
                    row += [
                        f"{peak['vm_hwm_mib']:.0f}",
                        f"{peak['vm_hwm_x_payload']:.1f}",
                        f"{peak['growth_mib']:.0f}",
                        f"{peak['growth_x_payload']:.1f}",
                        f"{peak['rss_shmem_after_mib']:.0f}" if "rss_shmem_after_mib" in peak else "?",
                    ]
                rows.append(row)
    return "" if len(rows) == 1 else "\n".join(format_table(rows))


def checked_line(views: Sequence[Results]) -> str:
    cells = [cell for view in views for cell in view.data["cells"]]
    whole = sum(cell["checked_whole"] for cell in cells)
    sampled = sum(cell["checked_sampled"] for cell in cells)
    failed = sum(1 for cell in cells if cell["errors"])
    return (
        f"checked: {whole} messages compared whole, {sampled} spot-checked (stream messages above "
        f"{format_size(srv.STREAM_KEEP_MAX)}: item count, {srv.SAMPLE_WINDOWS + 2} windows); "
        + (f"{failed} cells FAILED (see the warnings)" if failed else "no problem found")
    )


def report_text(view: Results) -> str:
    data = view.data
    out = [
        f"shmgrpc bench, malloc {data['malloc']}: {machine_line(data['machine'])}",
        f"{rounds_text(view.repeat)}; floor = in-process serialize + copy + parse",
        TABLE_LEGEND,
    ]
    for message, shape in view.pairs():
        for api in view.apis:
            if not view.sizes(message, shape, api):
                continue
            out += ["", _title(message, shape, api)]
            if shape != "unary":
                out.append("  (the floor runs on one core; a stream overlaps sender and receiver, so it can beat it)")
            out.append(table(view, message, shape, api))
            out += [f"  {line}" for line in below_threshold_note(view, message, shape, api)]
    peaks = peak_table(view)
    if peaks:
        out += [
            "",
            f"peak memory over one unary echo ({format_size(PEAK_MIN_SIZE)} and up), MiB: peak = VmHWM after a "
            "reset (it counts\nthe shared pages a process touched), +call = peak minus the RSS the call started "
            "from, shmem =\nRssShmem after the call (the pool stays mapped, so all modes see it); (x) = multiple "
            "of the payload",
            peaks,
        ]
        if any(not c["peak_memory"]["client"]["peak_was_reset"] for c in data["cells"] if c["peak_memory"]):
            out.append("  (the peak could not be reset here: VmHWM is each process's lifetime peak)")
    out += ["", checked_line([view])]
    if data["shmgrpc_channel_text"]:
        out.append("shmgrpc channels at the end of the run:")
        out += [f"  {column}: {text}" for column, text in data["shmgrpc_channel_text"].items()]
    if data.get("server_cpu_per_snapshot_ms"):
        costs = ", ".join(f"{api} {fmt_ms(cost)} ms" for api, cost in data["server_cpu_per_snapshot_ms"].items())
        out.append(f"server CPU per stats snapshot, taken off every sample's: {costs}")
    out += [f"note: {line}" for line in data["notes"] + data["warnings"]]
    return "\n".join(out)


# --- The combined report of two malloc phases -------------------------------


def combined(phases: Dict[str, Results]) -> List[dict]:
    """Every timed cell of every phase, with its speedups against plain gRPC
    over unix with the default malloc and with its own."""
    base = phases.get(BASE_MALLOC)
    rows = []
    for malloc, view in phases.items():
        for (message, shape, size, api, mode), cell in view.cells.items():
            key = (message, shape, size)
            per = view.per_message(*key, mode, api)
            rows.append(
                {
                    "message": message,
                    "shape": shape,
                    "size": size,
                    "malloc": malloc,
                    "api": api,
                    "mode": mode,
                    "per_message_ms": per,
                    "cpu_per_message_ms": view.cpu(*key, mode, api),
                    f"speedup_vs_{BASELINE}_{BASE_MALLOC}_malloc": _div(
                        base.per_message(*key, BASELINE, api) if base else None, per
                    ),
                    f"speedup_vs_{BASELINE}_same_malloc": _div(view.per_message(*key, BASELINE, api), per),
                }
            )
    return rows


def combined_table(phases: Dict[str, Results], message: str, shape: str, api: str = SYNC_API) -> str:
    base = phases.get(BASE_MALLOC)
    modes = [mode for mode in MODES if any(mode in view.modes for view in phases.values())]
    fast = [mode for mode in (BASELINE,) + SHMGRPC_MODES if mode in modes]
    header = ["size", "malloc"] + modes + ["floor"] + [f"{mode} x" for mode in fast]
    header += [f"cpu {mode}" for mode in modes] + [f"cpu {mode}/base" for mode in fast if mode != BASELINE]
    rows = [header]
    sizes = sorted({size for view in phases.values() for size in view.sizes(message, shape, api)})
    for size in sizes:
        for malloc, view in phases.items():
            if size not in view.sizes(message, shape, api):
                continue
            row = [format_size(size), malloc]
            row += [_cell_text(view.cell(message, shape, size, mode, api)) for mode in modes]
            row.append(fmt_ms(view.floor(message, shape, size)))
            same_base = view.per_message(message, shape, size, BASELINE, api)
            first_base = base.per_message(message, shape, size, BASELINE, api) if base else None
            for mode in fast:
                per = view.per_message(message, shape, size, mode, api)
                text = "" if malloc == BASE_MALLOC and mode == BASELINE else ratio(_div(first_base, per))
                if malloc != BASE_MALLOC and mode != BASELINE:
                    text += f" ({ratio(_div(same_base, per))})"
                row.append(text)
            cpu = {mode: view.cpu(message, shape, size, mode, api) for mode in modes}
            row += [fmt_ms(cpu[mode]) for mode in modes]
            row += [ratio(_div(cpu[mode], cpu.get(BASELINE))) for mode in fast if mode != BASELINE]
            rows.append(row)
    return "\n".join(format_table(rows))


def combined_text(phases: Dict[str, Results]) -> str:
    first = next(iter(phases.values()))
    out = [
        f"shmgrpc bench, malloc {' and '.join(phases)}: {machine_line(first.data['machine'])}",
        f"{rounds_text(first.repeat)}; ms per call or per message; "
        f"'MODE x' = speedup: {BASELINE} with the {BASE_MALLOC} malloc / MODE, "
        f"in brackets {BASELINE} with the same malloc / MODE; 'cpu MODE' = CPU ms (client + server, user + "
        f"system) per call or message, 'cpu MODE/base' = that / {BASELINE}'s of the same malloc (each "
        "phase's report.txt has client and server apart)",
        "malloc keep = SHMGRPC_MALLOC=keep in both processes and every mode, plain gRPC included; "
        f"malloc hugepages = GLIBC_TUNABLES={HUGETLB_TUNABLE} the same way",
    ]
    pairs = []
    for view in phases.values():
        pairs += [pair for pair in view.pairs() if pair not in pairs]
    apis = list(dict.fromkeys(api for view in phases.values() for api in view.apis))
    for message, shape in pairs:
        for api in apis:
            if any(view.sizes(message, shape, api) for view in phases.values()):
                out += ["", _title(message, shape, api), combined_table(phases, message, shape, api)]
    out += ["", checked_line(list(phases.values()))]
    warnings = [
        f"{malloc}: interrupted: its cells hold what was measured until then"
        for malloc, view in phases.items()
        if view.data["interrupted"]
    ]
    warnings += [f"{malloc}: {line}" for malloc, view in phases.items() for line in view.data["warnings"]]
    out += [f"note: {line}" for line in warnings]
    return "\n".join(out)


# --- The plot ---------------------------------------------------------------

MODE_COLORS = {
    "grpc-tcp": "tab:brown",
    "grpc-unix": "tab:blue",
    "memfd": "tab:green",
    "shm": "tab:orange",
    "cma": "tab:red",
    METADATA_MODE: "tab:purple",
    FLOOR: "black",
}
# Line and marker per malloc phase (and api); the floor is dotted.
PHASE_STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), ((0, (5, 1, 1, 1, 1, 1)), "v"), (":", "D"),
                ((0, (8, 2)), "P")]


# Line style per malloc phase in the speed-up plot, and what each means.
MALLOC_STYLES: Dict[str, Any] = {"default": "-", "keep": "--", "hugepages": ":"}  # Any: matplotlib's Literal
MALLOC_LABELS = {
    "default": "default malloc",
    "keep": "warm memory (SHMGRPC_MALLOC=keep)",
    "hugepages": f"huge pages ({HUGETLB_TUNABLE})",
}
MODE_MARKERS = {"memfd": "o", "shm": "s", "cma": "^"}
# The speed-up plot's message and shape: the README's headline, where present.
SPEEDUP_PAIR = ("bytes", "unary")
SPEEDUP_TICKS = (0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100)


def write_plots(out: str, runs: Sequence[Tuple[str, Results]]) -> List[str]:
    """OUT/speedup.png (the figure to read first) and OUT/throughput.png
    (every message and shape); notes for what was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib is not installed (pip install 'shmgrpc[plot]'): speedup.png and throughput.png skipped"]
    for name, draw in (("speedup.png", speedup_figure), ("throughput.png", throughput_figure)):
        figure = draw(plt, runs)
        if figure is not None:
            figure.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")  # nothing cut off, whatever the fonts
            plt.close(figure)
    return []


def _size_axis(ax: Any, sizes: Sequence[int], label: bool = True) -> None:
    """Message sizes along x, log 2, a tick per size measured."""
    ax.set_xscale("log", base=2)
    ax.set_xlim(sizes[0] / 1.6, sizes[-1] * 1.6)
    ax.set_xticks(sizes, [short_size(size) for size in sizes], fontsize=8)
    if label:
        ax.set_xlabel("message size (K = KiB, M = MiB)", fontsize=9)


def speedup_lines(runs: Sequence[Tuple[str, Results]], message: str, shape: str
                  ) -> Dict[Tuple[str, str, str], List[Tuple[int, float]]]:
    """{(api, malloc, mode): [(size, speed-up)]}: each shmgrpc mode's median
    time against plain gRPC's over unix (BASELINE) in the same api and the
    same malloc phase, so that each line shows what shmgrpc alone adds."""
    lines: Dict[Tuple[str, str, str], List[Tuple[int, float]]] = {}
    for label, view in runs:
        malloc = label or view.data.get("malloc", BASE_MALLOC)
        for api in view.apis:
            for mode in (mode for mode in SHMGRPC_MODES if mode in view.modes):
                points = [(size, _div(view.per_message(message, shape, size, BASELINE, api),
                                      view.per_message(message, shape, size, mode, api)))
                          for size in view.sizes(message, shape, api)]
                kept = [(size, value) for size, value in points if value]
                if kept:
                    lines[(api, malloc, mode)] = kept
    return lines


def speedup_figure(plt: Any, runs: Sequence[Tuple[str, Results]]) -> Any:
    """How many times faster than plain gRPC, against message size, log-log:
    a panel per api, side by side on one y scale, a line per transport
    (colour, marker) and malloc phase (line style), 1x drawn across and the
    sizes that go inline (below the threshold) shaded. SPEEDUP_PAIR if the
    runs have it, else the first message and shape they ran."""
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    pairs = [pair for _, view in runs for pair in view.pairs() if view.sizes(*pair)]
    if not pairs:
        return None
    message, shape = SPEEDUP_PAIR if SPEEDUP_PAIR in pairs else pairs[0]
    lines = speedup_lines(runs, message, shape)
    if not lines:
        return None
    apis = [api for api in APIS if any(key[0] == api for key in lines)]
    mallocs = [malloc for malloc in MALLOCS if any(key[1] == malloc for key in lines)]
    modes = [mode for mode in SHMGRPC_MODES if any(key[2] == mode for key in lines)]
    sizes = sorted({size for points in lines.values() for size, _ in points})
    values = [value for points in lines.values() for _, value in points]
    low, high = min(0.7, min(values) / 1.2), max(2.0, max(values) * 1.25)
    threshold = min(view.threshold for _, view in runs)
    figure, axes = plt.subplots(1, len(apis), figsize=(0.8 + 4.4 * len(apis), 4.4), sharey=True, squeeze=False)
    for ax, api in zip(axes[0], apis):
        if sizes[0] < threshold:
            ax.axvspan(sizes[0] / 1.6, threshold, color="0.93", zorder=0)
            ax.text(sizes[0] / 1.45, high / 1.08, f"inline: below the\n{format_size(threshold)} threshold",
                    fontsize=8, color="0.4", va="top")
        ax.axhline(1.0, color="black", linewidth=1.0, zorder=1)
        ax.text(sizes[-1] * 1.5, 1.0, "plain gRPC = 1x", fontsize=8, ha="right", va="bottom")
        for (line_api, malloc, mode), points in lines.items():
            if line_api == api:
                # The default malloc, what an application has unless it opts in, drawn boldest.
                ax.plot(*zip(*points), color=MODE_COLORS[mode], linestyle=MALLOC_STYLES[malloc],
                        marker=MODE_MARKERS[mode], markersize=4.5, zorder=2,
                        linewidth=2.2 if malloc == BASE_MALLOC else 1.4)
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.yaxis.set_major_locator(ticker.FixedLocator([t for t in SPEEDUP_TICKS if low <= t <= high]))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, which="major", alpha=0.3)
        _size_axis(ax, sizes)
        ax.set_title(f"{api}: {API_TITLES[api]}", fontsize=10)
    axes[0][0].set_ylabel(f"speed-up over plain gRPC ({BASELINE})", fontsize=9)
    handles = [Line2D([], [], color=MODE_COLORS[mode], marker=MODE_MARKERS[mode], linewidth=2.2, label=mode)
               for mode in modes]
    handles += [Line2D([], [], color="0.3", linestyle=MALLOC_STYLES[malloc], label=MALLOC_LABELS[malloc],
                       linewidth=2.2 if malloc == BASE_MALLOC else 1.4) for malloc in mallocs]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    repeat = max(view.repeat for _, view in runs)
    title = [
        f"How many times faster than plain gRPC over a unix socket: {shape.replace('_', ' ')} calls, "
        f"{MESSAGE_TITLES[message]}",
        f"each point: plain gRPC's median time / shmgrpc's, both with the same API and malloc; "
        f"{rounds_text(repeat)}",
        machine_line(runs[0][1].data["machine"]),
    ]
    figure.suptitle("\n".join(title), fontsize=9)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    return figure


def throughput_figure(plt: Any, runs: Sequence[Tuple[str, Results]]) -> Any:
    """Payload throughput against size, log-log: one panel per message and
    RPC shape, a line per mode (and per malloc phase), the legend below the
    panels; runs of more than one api get a line per api as well."""
    from matplotlib import ticker

    pairs: List[Tuple[str, str]] = []
    for _, view in runs:
        pairs += [pair for pair in view.pairs() if pair not in pairs and view.sizes(*pair)]
    if not pairs:
        return None
    messages = [m for m in MESSAGES if any(pair[0] == m for pair in pairs)]
    shapes = [s for s in SHAPES if any(pair[1] == s for pair in pairs)]
    all_sizes = sorted({size for _, view in runs for pair in pairs for size in view.sizes(*pair)})
    width = max(8.0, 3.7 * len(shapes) + 0.6)  # inches; the legend and title need 8
    figure, axes = plt.subplots(len(messages), len(shapes), figsize=(width, 3.0 * len(messages) + 1.2), squeeze=False)
    handles: Dict[str, Any] = {}
    for row, message in enumerate(messages):
        for col, shape in enumerate(shapes):
            ax = axes[row][col]
            if (message, shape) not in pairs:
                ax.set_axis_off()
                continue
            lines = [(label, view, api) for label, view in runs for api in view.apis]
            for index, (label, view, api) in enumerate(lines):
                linestyle, marker = PHASE_STYLES[index % len(PHASE_STYLES)]
                sizes = view.sizes(message, shape, api)
                # The floor once per phase: it is the same for every api.
                for mode in view.modes + ([FLOOR] if api == view.apis[0] else []):
                    times = [
                        view.floor(message, shape, size)
                        if mode == FLOOR
                        else view.per_message(message, shape, size, mode, api)
                        for size in sizes
                    ]
                    points = [(size, mib_per_s(shape, size, t)) for size, t in zip(sizes, times)]
                    points = [(size, value) for size, value in points if value]
                    if not points:
                        continue
                    name = "in-process floor" if mode == FLOOR else mode
                    name += f", api {api}" if mode != FLOOR and len(view.apis) > 1 else ""
                    name += f", malloc {label}" if label else ""
                    (line,) = ax.plot(
                        *zip(*points),
                        color=MODE_COLORS[mode],
                        linestyle=":" if mode == FLOOR and index == 0 else linestyle,
                        marker=marker,
                        markersize=4,
                        linewidth=1.2,
                        label=name,
                    )
                    handles.setdefault(name, line)
            _size_axis(ax, all_sizes, label=row == len(messages) - 1 or (message, shape) == pairs[-1])
            ax.set_yscale("log")
            # Labelled y ticks at 1, 2 and 5 of each decade: a panel may span less than one.
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            ax.minorticks_off()
            ax.tick_params(axis="y", labelsize=8)
            ax.set_title(f"{message} / {shape}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            if col == 0:
                ax.set_ylabel("payload MiB/s", fontsize=9)
    # The legend below the panels, in as many columns as its labels fit.
    label_inches = 0.5 + 0.085 * max(len(name) for name in handles)
    columns = max(1, min(len(handles), int(width // label_inches)))
    legend_rows = math.ceil(len(handles) / columns)
    figure.legend(list(handles.values()), list(handles), loc="lower center", ncol=columns, fontsize=9, frameon=False)
    title = ["shmgrpc bench: payload throughput, MiB/s (echoes count both ways)"]
    title += textwrap.wrap(machine_line(runs[0][1].data["machine"]), width=int(width * 12))
    figure.suptitle("\n".join(title), fontsize=9)
    # Room for the legend below the panels, which keep their height: a
    # line per mode, phase and api can be many rows.
    height = figure.get_figheight() + 0.22 * legend_rows
    figure.set_figheight(height)
    # tight_layout keeps the panels clear of the suptitle, not of a figure legend.
    figure.tight_layout(rect=(0, (0.22 * legend_rows + 0.1) / height, 1, 1))
    return figure


# --- main -------------------------------------------------------------------


def _interrupt(signum, frame):
    # SIGTERM ends the run like Ctrl-C: the server is stopped and what was
    # measured is still reported.
    raise KeyboardInterrupt


def measure(args: argparse.Namespace, config: Config) -> Tuple[Bench, bool]:
    """Run the benchmark against fresh servers (one per server API the
    --apis name); (bench, interrupted)."""
    with tempfile.TemporaryDirectory(prefix="shmgrpc-bench-") as directory, contextlib.ExitStack() as stack:
        servers: Dict[str, Server] = {}
        for server_api in dict.fromkeys(sides(api)[1] for api in args.apis):
            server = start_server(os.path.join(directory, f"bench-{server_api}.sock"), server_api)
            stack.callback(stop_server, server.process)  # after the channels are closed
            servers[server_api] = server
        clients = Clients()
        stack.callback(clients.close)
        open_modes(args.apis, args.modes, args.messages, servers, clients)
        # The control calls (stats, peak memory) go over plain sync channels of their own.
        controls = {}
        for server_api, server in servers.items():
            clients.channels.append(open_channel(f"unix:{server.unix_path}"))
            controls[server_api] = Stubs.on(clients.channels[-1], args.messages)
        bench = Bench(args, clients, controls, config)
        interrupted = False
        try:
            bench.run()
        except KeyboardInterrupt:
            progress("interrupted: reporting what was measured so far")
            interrupted = True
        bench.record_channels(clients.statuses())
        return bench, interrupted


def _save(out: str, data: dict, text: str) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, "report.txt"), "w") as f:
        f.write(text + "\n")


def run_phase(args: argparse.Namespace, command: str) -> int:
    """One malloc phase in this process: measure, report, write the outputs."""
    malloc = args.malloc[0]
    notes: List[str] = []
    if args.repeat < DEFAULT_REPEAT:
        notes.append(f"--repeat {args.repeat}: a median of fewer than {DEFAULT_REPEAT} rounds is noisy")
    if os.environ.get("GLIBC_TUNABLES"):
        notes.append(f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']} (client and server, every mode)")
    if malloc == "hugepages" and not hugetlb_requested(os.environ):
        # GLIBC_TUNABLES is read when a process starts: too late for this
        # one, so run again with it (the server inherits it: both sides and
        # every mode get the same allocator).
        os.execve(sys.executable, [sys.executable, "-m", "shmgrpc.tools.bench", *sys.argv[1:]], with_hugetlb(os.environ))
    if malloc == "hugepages" and thp_mode() in ("never", "unknown"):
        notes.append("hugepages: transparent huge pages are off here (/sys/kernel/mm/transparent_hugepage/"
                     "enabled = never): this phase is the default malloc")
    if malloc == "keep":
        # Before any thread: M_ARENA_MAX shapes only arenas made afterwards.
        # The server inherits the variable and applies it when it is built.
        os.environ["SHMGRPC_MALLOC"] = "keep"
        if not tune_malloc():
            notes.append("SHMGRPC_MALLOC=keep is not (fully) in effect here: see the log")
        notes.append("SHMGRPC_MALLOC=keep (client and server, every mode: plain gRPC gets the same warm malloc)")
    elif os.environ.get("SHMGRPC_MALLOC"):
        # The server would inherit it and warm its malloc behind our back.
        notes.append(f"SHMGRPC_MALLOC={os.environ.pop('SHMGRPC_MALLOC')} ignored: this phase is --malloc default")
    config = Config.from_env()
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    bench, interrupted = measure(args, config)
    elapsed = time.monotonic() - started

    data = results(bench, command, malloc, notes, elapsed, interrupted)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        data["notes"] += write_plots(args.out, [("", Results(data))])
    text = report_text(Results(data)) + f"\n\ntook {elapsed:.0f} s"
    if args.out:
        _save(args.out, data, text)
    print("\n" + text + (f"; results in {args.out}" if args.out else ""), flush=True)
    failed = any(cell["errors"] for cell in data["cells"])
    return 130 if interrupted else 1 if failed else 0


class _Phases:
    """Signals while phases run: SIGTERM is passed on to the running phase;
    Ctrl-C reaches it from the terminal anyway. Either stops the rest."""

    def __init__(self) -> None:
        self.child: Optional[subprocess.Popen] = None
        self.stopped = False

    def handle(self, signum, frame) -> None:
        self.stopped = True
        if signum == signal.SIGTERM and self.child and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def _without(argv: Sequence[str], options: Sequence[str]) -> List[str]:
    """argv less `--option value` and `--option=value` of these options."""
    kept: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in options:
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


def run_phases(args: argparse.Namespace, argv: List[str], command: str) -> int:
    """Each malloc phase in a process of its own (the keep settings must come
    before any thread), then the combined report."""
    started = time.monotonic()
    state = _Phases()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, state.handle)
    statuses = []
    phases: Dict[str, Results] = {}
    with contextlib.ExitStack() as stack:
        out = args.out or stack.enter_context(tempfile.TemporaryDirectory(prefix="shmgrpc-bench-"))
        for malloc in args.malloc:
            if state.stopped:
                break
            phase_out = os.path.join(out, malloc)
            # The last --malloc and --out win (argparse), whatever _without() missed.
            phase_argv = _without(argv, ("--malloc", "--out")) + ["--malloc", malloc, "--out", phase_out]
            phase_command = [sys.executable, "-m", "shmgrpc.tools.bench", *phase_argv]
            progress(f"=== malloc phase {malloc}: {shlex.join(['python', *phase_command[1:]])}")
            env = _package_env()
            state.child = subprocess.Popen(phase_command, env=with_hugetlb(env) if malloc == "hugepages" else env)
            # A signal runs state.handle and the wait goes on (PEP 475).
            statuses.append(state.child.wait())
            try:
                with open(os.path.join(phase_out, "results.json")) as f:
                    phases[malloc] = Results(json.load(f))
            except (OSError, ValueError) as exc:
                progress(f"!! malloc phase {malloc} left no results: {exc}")
        elapsed = time.monotonic() - started
        if not phases:
            return 130 if state.stopped else 1
        text = combined_text(phases) + f"\n\nall phases took {elapsed:.0f} s"
        if args.out:
            runs = list(phases.items())
            text += "".join(f"\nnote: {note}" for note in write_plots(out, runs))
            data = {
                "command": command,
                "machine": runs[0][1].data["machine"],
                "elapsed_s": round(elapsed, 1),
                "phases": {malloc: view.data for malloc, view in runs},
                "combined": combined(phases),
            }
            _save(out, data, text)
            text += f"\nresults: {out} (combined), {os.path.join(out, '<malloc>')} (each phase)"
    print("\n" + text, flush=True)
    if state.stopped or 130 in statuses:
        return 130
    return 1 if any(statuses) or len(phases) < len(args.malloc) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", "shmgrpc.tools.bench", *argv])
    if any(message != "bytes" for message in args.messages):
        try:
            srv.bench_pb2()
        except ImportError as exc:
            sys.exit(f"shmgrpc.tools.bench: {exc} (or --messages bytes)")
    if len(args.malloc) > 1:
        return run_phases(args, argv, command)
    return run_phase(args, command)


if __name__ == "__main__":
    sys.exit(main())
