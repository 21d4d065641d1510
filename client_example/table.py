"""The per-size result table, as plain text."""

from __future__ import annotations

from typing import List, Optional, Sequence

from shmgrpc.config import MiB, format_size
from shmgrpc.tools import format_table

HEADER = ("mode", "median ms", "MiB/s", "vs unix", "client peak MiB", "server peak MiB", "via shmgrpc")


def render(size: int, repeat: int, calls: int, results: Sequence, baseline: str) -> str:
    """`results`: workload.ModeResult per mode, in row order."""
    medians = {result.name: result.median for result in results}
    base = medians.get(baseline)
    rows = [list(HEADER)]
    notes: List[str] = []
    for result in results:
        median = result.median
        rows.append([
            result.name,
            f"{median * 1e3:.2f}",
            f"{2 * size / MiB / median:.0f}",
            f"{base / median:.2f}x" if base else "-",
            _peak(result.client_peak, result.client_rise),
            _peak(result.server_peak, result.server_rise),
            _via(result),
        ])
        if result.fallbacks:
            reasons = ", ".join(f"{reason} x{n}" for reason, n in sorted(result.fallbacks.items()))
            notes.append(f"  {result.name} fell back to inline: {reasons}")
    intro = (f"{format_size(size)}: median of {repeat * calls} Echo calls per mode "
             f"({repeat} rounds x {calls}); MiB/s counts the payload both ways;\n"
             f"peak RSS is the highest in any round, (+rise) how far above the round's starting RSS")
    return "\n".join([intro] + format_table(rows, align="<") + notes)


def _peak(peak: Optional[int], rise: Optional[int]) -> str:
    """'726 (+320)': the peak, and how far above its starting RSS it rose."""
    if peak is None:
        return "-"
    return f"{peak / MiB:.0f}" + ("" if rise is None else f" (+{rise / MiB:.0f})")


def _via(result) -> str:
    """'8/10 shm': of the requests and replies, how many skipped the socket."""
    if not result.offloads:
        return "-"
    if result.out_of_band is None:
        return "?"
    transports = "+".join(sorted(result.transports))  # empty if stats() cannot tell
    return f"{result.out_of_band}/{result.messages} {transports}".rstrip()
