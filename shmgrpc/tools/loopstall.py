"""How long the event loop stalls while shmgrpc.aio moves one large message.

    python -m shmgrpc.tools.loopstall [--size 256MiB] [--calls 3] [--json]

A grpc.aio client echoes one message of `--size` bytes through a grpc.aio
server in another process, over a unix socket, `--calls` times after one
warm-up call. In each process a ticker task sleeps 1 ms in a loop and keeps
the longest gap beyond that: the longest time nothing else could run on that
event loop. Both the request and the echoed response travel the same way, so
each process offloads one message and restores one.

Modes, each in a fresh server process:

    plain          no shmgrpc: what grpc.aio itself costs (serialize, copy, parse)
    shm, cma       shmgrpc.aio as shipped (shmgrpc.aio.server() and
                   shmgrpc.aio.insecure_channel(), told the channel's and the
                   server's options): a handle is restored where grpc.aio
                   deserializes, on the event loop

The numbers are per call: the worst client stall, the worst server stall,
and the call's wall time, as the median of the measured calls (and their
maximum). The warm-up call is reported apart: it pays for creating and first
touching the pool's segment.

What stalls the loop is each step that runs on it in one go, GIL or not:
protobuf serializing the message (grpc.aio serializes on the loop; offload
adds one copy into the slot there for shm, a pin for cma) and, on the side
that receives it, the restore in the deserializer: a parse straight from a
view of the slot (shm), or process_vm_readv into a receive buffer and a
parse of that (cma). Plain grpc.aio serializes and parses on the loop just
the same.

Measured with `--size 256MiB --calls 5` on a 2-core VM that other jobs kept
busy (load average 2-6), three runs; median worst stall per call, client /
server, and the call's wall time (the spread of the three runs' medians):

    plain   610-760 / 1340-1880 ms   call 3.4-4.1 s
    shm     390-445 /  655-810 ms    call 1.3-1.5 s
    cma     375-450 /  610-700 ms    call 1.3 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import grpc
from google.protobuf.wrappers_pb2 import BytesValue

from ..config import Config, parse_size
from ..aio._channel import insecure_channel
from ..aio._server import server as shmgrpc_server
from ._table import format_table

SERVICE = "shmgrpc.loopstall.Stall"
ECHO = f"/{SERVICE}/Echo"  # unary: the request comes back
WORST = f"/{SERVICE}/Worst"  # control: the server loop's worst stall since the last ask
OPTIONS = [  # the largest message grpc takes (the option is a C int)
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
]
MODES = ("plain", "shm", "cma")
TICK = 0.001  # the ticker's sleep: stalls are measured beyond it
READY = "loopstall-server ready"


class Ticker:
    """The longest time the running loop did not come back to a 1 ms sleep."""

    def __init__(self):
        self.worst = 0.0
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last - TICK)
            last = now

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _config(mode: str) -> Optional[Config]:
    if mode == "plain":
        return None
    return Config(transport=mode)


# --- the server process ---------------------------------------------------------


async def _serve(path: str, mode: str) -> None:
    config = _config(mode)
    ticker = Ticker()

    async def echo(request, context):
        return request

    async def worst(request, context):
        return BytesValue(value=json.dumps({"worst": ticker.take()}).encode())

    def unary(fn):
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=BytesValue.FromString, response_serializer=BytesValue.SerializeToString
        )

    if config is None:
        server, interceptor = grpc.aio.server(options=OPTIONS), None
    else:
        server = shmgrpc_server(options=OPTIONS, config=config)
        interceptor = server.shmgrpc
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Echo": unary(echo), "Worst": unary(worst)}),)
    )
    server.add_insecure_port(f"unix:{path}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        ticker.start()
        print(READY, flush=True)
        await stop.wait()
        await server.stop(None)
    finally:
        ticker.stop()
        if interceptor is not None:
            interceptor.close()


# --- the client -------------------------------------------------------------------


async def _measure(target: str, mode: str, size: int, calls: int) -> Dict:
    config = _config(mode)
    if config is None:
        channel, wrapper = grpc.aio.insecure_channel(target, options=OPTIONS), None
    else:
        channel = wrapper = insecure_channel(target, OPTIONS, config=config)
    unary: Dict[str, Any] = dict(request_serializer=BytesValue.SerializeToString,
                                 response_deserializer=BytesValue.FromString)
    echo: grpc.aio.UnaryUnaryMultiCallable[BytesValue, BytesValue] = channel.unary_unary(ECHO, **unary)
    worst: grpc.aio.UnaryUnaryMultiCallable[BytesValue, BytesValue] = channel.unary_unary(WORST, **unary)
    request = BytesValue(value=bytes(range(256)) * (size // 256) + b"\x5a" * (size % 256))
    ticker = Ticker()
    ticker.start()
    rows: List[Dict] = []
    try:
        await worst(BytesValue(), timeout=60)  # the connection
        for _ in range(calls + 1):
            await worst(BytesValue(), timeout=60)
            await asyncio.sleep(0.05)
            ticker.take()
            start = time.perf_counter()
            response = await echo(request, timeout=600)
            seconds = time.perf_counter() - start
            client = ticker.take()
            server = json.loads((await worst(BytesValue(), timeout=60)).value)["worst"]
            if response.value != request.value:  # outside the measured window
                raise SystemExit(f"loopstall: {mode}: the echo came back different")
            del response
            rows.append({"client": client, "server": server, "seconds": seconds})
        stats = wrapper.stats() if wrapper is not None else None
    finally:
        ticker.stop()
        await channel.close()  # the wrapper's close() closes the channel it wraps, and its engine
    if stats is not None:  # the measured echoes must really have been offloaded, both ways
        # (the first, the warm-up row, carries the hello inline and learns the route)
        moved = stats["by_transport"][mode]
        if moved["offloaded"]["count"] < calls or moved["restored"]["count"] < calls:
            raise SystemExit(f"loopstall: {mode}: messages were not offloaded: {stats}")
    measured = rows[1:]
    summary = {
        key: {"median": statistics.median(r[key] for r in measured), "max": max(r[key] for r in measured)}
        for key in ("client", "server", "seconds")
    }
    return {"mode": mode, "warmup": rows[0], **summary}


def _run_mode(mode: str, size: int, calls: int) -> Dict:
    with tempfile.TemporaryDirectory(prefix="loopstall-") as tmp:
        path = os.path.join(tmp, "s.sock")
        server = subprocess.Popen(
            [sys.executable, "-m", "shmgrpc.tools.loopstall", "--serve", path, "--mode", mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None  # stdout=PIPE
        try:
            line = server.stdout.readline()
            if not line.startswith(READY):
                raise SystemExit(f"loopstall: the {mode} server did not start")
            return asyncio.run(_measure(f"unix:{path}", mode, size, calls))
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shmgrpc.tools.loopstall", description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="256MiB", help="message size (default 256MiB)")
    parser.add_argument("--calls", type=int, default=3, help="measured calls per mode, after one warm-up")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, args.mode))
        return
    size = parse_size(args.size, "--size")
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; expected some of {', '.join(MODES)}")
    results = [_run_mode(mode, size, args.calls) for mode in modes]
    if args.json:
        print(json.dumps({"size": size, "calls": args.calls, "results": results}, indent=2))
        return
    print(f"one {size / 2**20:g} MiB echo: worst event-loop stall per call, ms "
          f"(median of {args.calls} calls, max in brackets; warm-up call apart)")
    rows = [["mode", "client", "server", "call", "warm-up: client", "server", "call"]]
    for r in results:
        rows.append([r["mode"]] + [f"{_ms(r[k]['median'])} [{_ms(r[k]['max'])}]" for k in ("client", "server", "seconds")]
                    + [_ms(r["warmup"][k]) for k in ("client", "server", "seconds")])
    print("\n".join(format_table(rows, align="<")))


if __name__ == "__main__":
    main()
