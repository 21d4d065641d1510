"""Timed Echo calls, every reply checked against what was sent.

For each size: one untimed warm-up round, then `repeat` timed rounds. In a
round every mode runs the same calls, in an order rotated by one per round,
so that slow drift (page cache, CPU frequency, a noisy neighbour) lands on
all modes alike instead of on whichever ran last.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import grpc

from protos import blobstore_pb2
from server_example import memory

from .channels import Mode
from .errors import Failure, rpc_failure
from .table import format_size

KiB = 1024
MiB = 1024 * KiB
ECHO_TIMEOUT = 120.0  # seconds; a hung call fails the run instead of hanging it
_CALLS_BUDGET = 8 * MiB  # small sizes get several calls per round, up to this many bytes...
_MAX_CALLS = 10  # ...and at most this many, so a 4 KiB median is not one lucky sample


def calls_per_round(size: int) -> int:
    return max(1, min(_MAX_CALLS, _CALLS_BUDGET // max(size, 1)))


@dataclasses.dataclass
class ModeResult:
    """One mode at one size, over the timed rounds."""

    name: str
    offloads: bool  # a shmgrpc mode (its channel is wrapped by shmgrpc)
    latencies: List[float] = dataclasses.field(default_factory=list)
    # Peak RSS in bytes, highest over the rounds; and the most it rose above
    # the RSS at the start of a batch. The rise is what one mode's calls cost:
    # the absolute peak also holds what earlier modes left in malloc's arenas.
    client_peak: Optional[int] = None
    client_rise: Optional[int] = None
    server_peak: Optional[int] = None
    server_rise: Optional[int] = None
    messages: int = 0  # requests + replies sent
    out_of_band: Optional[int] = 0  # of those, how many shmgrpc moved (the channel's count)
    transports: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    fallbacks: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def median(self) -> float:
        return statistics.median(self.latencies)


def warm_up(mode: Mode, threshold: int) -> None:
    """Connect, and let shmgrpc do its handshake, before anything is timed."""
    for size in (KiB, 2 * threshold):
        echo(mode, os.urandom(size), f"warm-up-{size}")


def echo(mode: Mode, payload: bytes, key: str) -> float:
    """One Echo round trip; seconds taken. Raises Failure unless the reply is
    the request, byte for byte."""
    request = blobstore_pb2.Blob(key=key, data=payload, labels={"call": key})
    start = time.perf_counter()
    try:
        reply = mode.stub.Echo(request, timeout=ECHO_TIMEOUT)
    except grpc.RpcError as error:
        raise rpc_failure(f"Echo of {format_size(len(payload))} over {mode.name}", error) from None
    elapsed = time.perf_counter() - start
    problem = _difference(request, reply)
    if problem:
        raise Failure(f"Echo of {format_size(len(payload))} over {mode.name} returned other bytes: {problem}")
    return elapsed


def _difference(sent: blobstore_pb2.Blob, got: blobstore_pb2.Blob) -> Optional[str]:
    if got.key != sent.key or dict(got.labels) != dict(sent.labels):
        return f"key/labels {got.key!r} {dict(got.labels)} instead of {sent.key!r} {dict(sent.labels)}"
    if got.data == sent.data:
        return None
    digests = f"sha256 sent {_sha(sent.data)}, received {_sha(got.data)}"
    if len(got.data) != len(sent.data):
        return f"{len(got.data)} bytes instead of {len(sent.data)} ({digests})"
    return f"first difference at byte {_first_difference(sent.data, got.data)} ({digests})"


def _first_difference(a: bytes, b: bytes, step: int = 64 * KiB) -> int:
    start = next(i for i in range(0, len(a), step) if a[i : i + step] != b[i : i + step])
    return next(i for i in range(start, start + step) if a[i] != b[i])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run_size(
    modes: Sequence[Mode],
    size: int,
    repeat: int,
    progress: Callable[[str], None],
) -> List[ModeResult]:
    """Time Echo of `size` bytes in every mode."""
    results = {mode.name: ModeResult(mode.name, mode.offloads) for mode in modes}
    calls = calls_per_round(size)
    for round_ in range(-1, repeat):  # round -1 warms up: new buffer sizes, new pool slots
        shift = (round_ + 1) % len(modes)
        order = list(modes[shift:]) + list(modes[:shift])
        # Fresh bytes every round (the modes of one round share them, each
        # under its own key): a reply served from a stale buffer or slot
        # cannot match by luck.
        payloads = [os.urandom(size) for _ in range(calls)]
        medians = {}
        for mode in order:
            keep = results[mode.name] if round_ >= 0 else None
            medians[mode.name] = _batch(mode, payloads, f"{size}-{round_}-{mode.name}", keep)
        del payloads
        label = "warm-up" if round_ < 0 else f"round {round_ + 1}/{repeat}"
        progress(
            f"{format_size(size):>8} {label}: "
            + ", ".join(f"{mode.name} {medians[mode.name] * 1e3:.1f} ms" for mode in modes)
        )
    return [results[mode.name] for mode in modes]


def _batch(mode: Mode, payloads: List[bytes], tag: str, result: Optional[ModeResult]) -> float:
    """Echo each payload once; median seconds. Adds to `result` if given.

    Status calls bracket the batch to measure the server's peak RSS. They go
    over the mode's own channel, so they reach the very process that served
    it (with --workers, each connection sticks to one worker).
    """
    # A peak we could not reset would be the process's lifetime peak: report
    # nothing rather than that.
    client_start = memory.current_rss() if memory.reset_peak() else None
    server = _status(mode, reset_peak=True)
    server_start = server.vm_rss if server.peak_reset else None
    before = mode.stats()
    latencies = [echo(mode, payload, f"echo-{tag}-{i}") for i, payload in enumerate(payloads)]
    after = mode.stats()
    client_peak = memory.peak_rss() if client_start is not None else None
    server_peak = _status(mode, reset_peak=False).vm_hwm if server_start is not None else None
    if result is not None:
        result.latencies.extend(latencies)
        result.client_peak = _max(result.client_peak, client_peak)
        result.client_rise = _max(result.client_rise, _minus(client_peak, client_start))
        result.server_peak = _max(result.server_peak, server_peak)
        result.server_rise = _max(result.server_rise, _minus(server_peak, server_start))
        result.messages += 2 * len(payloads)
        if mode.offloads:
            _add_offload_counts(result, before, after)
    return statistics.median(latencies)


def _status(mode: Mode, reset_peak: bool) -> blobstore_pb2.StatusReply:
    try:
        return mode.stub.Status(blobstore_pb2.StatusRequest(reset_peak=reset_peak), timeout=ECHO_TIMEOUT)
    except grpc.RpcError as error:
        raise rpc_failure(f"Status over {mode.name}", error) from None


def _add_offload_counts(result: ModeResult, before: Optional[Dict], after: Optional[Dict]) -> None:
    """What the mode's channel did meanwhile: requests it offloaded plus
    replies it restored are the messages that skipped the socket."""
    if before is None or after is None or result.out_of_band is None:
        result.out_of_band = None  # unknown
        return

    def count(stats: Dict, *path: str) -> int:
        for key in path:
            stats = (stats or {}).get(key) or {}
        return stats if isinstance(stats, int) else 0

    result.out_of_band += sum(
        count(after, kind, "count") - count(before, kind, "count") for kind in ("offloaded", "restored")
    )
    for transport in after.get("by_transport") or {}:
        delta = sum(
            count(after, "by_transport", transport, kind, "count")
            - count(before, "by_transport", transport, kind, "count")
            for kind in ("offloaded", "restored")
        )
        if delta > 0:
            result.transports[transport] += delta
    for reason in after.get("fallbacks") or {}:
        delta = count(after, "fallbacks", reason) - count(before, "fallbacks", reason)
        if delta > 0:
            result.fallbacks[reason] += delta


def _max(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return b if a is None else a if b is None else max(a, b)


def _minus(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return None if a is None or b is None else max(0, a - b)
