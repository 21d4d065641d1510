"""python -m client_example --target unix:///tmp/shmgrpc-demo.sock [--tcp-target 127.0.0.1:50051]
python -m client_example --demo

Prints one table per message size (stdout) and progress (stderr). Exits 1,
with a line starting "FAIL:", on any wrong byte, failed call or leftover.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import List

import shmgrpc
from shmgrpc.config import parse_size
from shmgrpc.errors import ConfigError

from .arrays import run_arrays
from .benchmark import run_benchmark
from .channels import MODES
from .errors import Failure

_MAX_MESSAGE_MIB = 2047  # gRPC keeps message lengths in a signed 32-bit int
_SIZES = "4KiB,1MiB,16MiB,64MiB"
_DEMO_SIZES = "64KiB,1MiB,16MiB,64MiB"  # 64 KiB: below the default threshold (128 KiB), inline everywhere


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client_example", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--demo",
        action="store_true",
        help="start a server, run the benchmark, stop it, check /dev/shm (make demo)",
    )
    parser.add_argument("--target", help="the server's unix socket, e.g. unix:///tmp/shmgrpc-demo.sock")
    parser.add_argument(
        "--tcp-target", help="the same server over TCP, e.g. 127.0.0.1:50051 (the grpc tcp row)"
    )
    parser.add_argument(
        "--sizes", help=f"comma-separated message sizes (default {_SIZES}; with --demo {_DEMO_SIZES})"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per size")
    parser.add_argument(
        "--arrays",
        action="store_true",
        help="then send numpy arrays with shmgrpc.buffer_serializer (needs numpy; --demo always does)",
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}"
    )
    parser.add_argument(
        "--max-message-mib",
        type=int,
        default=1100,
        metavar="MIB",
        help="gRPC's max send/receive message size on every channel (gRPC's default is 4 MiB)",
    )
    args = parser.parse_args(argv)
    if not args.demo and not args.target:
        parser.error("give --target (or --demo)")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not 1 <= args.max_message_mib <= _MAX_MESSAGE_MIB:
        parser.error(f"--max-message-mib must be between 1 and {_MAX_MESSAGE_MIB}")
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; expected some of {', '.join(MODES)}")
    try:
        text = args.sizes or (_DEMO_SIZES if args.demo else _SIZES)
        args.sizes = [parse_size(size, "--sizes") for size in text.split(",") if size.strip()]
    except ConfigError as error:
        parser.error(str(error))
    if not args.sizes or min(args.sizes) < 1:
        parser.error("--sizes needs at least one size of 1 byte or more")
    if args.target and not args.target.startswith("unix"):
        print(
            "note: --target is not a unix socket; shmgrpc still works over TCP on one host, "
            "but the 'grpc unix' baseline row will be TCP too",
            file=sys.stderr,
        )
    return args


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: finally blocks stop the demo's server


def main(argv: List[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.demo:
            from .demo import run_demo  # imported here: only the demo starts a server

            run_demo(args.sizes, args.repeat, args.modes, args.max_message_mib)
        else:
            run_benchmark(
                args.target, args.tcp_target, args.sizes, args.repeat, args.modes, args.max_message_mib
            )
            if args.arrays:
                run_arrays(args.target, args.sizes, args.repeat, args.max_message_mib)
    except Failure as failure:
        print(f"FAIL: {failure}", file=sys.stderr)
        return 1
    except shmgrpc.ShmGrpcError as error:  # raised in this process, not carried by a status
        print(f"FAIL: shmgrpc: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; stopped cleanly", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
