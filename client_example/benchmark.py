"""The whole client run: open the modes, time every size, print the tables,
check the rest of the service, close everything."""

from __future__ import annotations

import sys
from typing import Optional, Sequence, TextIO

import shmgrpc

from .channels import BASELINE, close_all, open_modes
from .checks import run_checks
from .errors import Failure
from .explain import explain
from .table import render
from .workload import calls_per_round, run_size, warm_up


def run_benchmark(
    target: str,
    tcp_target: Optional[str],
    sizes: Sequence[int],
    repeat: int,
    wanted: Sequence[str],
    max_message_mib: int,
    out: TextIO = sys.stdout,
) -> None:
    """Raises Failure on any wrong byte or failed call."""

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    threshold = shmgrpc.Config.from_env().threshold
    modes, notes = open_modes(target, tcp_target, wanted, max_message_mib)
    try:
        for note in notes:
            print(f"note: {note}", file=out)
        if not modes:
            raise Failure("no mode left to run")
        for mode in modes:
            warm_up(mode, threshold)
        progress("connected: " + ", ".join(f"{mode.name} ({mode.target})" for mode in modes))
        # After the warm-up: each shmgrpc channel has made its handshake.
        settled = {mode.name: mode.status() for mode in modes if mode.offloads}
        if settled:
            print("\n".join(status_line(name, status) for name, status in settled.items()) + "\n", file=out)
        reasons = set()  # every fallback reason of the tables' notes
        for size in sizes:
            results = run_size(modes, size, repeat, progress)
            print(render(size, repeat, calls_per_round(size), results, BASELINE), file=out)
            print(file=out, flush=True)
            reasons.update(reason for result in results for reason in result.fallbacks)
        checker = next((mode for mode in modes if mode.offloads), modes[0])
        checked, summary = run_checks(checker)
        print(checked, file=out)
        print(explain(summary, reasons), file=out, flush=True)
        for mode in modes:  # a channel that stopped offloading (or started) meanwhile says so
            if mode.offloads and mode.status() != settled[mode.name]:
                print(status_line(mode.name, mode.status(), now=True), file=out, flush=True)
    finally:
        close_all(modes)


def status_line(name: str, status: shmgrpc.ChannelStatus, now: bool = False) -> str:
    """'shmgrpc shm channel: transport shm; co-located server pid 42': the
    transport its large messages take ("inline": plain gRPC), and why."""
    transports = ", then ".join(status.transports) or status.transport
    pending = "" if status.settled else " (not settled yet)"
    return f"{name} channel{' now' if now else ''}: transport {transports}; {status.reason}{pending}"
