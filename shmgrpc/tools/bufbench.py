"""Bench: a numpy array one way, three ways (python -m shmgrpc.tools.bufbench).

    python -m shmgrpc.tools.bufbench [--sizes 1MiB,16MiB,64MiB,256MiB] [--rounds 7] [--out DIR]

The client sends a float64 array of each size; the server reads its first
and last element and answers 16 bytes. Each way has its own server process
and channel; rounds are interleaved (the order rotates) and medians reported:

    grpc-tobytes      plain gRPC: arr.tobytes() sent as the request's bytes;
                      the server takes numpy.frombuffer() of what it got
    shmgrpc-protobuf  shmgrpc's drop-in path: a protobuf message with a bytes
                      field (google.protobuf.BytesValue(value=arr.tobytes()));
                      the server takes numpy.frombuffer(msg.value)
    shmgrpc-buffer    shmgrpc.buffer_serializer / buffer_deserializer: the
                      array itself is the request; the server gets a
                      read-only view of shared memory and numpy.frombuffer()s it

Per size and way: median latency, speed-up over the first two, throughput,
CPU per call of each process (getrusage), the server's page faults per call,
and where the server's array lay (a shared mapping, or its heap). Default
malloc on both sides. Needs numpy (pip install 'shmgrpc[numpy]').
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from typing import Any, Dict, List, Optional

from ..config import format_size, parse_size
from ._maps import mapping_of
from ._table import format_table

WAYS = ("grpc-tobytes", "shmgrpc-protobuf", "shmgrpc-buffer")
SERVICE = "shmgrpc.bench.Arrays"
OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def _usage() -> Dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_ms": (r.ru_utime + r.ru_stime) * 1000.0, "minflt": r.ru_minflt}


def _where(array: Any) -> str:
    """The mapping the array's first byte lies in, "shared: PATH" or "private: PATH"."""
    where = mapping_of(array)
    return ("shared: " if where["shared"] else "private: ") + (where["path"] or "(anonymous)")


# --- the server process -------------------------------------------------------


def serve(way: str, socket_path: str) -> None:
    import grpc
    import numpy
    from google.protobuf import wrappers_pb2

    import shmgrpc

    last: Dict[str, str] = {"where": ""}

    def answer(array: Any) -> bytes:
        last["where"] = _where(array)
        return struct.pack("<dd", array[0], array[-1])

    handler: Any
    if way == "shmgrpc-protobuf":
        handler = grpc.unary_unary_rpc_method_handler(
            lambda msg, ctx: answer(numpy.frombuffer(msg.value, numpy.float64)),
            request_deserializer=wrappers_pb2.BytesValue.FromString)
    elif way == "shmgrpc-buffer":
        handler = grpc.unary_unary_rpc_method_handler(
            lambda buf, ctx: answer(numpy.frombuffer(buf, numpy.float64)),
            request_deserializer=shmgrpc.buffer_deserializer)
    else:
        handler = grpc.unary_unary_rpc_method_handler(lambda raw, ctx: answer(numpy.frombuffer(raw, numpy.float64)))
    usage: Any = grpc.unary_unary_rpc_method_handler(lambda raw, ctx: json.dumps({**_usage(), **last}).encode())
    executor = futures.ThreadPoolExecutor(4)
    server = grpc.server(executor, options=OPTIONS) if way == "grpc-tobytes" else \
        shmgrpc.server(executor, options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Send": handler,
                                                                                    "Usage": usage}),))
    server.add_insecure_port("unix:" + socket_path)
    server.start()
    print("READY", flush=True)
    sys.stdin.read()  # until the bench closes it
    server.stop(None)


# --- the client ---------------------------------------------------------------


