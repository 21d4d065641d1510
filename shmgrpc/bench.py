"""How much faster shmgrpc makes large messages, measured: `python -m shmgrpc.bench`.

One server process (shmgrpc._bench_server, always a shmgrpc.server()) and
this client, on the same host. Each *mode* is a way for the client to reach
it, over a channel of its own:

    grpc-tcp    plain gRPC over 127.0.0.1 TCP
    grpc-unix   plain gRPC over a unix socket (the baseline)
    memfd       shmgrpc.intercept_channel, transport=memfd, over the unix socket
    shm         shmgrpc.intercept_channel, transport=shm, over the unix socket
    cma         shmgrpc.intercept_channel, transport=cma, over the unix socket

Messages below shmgrpc's threshold (128 KiB unless SHMGRPC_THRESHOLD says
otherwise) travel inline in every mode, so at 4 KiB the shmgrpc rows
measure what merely having shmgrpc on the channel costs.

Each *shape* is an RPC pattern: unary (echo: the payload goes and comes
back), server_stream (download), client_stream (upload) and bidi (echo
stream). Streams carry `count` messages; their times are per message.

Method: for each size and shape, one warm-up call per mode (connections,
handshakes and pool growth are not measured), then `--repeat` rounds, each
running every mode once with the mode order rotated round by round; the
statistic is the median. Every reply is checked. Beside each size, the
in-process *floor*: protobuf serialize, one copy into a pre-faulted shared
mapping, parse from it; that is what a shared-memory transport cannot avoid.
It takes a turn in every round too. After each size's rounds, one more echo
per mode measures both processes' peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
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
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
from google.protobuf import __version__ as protobuf_version
from google.protobuf.wrappers_pb2 import BytesValue

import shmgrpc

from . import _bench_server as srv
from ._malloc import tune_malloc
from .config import Config, parse_size
from .errors import ConfigError

KiB, MiB = srv.KiB, srv.MiB

SHAPES = ("unary", "server_stream", "client_stream", "bidi")
DEFAULT_SHAPES = ("unary", "server_stream", "client_stream")
PAYLOAD_UP = ("unary", "client_stream", "bidi")  # shapes whose requests carry the payload
PAYLOAD_DOWN = ("unary", "server_stream", "bidi")  # shapes whose replies do
DEFAULT_SIZES = "4KiB,64KiB,1MiB,16MiB,64MiB,256MiB"
QUICK_SIZES = "4KiB,1MiB,64MiB"
QUICK_SHAPES = ("unary",)
PLAIN_MODES = ("grpc-tcp", "grpc-unix")
SHMGRPC_MODES = ("memfd", "shm", "cma")  # each is also the transport it forces
MODES = PLAIN_MODES + SHMGRPC_MODES
BASELINE = "grpc-unix"  # what shmgrpc replaces: the same socket, plain gRPC

# Fewer rounds make the median a coin toss on a busy machine.
DEFAULT_REPEAT = 5
# The in-process floor takes its turn in every round, as a mode does, so
# that it sees the same moments of a busy machine.
FLOOR = "floor"

# A stream carries about this many bytes, so that each stream of big messages
# costs about one 256 MiB echo and the full run stays within ~15 minutes on
# 2 cores; within these bounds on the message count.
DEFAULT_STREAM_BYTES = 256 * MiB
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


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m shmgrpc.bench",
        description="Benchmark shmgrpc against plain gRPC on this host.",
    )
    parser.add_argument("--sizes", type=_sizes, help=f"message sizes (default {DEFAULT_SIZES})")
    parser.add_argument(
        "--shapes",
        type=_choices(SHAPES, "--shapes"),
        help=f"RPC shapes among {', '.join(SHAPES)} (default {','.join(DEFAULT_SHAPES)})",
    )
    parser.add_argument(
        "--modes",
        type=_choices(MODES, "--modes"),
        default=list(MODES),
        help=f"modes among {', '.join(MODES)} (default: all)",
    )
    parser.add_argument(
        "--repeat", type=int, default=DEFAULT_REPEAT, help=f"rounds per cell (default {DEFAULT_REPEAT})"
    )
    parser.add_argument(
        "--stream-bytes",
        type=_size,
        default=DEFAULT_STREAM_BYTES,
        help="about how many bytes one stream carries (default 256MiB)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"sizes {QUICK_SIZES}, unary only (explicit options win)"
    )
    parser.add_argument(
        "--hugepages",
        action="store_true",
        help="run every mode (plain gRPC too) with glibc malloc on transparent huge pages "
        f"({HUGEPAGES_TUNABLE}): large-message CPython spends most of its time in page faults",
    )
    parser.add_argument(
        "--malloc",
        choices=("default", "keep"),
        default="default",
        help="keep: run both processes, every mode (plain gRPC too), with SHMGRPC_MALLOC=keep "
        "(glibc keeps freed memory warm; see shmgrpc.tune_malloc)",
    )
    parser.add_argument("--out", help="directory for results.json and throughput.png")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.sizes is None:
        args.sizes = _sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.shapes is None:
        args.shapes = list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    return args


# --- Output helpers ---------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def human_size(size: int) -> str:
    for unit, scale in (("GiB", 1024 * MiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def ms(ns: Optional[float]) -> str:
    """Milliseconds with three significant digits, '-' for no value."""
    if ns is None:
        return "-"
    value = ns / 1e6
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


# --- The server process -----------------------------------------------------


@dataclasses.dataclass
class Server:
    process: subprocess.Popen
    tcp_port: int
    unix_path: str


def start_server(unix_path: str) -> Server:
    """Start the bench server and wait for its ready line."""
    # The server imports this very shmgrpc, installed or not (a checkout).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    module = srv.__name__
    command = [sys.executable, "-m", module, "--unix", unix_path, "--parent", str(os.getpid())]
    # Its own session: Ctrl-C reaches only the bench, which then stops the
    # server itself (stop_server), in order.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, start_new_session=True, text=True)
    try:
        ready = _read_ready_line(process)
    except BaseException:
        stop_server(process)
        raise
    return Server(process, ready["tcp_port"], ready["unix"])


def _read_ready_line(process: subprocess.Popen) -> dict:
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
class Stubs:
    """The bench methods as callables on one channel."""

    echo: Callable
    download: Callable
    upload: Callable
    echo_stream: Callable
    peak: Callable
    stats: Callable

    @classmethod
    def on(cls, channel: grpc.Channel) -> "Stubs":
        io = dict(
            request_serializer=BytesValue.SerializeToString, response_deserializer=BytesValue.FromString
        )
        return cls(
            echo=channel.unary_unary(srv.ECHO, **io),
            download=channel.unary_stream(srv.DOWNLOAD, **io),
            upload=channel.stream_unary(srv.UPLOAD, **io),
            echo_stream=channel.stream_stream(srv.ECHO_STREAM, **io),
            peak=channel.unary_unary(srv.PEAK, **io),
            stats=channel.unary_unary(srv.STATS, **io),
        )


# Each mode gets connections of its own: by default gRPC shares one
# connection between channels with equal targets and options, and then plain
# and shmgrpc calls would interleave on it.
CHANNEL_OPTIONS = srv.GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]


def open_channel(target: str) -> grpc.Channel:
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=SERVER_START_TIMEOUT)
    return channel


@dataclasses.dataclass
class Clients:
    """Stubs per mode, and the channels to close when done."""

    stubs: Dict[str, Stubs] = dataclasses.field(default_factory=dict)
    channels: List[grpc.Channel] = dataclasses.field(default_factory=list)
    shmgrpc: Dict[str, "shmgrpc.Channel"] = dataclasses.field(default_factory=dict)  # by mode

    def close(self) -> None:
        # A shmgrpc channel closes the grpc channel it wraps and lets go of
        # its shared memory.
        for channel in self.channels:
            channel.close()

    def statuses(self) -> Dict[str, "shmgrpc.ChannelStatus"]:
        return {mode: shmgrpc.channel_status(channel) for mode, channel in self.shmgrpc.items()}


def open_modes(names: Sequence[str], server: Server, clients: Clients) -> None:
    """Open a channel per mode into `clients`."""
    for name in names:
        target = f"127.0.0.1:{server.tcp_port}" if name == "grpc-tcp" else f"unix:{server.unix_path}"
        channel = open_channel(target)
        if name in SHMGRPC_MODES:
            # Told the channel's options, shmgrpc offloads replies up to the
            # raised receive limit (without them it assumes gRPC's 4 MiB).
            channel = shmgrpc.intercept_channel(channel, Config.from_env(transport=name), options=CHANNEL_OPTIONS)
            clients.shmgrpc[name] = channel
        clients.channels.append(channel)
        clients.stubs[name] = Stubs.on(channel)


# --- One measured call per shape --------------------------------------------


@dataclasses.dataclass
class Job:
    """What one cell sends: `count` messages of `size` bytes."""

    shape: str
    size: int
    count: int
    payload: bytes
    check: srv.PayloadCheck


def directions(shape: str) -> int:
    """How often each message crosses: twice in an echo, else once."""
    return (shape in PAYLOAD_UP) + (shape in PAYLOAD_DOWN)


def stream_count(shape: str, size: int, stream_bytes: int) -> int:
    if shape == "unary":
        return 1
    return max(STREAM_MIN_COUNT, min(STREAM_MAX_COUNT, stream_bytes // size))


def _messages(job: Job) -> Iterator[BytesValue]:
    for _ in range(job.count):
        yield BytesValue(value=job.payload)


def _drain(replies: Iterator[BytesValue], job: Job) -> Tuple[int, List[bytes], Optional[str]]:
    """Consume a reply stream: (count, payloads kept for a whole check, problem).

    Payloads that will be compared whole are kept and compared after the
    clock stops; bigger ones get the sampled check (microseconds) here.
    """
    count, kept, problem = 0, [], None
    for reply in replies:
        count += 1
        if job.check.compares_whole:
            kept.append(reply.value)
        elif problem is None:
            problem = job.check.problem(reply.value, whole=False)
    return count, kept, problem


def _stream_problem(job: Job, count: int, kept: List[bytes], problem: Optional[str]) -> Optional[str]:
    if count != job.count:
        return f"got {count} messages, expected {job.count}"
    for value in kept:
        problem = problem or job.check.problem(value)
    return problem


# A sample of small echoes is a batch: one ~1 ms call mostly measures the
# scheduler's wake-up jitter. Batches carry about this many payload bytes.
BATCH_BYTES = 16 * MiB
MAX_BATCH = 200


def run_unary(stubs: Stubs, job: Job) -> Tuple[int, Optional[str]]:
    """Time of one echo: the mean over a batch for small payloads."""
    calls = max(1, min(MAX_BATCH, BATCH_BYTES // max(1, job.size)))
    request = BytesValue(value=job.payload)
    start = time.perf_counter_ns()
    for _ in range(calls):
        reply = stubs.echo(request, timeout=CALL_TIMEOUT)
    elapsed = time.perf_counter_ns() - start
    return elapsed // calls, job.check.problem(reply.value)


def run_server_stream(stubs: Stubs, job: Job) -> Tuple[int, Optional[str]]:
    request = BytesValue(value=srv.STREAM_REQUEST.pack(job.size, job.count))
    start = time.perf_counter_ns()
    drained = _drain(stubs.download(request, timeout=CALL_TIMEOUT), job)
    elapsed = time.perf_counter_ns() - start
    return elapsed, _stream_problem(job, *drained)


def run_client_stream(stubs: Stubs, job: Job) -> Tuple[int, Optional[str]]:
    start = time.perf_counter_ns()
    reply = stubs.upload(_messages(job), timeout=CALL_TIMEOUT)
    elapsed = time.perf_counter_ns() - start
    summary = json.loads(reply.value)
    if summary["count"] != job.count or summary["bytes"] != job.count * job.size:
        return elapsed, f"server got {summary['count']} messages, {summary['bytes']} bytes"
    return elapsed, summary["problem"] and f"server: {summary['problem']}"


def run_bidi(stubs: Stubs, job: Job) -> Tuple[int, Optional[str]]:
    start = time.perf_counter_ns()
    drained = _drain(stubs.echo_stream(_messages(job), timeout=CALL_TIMEOUT), job)
    elapsed = time.perf_counter_ns() - start
    return elapsed, _stream_problem(job, *drained)


RUNNERS = {
    "unary": run_unary,
    "server_stream": run_server_stream,
    "client_stream": run_client_stream,
    "bidi": run_bidi,
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


def counters(stats: Optional[dict]) -> dict:
    return {key: stats[key] for key in COUNTERS if stats and key in stats}


class StatsProbe:
    """Snapshots of shmgrpc.stats() in both processes, as deltas per call."""

    def __init__(self, control: Stubs) -> None:
        self._control = control
        self._last = self._snapshot()

    def _snapshot(self) -> Tuple[dict, dict]:
        server = json.loads(self._control.stats(BytesValue(), timeout=CALL_TIMEOUT).value)
        return counters(srv.shmgrpc_stats()), counters(server)

    def delta(self) -> Tuple[dict, dict]:
        """(client, server) counter changes since the last call."""
        now = self._snapshot()
        client, server = _diff(now[0], self._last[0]), _diff(now[1], self._last[1])
        self._last = now
        return client, server


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


def floor_one_way(payload: bytes, buf: mmap.mmap) -> int:
    """Serialize, copy into a shared mapping, parse from it: the ns taken."""
    start = time.perf_counter_ns()
    wire = BytesValue(value=payload).SerializeToString()
    buf[: len(wire)] = wire
    with memoryview(buf)[: len(wire)] as view:
        message = BytesValue.FromString(view)
    elapsed = time.perf_counter_ns() - start
    if message.value != payload:
        raise AssertionError("the floor's round trip changed the payload")
    return elapsed


@contextlib.contextmanager
def floor_buffer(payload: bytes) -> Iterator[mmap.mmap]:
    """A mapping for floor_one_way, warmed up."""
    length = len(BytesValue(value=payload).SerializeToString())
    # A shared anonymous mapping is shmem, as a /dev/shm segment is; writing
    # every page first keeps page faults out of the measurement, as a warm
    # pool would.
    with mmap.mmap(-1, length) as buf:
        for offset in range(0, length, mmap.PAGESIZE):
            buf[offset] = 0
        floor_one_way(payload, buf)
        yield buf


# --- Peak memory ------------------------------------------------------------


def measure_peak(stubs: Stubs, control: Stubs, job: Job) -> dict:
    """Peak memory of both processes over one unary echo, after resets."""
    client_reset = srv.reset_peak()
    client_base = srv.memory_status()
    server_base = json.loads(control.peak(BytesValue(), timeout=CALL_TIMEOUT).value)  # also resets
    run_unary(stubs, job)
    server = json.loads(control.peak(BytesValue(), timeout=CALL_TIMEOUT).value)
    client = srv.memory_status()
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


@dataclasses.dataclass
class Cell:
    """One (shape, size, mode): its samples and what was seen along the way."""

    shape: str
    size: int
    count: int
    mode: str
    samples_ns: List[int] = dataclasses.field(default_factory=list)
    errors: List[str] = dataclasses.field(default_factory=list)
    shortfalls: List[str] = dataclasses.field(default_factory=list)
    client_stats: dict = dataclasses.field(default_factory=dict)
    server_stats: dict = dataclasses.field(default_factory=dict)
    peak: Optional[dict] = None

    @property
    def median_ns(self) -> Optional[float]:
        return statistics.median(self.samples_ns) if self.samples_ns else None

    @property
    def per_message_ns(self) -> Optional[float]:
        median = self.median_ns
        return None if median is None else median / self.count


def _last(samples: List[int]) -> Optional[int]:
    return samples[-1] if samples else None


class Bench:
    """The run: cells filled size by size, shape by shape."""

    def __init__(self, args: argparse.Namespace, stubs: Dict[str, Stubs], control: Stubs, threshold: int):
        self.args = args
        self.stubs = stubs
        self.modes = list(stubs)
        self.control = control
        self.threshold = threshold
        # shmgrpc.stats() shows whether the big messages took the fast path.
        self.probe = StatsProbe(control)
        # Each shmgrpc mode's channel status at the end of the run.
        self.channels: Dict[str, shmgrpc.ChannelStatus] = {}
        self.cells: Dict[Tuple[str, int, str], Cell] = {}
        self.floors: Dict[int, List[int]] = {}
        self.warnings: List[str] = []

    def run(self) -> None:
        for size in self.args.sizes:
            progress(f"== {human_size(size)}: building the payload")
            payload = srv.pattern(size)
            check = srv.PayloadCheck(size, payload)
            self.floors[size] = []
            unary = None
            with floor_buffer(payload) as buf:
                for shape in self.args.shapes:
                    job = Job(shape, size, stream_count(shape, size, self.args.stream_bytes), payload, check)
                    cells = self.run_cell(job, buf)
                    unary = (cells, job) if shape == "unary" else unary
            # Now that the floor's mapping is gone from the resident set.
            if unary:
                self.measure_peaks(*unary)
            del payload, check, unary

    def run_cell(self, job: Job, floor_buf: mmap.mmap) -> Dict[str, Cell]:
        cells = {mode: Cell(job.shape, job.size, job.count, mode) for mode in self.modes}
        for mode in self.modes:
            self.cells[(job.shape, job.size, mode)] = cells[mode]
        label = f"{job.shape} {human_size(job.size)}" + (f" x{job.count}" if job.count > 1 else "")
        progress(f"-- {label}: warm-up")
        for mode in self.modes:
            self.sample(cells[mode], job, record=False)
        turns = self.modes + [FLOOR]
        for round_ in range(self.args.repeat):
            first = round_ % len(turns)
            for name in turns[first:] + turns[:first]:
                if name == FLOOR:
                    self.floors[job.size].append(floor_one_way(job.payload, floor_buf))
                else:
                    self.sample(cells[name], job, record=True)
            latest = "  ".join(f"{mode} {ms(_last(cells[mode].samples_ns))}" for mode in self.modes)
            floor = ms(_last(self.floors[job.size]))
            progress(
                f"   {label} round {round_ + 1}/{self.args.repeat}, ms: {latest}  (floor one way {floor})"
            )
        return cells

    def measure_peaks(self, cells: Dict[str, Cell], job: Job) -> None:
        """Peak memory over one more echo per mode (the pool is warm by now)."""
        for mode, cell in cells.items():
            if cell.errors:
                continue
            try:
                cell.peak = measure_peak(self.stubs[mode], self.control, job)
            except grpc.RpcError as exc:
                self.warn(f"peak memory, {human_size(job.size)} {mode}: {exc.code().name}: {exc.details()}")
        self.probe.delta()  # these calls belong to no cell

    def sample(self, cell: Cell, job: Job, record: bool) -> None:
        if cell.errors:  # one broken mode must not stop the others
            return
        try:
            elapsed, problem = RUNNERS[job.shape](self.stubs[cell.mode], job)
        except grpc.RpcError as exc:
            elapsed, problem = None, f"{exc.code().name}: {exc.details()}"
        if problem:
            cell.errors.append(problem)
            self.warn(f"{job.shape} {human_size(job.size)} {cell.mode}: {problem}")
        elif record:
            cell.samples_ns.append(elapsed)
        self.account(cell, job, record=record and not problem)

    def account(self, cell: Cell, job: Job, record: bool) -> None:
        """Attribute shmgrpc's counters since the last sample to this one, and
        check that a big message took the mode's fast path."""
        client, server = self.probe.delta()
        if not record:
            return
        _add(cell.client_stats, client)
        _add(cell.server_stats, server)
        if cell.mode in SHMGRPC_MODES and job.size >= self.threshold:
            shortfall = offload_shortfall(job, cell.mode, client)
            if shortfall and not cell.shortfalls:
                self.warn(f"{job.shape} {human_size(job.size)} {cell.mode}: {shortfall}")
            if shortfall:
                cell.shortfalls.append(shortfall)

    def record_channels(self, statuses: Dict[str, shmgrpc.ChannelStatus]) -> None:
        """Each shmgrpc mode's channel status; a warning for a channel that
        does not (or no longer does) use its mode's transport."""
        self.channels = dict(statuses)
        for mode, status in statuses.items():
            if status.transport != mode:
                self.warn(f"the {mode} channel ends the run with transport {status.transport}: {status.reason}")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        progress(f"!! {message}")


