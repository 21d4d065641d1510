"""Build one BlobStore server (sync or asyncio), run it until SIGTERM/SIGINT,
then stop it and return normally, so that atexit cleanup (shmgrpc's pool)
runs in this process."""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import signal
from concurrent import futures
from typing import Callable, List, Sequence

from protos import blobstore_pb2_grpc

from . import arrays, offload
from .signals import StopSignals
from .service import AioBlobStoreServicer, BlobStoreServicer
from .store import Store

MiB = 1024 * 1024
READY_PREFIX = "listening on "  # the client waits for a stdout line starting with this
_THREADS = 16  # concurrent RPCs per sync server; each streaming call holds a thread


class ServeError(Exception):
    """The server could not start (bad address, port in use, ...)."""


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    listen: Sequence[str]
    aio: bool = False
    max_message_mib: int = 1100
    # gRPC turns SO_REUSEPORT on by default on Linux, which lets a second
    # server silently share a busy port. Only --workers wants that.
    reuseport: bool = False
    grace_seconds: float = 5.0

    def grpc_options(self) -> List[tuple]:
        limit = self.max_message_mib * MiB
        return [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 1 if self.reuseport else 0),
        ]


# on_ready(addresses actually bound, one-line description of the server)
OnReady = Callable[[List[str], str], None]


def serve(options: ServeOptions, on_ready: OnReady) -> None:
    """Serve until SIGTERM or SIGINT; raises ServeError if it cannot start."""
    # Signals first: one that arrives during start-up still stops us cleanly.
    # Also before asyncio.run(), which would otherwise install its own SIGINT
    # handler and put default_int_handler back on the way out.
    with StopSignals() as stop:
        if options.aio:
            asyncio.run(_run_aio(options, on_ready, stop))
        else:
            _run_sync(options, on_ready, stop)


def _run_sync(options: ServeOptions, on_ready: OnReady, stop: StopSignals) -> None:
    server, note = offload.make_server(
        aio=False,
        options=options.grpc_options(),
        thread_pool=futures.ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="blobstore"),
    )
    try:
        servicer = BlobStoreServicer(Store(), lambda: offload.stats_summary(server))
        blobstore_pb2_grpc.add_BlobStoreServicer_to_server(servicer, server)
        arrays.add_to_server(server, aio=False)
        bound = [_bind(server, address) for address in options.listen]
        server.start()
        try:
            on_ready(bound, f"sync, {note}")
            stop.wait()
        finally:
            server.stop(options.grace_seconds).wait()
    finally:
        offload.close(server)


async def _run_aio(options: ServeOptions, on_ready: OnReady, stop: StopSignals) -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    # Not loop.add_signal_handler(): loop.close() would restore SIG_DFL,
    # undoing StopSignals' SIG_IGN for the rest of the exit.
    stop.on_stop = lambda: loop.call_soon_threadsafe(stopped.set)
    if stop.stopping:  # a signal came before on_stop was set
        stopped.set()
    server, note = offload.make_server(aio=True, options=options.grpc_options())
    try:
        servicer = AioBlobStoreServicer(Store(), lambda: offload.stats_summary(server))
        blobstore_pb2_grpc.add_BlobStoreServicer_to_server(servicer, server)
        arrays.add_to_server(server, aio=True)
        bound = [_bind(server, address) for address in options.listen]
        await server.start()
        try:
            on_ready(bound, f"asyncio, {note}")
            await stopped.wait()
        finally:
            await server.stop(options.grace_seconds)
    finally:
        offload.close(server)


def _bind(server, address: str) -> str:
    """Add a listening address; returns it with the real port if it asked for 0."""
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:  # grpcio >= 1.46 raises instead of returning 0
        raise ServeError(f"cannot listen on {address}: {error}") from None
    if address.startswith("unix"):
        return address
    if port == 0:
        raise ServeError(f"cannot listen on {address}")
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent_pid: int) -> None:
    """Have the kernel send us SIGTERM when `parent_pid` (our parent) dies,
    even by SIGKILL, so no server outlives the process that started it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    # The parent may have died before prctl() took effect; we were reparented then.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
