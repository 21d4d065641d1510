"""--workers N: N server processes behind one TCP port (SO_REUSEPORT), the
usual way to use more than one core from Python.

Each worker is a fresh interpreter (multiprocessing "spawn") that builds its
own gRPC server: gRPC's core does not survive fork() once it has started
threads, and each worker needs its own shmgrpc pool anyway. The parent
creates no gRPC object at all; it starts the workers, prints one ready line
when all are listening, forwards SIGTERM/SIGINT, and reaps them.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import sys
import time
from typing import List, Optional

from .serve import ServeError, ServeOptions, exit_with_parent, serve
from .signals import StopSignals

_START_TIMEOUT = 60.0  # seconds for every worker to report it is listening
_STOP_TIMEOUT = 15.0  # seconds a worker gets after SIGTERM before SIGKILL
_POLL_SECONDS = 0.2


def worker_addresses(listen: List[str], workers: int, index: int) -> List[str]:
    """A TCP address is shared by all workers; a unix socket cannot be shared
    (no SO_REUSEPORT for AF_UNIX), so worker i gets "<path>.<i>"."""
    return [f"{address}.{index}" if address.startswith("unix") else address for address in listen]


def check_listen(listen: List[str], workers: int) -> None:
    for address in listen:
        if not address.startswith("unix") and address.rsplit(":", 1)[-1] == "0":
            raise ServeError(
                f"--workers {workers} needs a fixed port, not {address}: each worker would get its own port"
            )


def run_workers(options: ServeOptions, workers: int, print_ready) -> int:
    """Run `workers` servers until SIGTERM/SIGINT; the exit status for main()."""
    check_listen(list(options.listen), workers)
    if any(address.startswith("unix") for address in options.listen):
        print(
            "note: unix sockets cannot be shared between processes; "
            "each worker listens on its own path, suffixed .0, .1, ...",
            file=sys.stderr,
        )
    with StopSignals() as stop:
        return _supervise(options, workers, print_ready, stop)


def _supervise(options: ServeOptions, workers: int, print_ready, stop: StopSignals) -> int:
    context = multiprocessing.get_context("spawn")
    reports = context.Queue()
    processes = []
    try:
        for index in range(workers):
            worker_options = dataclasses.replace(
                options, listen=worker_addresses(list(options.listen), workers, index), reuseport=True
            )
            process = context.Process(
                target=_worker,
                args=(worker_options, index, reports, os.getpid()),
                name=f"blobstore-worker-{index}",
            )
            process.start()
            processes.append(process)
        bound = _await_ready(reports, processes, stop)
        if bound is None:
            return 1
        # In --listen order; a shared TCP address once, then each worker's unix path.
        addresses = list(dict.fromkeys(worker[0][j] for j in range(len(options.listen)) for worker in bound))
        pids = ",".join(str(process.pid) for process in processes)
        print_ready(addresses, f"{workers} workers, pids {pids}, {bound[0][1]}")
        stop.wait(alive=lambda: all(process.is_alive() for process in processes))
        if not stop.stopping:
            print("error: a worker exited; stopping the others", file=sys.stderr)
    finally:
        failed = _stop(processes)
    return 1 if failed or not stop.stopping else 0


def _await_ready(reports, processes, stop: StopSignals) -> Optional[list]:
    """[(addresses, description)] once every worker listens; None on failure."""
    bound = {}
    deadline = time.monotonic() + _START_TIMEOUT
    while len(bound) < len(processes):
        if stop.stopping:
            return None
        if time.monotonic() > deadline:
            print(f"error: workers not listening after {_START_TIMEOUT:.0f}s", file=sys.stderr)
            return None
        try:
            index, addresses, description, error = reports.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if not all(process.is_alive() for process in processes):
                print("error: a worker exited while starting", file=sys.stderr)
                return None
            continue
        if error:
            print(f"error: worker {index}: {error}", file=sys.stderr)
            return None
        bound[index] = (addresses, description)
    return [bound[index] for index in sorted(bound)]


def _stop(processes) -> bool:
    """SIGTERM every worker, wait, SIGKILL stragglers; True if any failed."""
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM: the worker stops its server and exits 0
    failed = False
    deadline = time.monotonic() + _STOP_TIMEOUT
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            print(f"error: worker pid {process.pid} ignored SIGTERM; killing it", file=sys.stderr)
            process.kill()
            process.join()
        if process.exitcode != 0:
            print(f"error: worker pid {process.pid} exited with status {process.exitcode}", file=sys.stderr)
            failed = True
    return failed


def _worker(options: ServeOptions, index: int, reports, parent_pid: int) -> None:
    exit_with_parent(parent_pid)
    try:
        serve(options, lambda addresses, description: reports.put((index, addresses, description, None)))
    except ServeError as error:
        reports.put((index, None, None, str(error)))
        sys.exit(1)