# --- Report -----------------------------------------------------------------

SHAPE_TITLES = {
    "unary": "unary echo: ms per call (request and reply)",
    "server_stream": "server streaming (download): ms per message",
    "client_stream": "client streaming (upload): ms per message",
    "bidi": "bidi echo stream: ms per message (each comes back)",
}


def floor_ns(bench: Bench, shape: str, size: int) -> Optional[float]:
    """The floor per reported unit: one way, or both ways for echoes."""
    samples = bench.floors.get(size)
    if not samples:
        return None
    return statistics.median(samples) * directions(shape)


def _cell_text(cell: Optional[Cell]) -> str:
    if cell is None:
        return "-"
    if cell.errors:
        return "ERROR"
    # '*': some messages did not take the fast path (see the warnings).
    return ms(cell.per_message_ns) + ("*" if cell.shortfalls else "")


def table(bench: Bench, shape: str) -> str:
    fast = [mode for mode in SHMGRPC_MODES if mode in bench.modes]
    has_base = BASELINE in bench.modes
    header = ["size"] + bench.modes
    header += [f"{mode} speedup" for mode in fast if has_base]
    header += ["floor"] + [f"{mode}/floor" for mode in fast]
    rows = [header]
    for size in bench.args.sizes:
        cells = {mode: bench.cells.get((shape, size, mode)) for mode in bench.modes}
        if not any(cells.values()):
            continue
        per = {mode: _per_message(bench, shape, size, mode) for mode in bench.modes}
        floor = floor_ns(bench, shape, size)
        row = [human_size(size)] + [_cell_text(cells[mode]) for mode in bench.modes]
        row += [ratio(_div(per[BASELINE], per[mode])) for mode in fast if has_base]
        row += [ms(floor)] + [ratio(_div(per[mode], floor)) for mode in fast]
        rows.append(row)
    return _align(rows)


