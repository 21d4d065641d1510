"""The per-size result table, as plain text."""

from __future__ import annotations

from typing import List, Optional, Sequence

from shmgrpc.config import MiB, format_size

COLUMNS = (
    # header, width
    ("mode", 12),
    ("median ms", 10),
    ("MiB/s", 9),
    ("vs unix", 8),
    ("client peak MiB", 17),
    ("server peak MiB", 17),
    ("via shmgrpc", 16),
)


def render(size: int, repeat: int, calls: int, results: Sequence, baseline: str) -> str:
    """`results`: workload.ModeResult per mode, in row order."""
    medians = {result.name: result.median for result in results}
    base = medians.get(baseline)
    lines = [
        f"{format_size(size)}: median of {repeat * calls} Echo calls per mode "
        f"({repeat} rounds x {calls}); MiB/s counts the payload both ways;\n"
        f"peak RSS is the highest in any round, (+rise) how far above the round's starting RSS",
        _row(header for header, _ in COLUMNS),
    ]
    notes: List[str] = []
    for result in results:
        median = result.median
        lines.append(
            _row(
                (
                    result.name,
                    f"{median * 1e3:.2f}",
                    f"{2 * size / MiB / median:.0f}",
                    f"{base / median:.2f}x" if base else "-",
                    _peak(result.client_peak, result.client_rise),
                    _peak(result.server_peak, result.server_rise),
                    _via(result),
                )
            )
        )
        if result.fallbacks:
            reasons = ", ".join(f"{reason} x{n}" for reason, n in sorted(result.fallbacks.items()))
            notes.append(f"  {result.name} fell back to inline: {reasons}")
    return "\n".join(lines + notes)


def _row(cells) -> str:
    cells = list(cells)
    first = f"{cells[0]:<{COLUMNS[0][1]}}"
    rest = (f"{cell:>{width}}" for cell, (_, width) in zip(cells[1:], COLUMNS[1:]))
    return first + "".join(rest)


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
