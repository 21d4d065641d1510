"""python -m server_example --listen unix:///tmp/shmgrpc-demo.sock [--listen 127.0.0.1:50051]

Once every address is bound, prints exactly one stdout line:

    listening on ADDRESS [ADDRESS ...] (details)

with the real port for an address that asked for port 0. It then serves until
SIGTERM or SIGINT, stops gracefully and exits 0.
"""

from __future__ import annotations

import os

# Read before anything slow: with --exit-with-parent, a parent that is already
# gone by the time we check would otherwise go unnoticed.
_PARENT_PID = os.getppid()

import argparse  # noqa: E402
import sys  # noqa: E402
from typing import List  # noqa: E402

from .serve import READY_PREFIX, ServeError, ServeOptions, exit_with_parent, serve  # noqa: E402
from .workers import run_workers  # noqa: E402

_MAX_MESSAGE_MIB = 2047  # gRPC keeps message lengths in a signed 32-bit int


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server_example", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--listen",
        action="append",
        metavar="ADDRESS",
        help="unix:///path.sock, unix-abstract:name or host:port (port 0: any free one); repeatable",
    )
    parser.add_argument("--aio", action="store_true", help="serve with grpc.aio instead of a thread pool")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N processes sharing each TCP port (SO_REUSEPORT); unix paths get a .<i> suffix per worker",
    )
    parser.add_argument(
        "--max-message-mib",
        type=int,
        default=1100,
        metavar="MIB",
        help="gRPC's max send/receive message size; the default leaves room for plain-gRPC "
        "baselines up to shmgrpc's 1 GiB limit (gRPC's own default is 4 MiB)",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop (as on SIGTERM) when the parent process dies, even if it is killed",
    )
    args = parser.parse_args(argv)
    if not args.listen:
        parser.error("give at least one --listen address")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 1 <= args.max_message_mib <= _MAX_MESSAGE_MIB:
        parser.error(f"--max-message-mib must be between 1 and {_MAX_MESSAGE_MIB}")
    return args


def print_ready(addresses: List[str], details: str) -> None:
    print(f"{READY_PREFIX}{' '.join(addresses)} ({details})", flush=True)


def main(argv: List[str]) -> int:
    args = parse_args(argv)
    if args.exit_with_parent:
        exit_with_parent(_PARENT_PID)
    options = ServeOptions(listen=args.listen, aio=args.aio, max_message_mib=args.max_message_mib)
    try:
        if args.workers > 1:
            return run_workers(options, args.workers, print_ready)
        serve(options, lambda addresses, details: print_ready(addresses, f"pid {os.getpid()}, {details}"))
    except ServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
