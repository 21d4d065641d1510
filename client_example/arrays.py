"""The demo's array mode: numpy arrays sent with shmgrpc.buffer_serializer.

    python -m client_example --target unix:///tmp/shmgrpc-demo.sock --arrays

For each size, one float64 array goes to the server's /blobstore.Arrays/Put
three ways, each timed (median of --repeat rounds, interleaved): as
`array.tobytes()` over plain gRPC, and as the array itself through a shmgrpc
channel with the buffer codec (its bytes copied once, into shared memory;
the server's numpy array is a view of that memory, no copy). The server
answers how many elements it saw, the first and last, and where its array
lay. numpy is the demo's optional extra: without it this mode says so and
does nothing.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

import grpc

import shmgrpc
from shmgrpc.config import format_size
from shmgrpc.tools import format_table

from .channels import channel_options
from .errors import Failure

PUT = "/blobstore.Arrays/Put"


def run_arrays(target: str, sizes: Sequence[int], repeat: int, max_message_mib: int) -> None:
    try:
        import numpy
    except ImportError:
        print("arrays: numpy is not installed (pip install 'shmgrpc[numpy]'); skipped", file=sys.stderr)
        return
    options = channel_options(max_message_mib)
    plain = grpc.insecure_channel(target, options=options)
    offload = shmgrpc.insecure_channel(target, options=options)
    ways: Dict[str, Callable] = {
        "grpc, array.tobytes()": (lambda put: lambda a: put(a.tobytes(), timeout=120))(plain.unary_unary(PUT)),
        "shmgrpc buffer codec": (lambda put: lambda a: put(a, timeout=120))(
            offload.unary_unary(PUT, request_serializer=shmgrpc.buffer_serializer)),
    }
    rows: List[List[str]] = [["array", "way", "ms", "speed-up", "the server's array was"]]
    try:
        for size in sizes:
            array = numpy.arange(size // 8, dtype=numpy.float64)
            times: Dict[str, List[float]] = {way: [] for way in ways}
            seen: Dict[str, dict] = {}
            for round_ in range(repeat + 1):  # the first round warms up (and learns the route)
                for way, put in ways.items():
                    start = time.perf_counter()
                    answer = json.loads(bytes(put(array)))
                    elapsed = (time.perf_counter() - start) * 1000
                    if answer["count"] != len(array) or answer["last"] != float(array[-1]):
                        raise Failure(f"arrays: the server saw {answer} of a {len(array)}-element array")
                    if round_:
                        times[way].append(elapsed)
                    seen[way] = answer
            base = statistics.median(times["grpc, array.tobytes()"])
            for way in ways:
                ms = statistics.median(times[way])
                rows.append([f"{format_size(size)} float64", way, f"{ms:.1f}", f"{base / ms:.1f}x", seen[way]["where"]])
    finally:
        plain.close()
        offload.close()
    print("\nnumpy arrays, one way (the server reads the first and last element):")
    print("\n".join(format_table(rows, align="<<>><")))