def _per_message(bench: Bench, shape: str, size: int, mode: str) -> Optional[float]:
    cell = bench.cells.get((shape, size, mode))
    return None if cell is None or cell.errors else cell.per_message_ns


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def below_threshold_note(bench: Bench, shape: str) -> List[str]:
    """What shmgrpc on the channel costs where it only passes messages through."""
    notes = []
    for size in bench.args.sizes:
        if size >= bench.threshold:
            continue
        for mode in SHMGRPC_MODES:
            overhead = _div(
                _per_message(bench, shape, size, mode), _per_message(bench, shape, size, BASELINE)
            )
            if overhead is not None:
                notes.append(
                    f"{human_size(size)} is below the {human_size(bench.threshold)} threshold: "
                    f"{mode} costs {100 * (overhead - 1):+.1f}% vs {BASELINE} "
                    "(shmgrpc channel, message inline)"
                )
    return notes


def peak_table(bench: Bench) -> str:
    """Per process: the peak, and how far it rose above the resident set the
    call started from, both in MiB and as a multiple of the payload."""
    rows = [["size", "mode"]]
    for side in ("client", "server"):
        rows[0] += [f"{side} peak", "(x)", "+call", "(x)", "shmem"]
    for size in bench.args.sizes:
        for mode in bench.modes:
            cell = bench.cells.get(("unary", size, mode))
            if not cell or not cell.peak:
                continue
            row = [human_size(size), mode]
            for side in ("client", "server"):
                peak = cell.peak[side]
                row += [
                    f"{peak['vm_hwm_mib']:.0f}",
                    f"{peak['vm_hwm_x_payload']:.1f}" if size >= MiB else "",
                    f"{peak['growth_mib']:.0f}",
                    f"{peak['growth_x_payload']:.1f}" if size >= MiB else "",
                    f"{peak['rss_shmem_after_mib']:.0f}" if "rss_shmem_after_mib" in peak else "?",
                ]
            rows.append(row)
    return "" if len(rows) == 1 else _align(rows)