class Way:
    def __init__(self, way: str, directory: str):
        import grpc
        from google.protobuf import wrappers_pb2

        import shmgrpc

        self.name = way
        socket_path = os.path.join(directory, way + ".sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "shmgrpc.tools.bufbench", "--serve", way, socket_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout is None or self.proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"the {way} server did not start")
        target = "unix:" + socket_path
        call: Any
        if way == "grpc-tobytes":
            self.channel = grpc.insecure_channel(target, options=OPTIONS)
            call = self.channel.unary_unary(f"/{SERVICE}/Send")
            self.send = lambda array: call(array.tobytes(), timeout=600)
        elif way == "shmgrpc-protobuf":
            self.channel = shmgrpc.insecure_channel(target, options=OPTIONS)
            call = self.channel.unary_unary(f"/{SERVICE}/Send",
                                            request_serializer=wrappers_pb2.BytesValue.SerializeToString)
            self.send = lambda array: call(wrappers_pb2.BytesValue(value=array.tobytes()), timeout=600)
        else:
            self.channel = shmgrpc.insecure_channel(target, options=OPTIONS)
            call = self.channel.unary_unary(f"/{SERVICE}/Send", request_serializer=shmgrpc.buffer_serializer)
            self.send = lambda array: call(array, timeout=600)
        usage: Any = self.channel.unary_unary(f"/{SERVICE}/Usage")
        self.server_usage = lambda: json.loads(usage(b"", timeout=60))
        self.samples: Dict[int, List[Dict[str, float]]] = {}
        self.where: Dict[int, str] = {}

    def measure(self, array: Any) -> Dict[str, float]:
        before, mine = self.server_usage(), _usage()
        start = time.perf_counter()
        answer = self.send(array)
        elapsed = (time.perf_counter() - start) * 1000.0
        after, mine_after = self.server_usage(), _usage()
        if struct.unpack("<dd", answer) != (array[0], array[-1]):
            raise AssertionError(f"{self.name}: the server read {struct.unpack('<dd', answer)}")
        self.where[array.nbytes] = after["where"]
        return {"ms": elapsed, "client_cpu_ms": mine_after["cpu_ms"] - mine["cpu_ms"],
                "server_cpu_ms": after["cpu_ms"] - before["cpu_ms"],
                "server_faults": after["minflt"] - before["minflt"]}

    def close(self) -> None:
        self.channel.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


def run(sizes: List[int], rounds: int, warmup: int = 2) -> Dict[str, Any]:
    import numpy

    cells: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="shmgrpc-bufbench-") as directory:
        ways = [Way(w, directory) for w in WAYS]
        try:
            for size in sizes:
                array = numpy.arange(size // 8, dtype=numpy.float64)
                for way in ways:
                    for _ in range(warmup):
                        way.measure(array)
                samples: Dict[str, List[Dict[str, float]]] = {w.name: [] for w in ways}
                for r in range(rounds):
                    for way in ways[r % len(ways):] + ways[: r % len(ways)]:
                        samples[way.name].append(way.measure(array))
                    print(f"   {format_size(size)} round {r + 1}/{rounds}: " + "  ".join(
                        f"{w} {samples[w][-1]['ms']:.1f} ms" for w in WAYS), file=sys.stderr, flush=True)
                base = {w: statistics.median(s["ms"] for s in samples[w]) for w in WAYS}
                for way in ways:
                    got = samples[way.name]
                    ms = base[way.name]
                    cells.append({
                        "size": size, "way": way.name, "median_ms": ms, "samples_ms": [s["ms"] for s in got],
                        "vs_grpc_tobytes": base["grpc-tobytes"] / ms, "vs_shmgrpc_protobuf": base["shmgrpc-protobuf"] / ms,
                        "mib_s": size / (1 << 20) / (ms / 1000.0),
                        "client_cpu_ms": statistics.median(s["client_cpu_ms"] for s in got),
                        "server_cpu_ms": statistics.median(s["server_cpu_ms"] for s in got),
                        "server_faults": statistics.median(s["server_faults"] for s in got),
                        "server_array_in": way.where.get(size, ""),
                    })
        finally:
            for way in ways:
                way.close()
    return {"command": "python -m shmgrpc.tools.bufbench " + " ".join(sys.argv[1:]), "rounds": rounds,
            "cells": cells}


def report(results: Dict[str, Any]) -> str:
    rows = [["size", "way", "ms", "x grpc", "x protobuf", "MiB/s", "client CPU ms", "server CPU ms",
             "server faults", "server's array in"]]
    for c in results["cells"]:
        rows.append([format_size(c["size"]), c["way"], f"{c['median_ms']:.2f}", f"{c['vs_grpc_tobytes']:.2f}x",
                     f"{c['vs_shmgrpc_protobuf']:.2f}x", f"{c['mib_s']:.0f}", f"{c['client_cpu_ms']:.2f}",
                     f"{c['server_cpu_ms']:.2f}", f"{c['server_faults']:.0f}", c["server_array_in"][:60]])
    return "\n".join(format_table(rows, align="<<>>>>>>><"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shmgrpc.tools.bufbench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1MiB,16MiB,64MiB,256MiB", help="array sizes (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per size (default %(default)s)")
    parser.add_argument("--out", help="directory for results.json and report.txt")
    parser.add_argument("--serve", nargs=2, metavar=("WAY", "SOCKET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    try:
        import numpy  # noqa: F401  (only whether it is there)
    except ImportError:
        print("numpy is not installed (pip install 'shmgrpc[numpy]'): the array bench is skipped")
        return 0
    results = run([parse_size(s) for s in args.sizes.split(",")], args.rounds)
    text = report(results)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "report.txt"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