def _align(rows: List[List[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(text.rjust(width) for text, width in zip(row, widths)) for row in rows)


def status_text(status: shmgrpc.ChannelStatus) -> str:
    """'transport shm; co-located server pid 42' ("inline": plain gRPC)."""
    transports = ", then ".join(status.transports) or status.transport
    return f"transport {transports}; {status.reason}" + ("" if status.settled else " (not settled)")


def print_report(bench: Bench, notes: List[str]) -> None:
    print(
        f"\nmedian of {bench.args.repeat} interleaved rounds; speedup = {BASELINE} time / mode time; "
        "floor = in-process serialize + copy + parse"
    )
    for shape in bench.args.shapes:
        print(f"\n{SHAPE_TITLES[shape]}")
        if shape != "unary":
            print("  (the floor runs on one core; a stream overlaps sender and receiver, so it can beat it)")
        print(table(bench, shape))
        for line in below_threshold_note(bench, shape):
            print(f"  {line}")
    peaks = peak_table(bench)
    if peaks:
        print(
            "\npeak memory over one unary echo, MiB: peak = VmHWM after a reset (it counts the shared\n"
            "pages a process touched), +call = peak minus the RSS the call started from, shmem = RssShmem\n"
            "after the call (the pool stays mapped, so all modes see it); (x) = multiple of the payload"
        )
        print(peaks)
        if any(not c.peak["client"]["peak_was_reset"] for c in bench.cells.values() if c.peak):
            print("  (the peak could not be reset here: VmHWM is each process's lifetime peak)")
    if bench.channels:
        print("\nshmgrpc channels at the end of the run:")
        for mode, status in bench.channels.items():
            print(f"  {mode}: {status_text(status)}")
    for line in notes + bench.warnings:
        print(f"note: {line}")


# --- results.json and the plot ----------------------------------------------


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
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def mib_per_s(shape: str, size: int, ns_per_message: Optional[float]) -> Optional[float]:
    """Payload MiB moved per second; an echo moves its payload twice."""
    if not ns_per_message:
        return None
    return directions(shape) * size / MiB / (ns_per_message / 1e9)


def _ms(ns: Optional[float]) -> Optional[float]:
    return None if ns is None else ns / 1e6


def _cell_json(bench: Bench, cell: Cell) -> dict:
    per_message = _per_message(bench, cell.shape, cell.size, cell.mode)
    return {
        "shape": cell.shape,
        "size": cell.size,
        "count": cell.count,
        "mode": cell.mode,
        "samples_ms": [_ms(ns) for ns in cell.samples_ns],
        "median_ms": _ms(cell.median_ns),
        "per_message_ms": _ms(cell.per_message_ns),
        "throughput_mib_s": mib_per_s(cell.shape, cell.size, per_message),
        f"speedup_vs_{BASELINE}": _div(_per_message(bench, cell.shape, cell.size, BASELINE), per_message),
        "ratio_to_floor": _div(per_message, floor_ns(bench, cell.shape, cell.size)),
        "errors": cell.errors,
        "fast_path_shortfalls": cell.shortfalls,
        "client_shmgrpc_stats": cell.client_stats,
        "server_shmgrpc_stats": cell.server_stats,
        "peak_memory": cell.peak,
    }


def results(bench: Bench, command: str, notes: List[str], elapsed_s: float, interrupted: bool) -> dict:
    return {
        "command": command,
        "machine": machine_info(),
        "elapsed_s": round(elapsed_s, 1),
        "interrupted": interrupted,
        "options": {
            "sizes": bench.args.sizes,
            "shapes": bench.args.shapes,
            "modes": bench.modes,
            "repeat": bench.args.repeat,
            "stream_bytes": bench.args.stream_bytes,
            "threshold": bench.threshold,
        },
        "units": "times in ms; streams: per message; throughput: payload MiB/s, echoes count both ways",
        "cells": [_cell_json(bench, cell) for cell in bench.cells.values()],
        "floor": [
            {
                "size": size,
                "one_way_samples_ms": [_ms(ns) for ns in samples],
                "one_way_median_ms": _ms(statistics.median(samples)),
            }
            for size, samples in bench.floors.items()
        ],
        "shmgrpc_pool": srv.shmgrpc_stats().get("pool"),
        "shmgrpc_channels": {mode: dataclasses.asdict(status) for mode, status in bench.channels.items()},
        "notes": notes,
        "warnings": bench.warnings,
    }


def _plot(ax, shape: str, sizes: List[int], ns_per_message: List[Optional[float]], **style) -> None:
    """One line: throughput against size, where there is a time to show."""
    points = [(size, mib_per_s(shape, size, ns)) for size, ns in zip(sizes, ns_per_message)]
    points = [(size, value) for size, value in points if value]
    if points:
        ax.plot(*zip(*points), **style)


def write_plot(bench: Bench, path: str) -> Optional[str]:
    """throughput.png; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'shmgrpc[plot]'): throughput.png skipped"
    shapes = bench.args.shapes
    figure, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.5), squeeze=False)
    sizes = bench.args.sizes
    for ax, shape in zip(axes[0], shapes):
        for mode in bench.modes:
            times = [_per_message(bench, shape, size, mode) for size in sizes]
            _plot(ax, shape, sizes, times, marker="o", label=mode)
        floors = [floor_ns(bench, shape, size) for size in sizes]
        _plot(ax, shape, sizes, floors, linestyle="--", color="gray", label="in-process floor")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [human_size(size) for size in sizes])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_title(shape)
        ax.set_xlabel("message size")
        ax.set_ylabel("payload MiB/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


# --- main -------------------------------------------------------------------


def _interrupt(signum, frame):
    # SIGTERM ends the run like Ctrl-C: the server is stopped and what was
    # measured is still reported.
    raise KeyboardInterrupt


def measure(
    args: argparse.Namespace, modes: List[str], threshold: int, notes: List[str]
) -> Tuple[Bench, bool]:
    """Run the benchmark against a fresh server; (bench, interrupted)."""
    with tempfile.TemporaryDirectory(prefix="shmgrpc-bench-") as directory:
        server = start_server(os.path.join(directory, "bench.sock"))
        clients = Clients()
        try:
            open_modes(modes, server, clients)
            clients.channels.append(open_channel(f"unix:{server.unix_path}"))
            bench = Bench(args, clients.stubs, Stubs.on(clients.channels[-1]), threshold)
            interrupted = False
            try:
                bench.run()
            except KeyboardInterrupt:
                progress("interrupted: reporting what was measured so far")
                interrupted = True
            bench.record_channels(clients.statuses())
            return bench, interrupted
        finally:
            clients.close()
            stop_server(server.process)


HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def _reexec_with_hugepages() -> None:
    """GLIBC_TUNABLES is read when a process starts: run this benchmark again
    with it set; the server process inherits it, so both sides and all modes
    get the same allocator."""
    env = dict(os.environ)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    env["GLIBC_TUNABLES"] = ":".join(tunables + [HUGEPAGES_TUNABLE])
    os.execve(sys.executable, [sys.executable, "-m", "shmgrpc.bench", *sys.argv[1:]], env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.hugepages and HUGEPAGES_TUNABLE not in os.environ.get("GLIBC_TUNABLES", ""):
        _reexec_with_hugepages()
    command = shlex.join(["python", "-m", "shmgrpc.bench", *(sys.argv[1:] if argv is None else argv)])
    notes: List[str] = []
    if args.repeat < DEFAULT_REPEAT:
        notes.append(f"--repeat {args.repeat}: a median of fewer than {DEFAULT_REPEAT} rounds is noisy")
    if os.environ.get("GLIBC_TUNABLES"):
        notes.append(f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']} (client and server, every mode)")
    if args.malloc == "keep":
        # Before any thread: M_ARENA_MAX shapes only arenas made afterwards.
        # The server inherits the variable and applies it when it is built.
        os.environ["SHMGRPC_MALLOC"] = "keep"
        tune_malloc()
        notes.append("SHMGRPC_MALLOC=keep (client and server, every mode: plain gRPC gets the same warm malloc)")
    modes = list(args.modes)
    threshold = Config.from_env().threshold
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    bench, interrupted = measure(args, modes, threshold, notes)
    elapsed = time.monotonic() - started

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        plot_note = write_plot(bench, os.path.join(args.out, "throughput.png"))
        if plot_note:
            notes.append(plot_note)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results(bench, command, notes, elapsed, interrupted), f, indent=1)
    print_report(bench, notes)
    print(f"\ntook {elapsed:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    failed = any(cell.errors for cell in bench.cells.values())
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
