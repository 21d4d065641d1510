"""Resident memory of this process, from Linux's /proc.

The benchmark reports peak RSS per run, so it needs to read the peak (VmHWM)
and to reset it between runs. Both the server and the client use this module.
"""

from __future__ import annotations

from typing import Optional

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
# proc(5): writing "5" to clear_refs resets VmHWM to the current VmRSS
# (Linux >= 4.0). The other values clear page-reference bits, which we do not
# want to touch.
_RESET_PEAK = "5"


def _status_kib(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # "VmHWM:   12345 kB"
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> Optional[int]:
    """Peak resident set size in bytes since start or the last reset; None if unknown."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def current_rss() -> Optional[int]:
    """Resident set size in bytes now; None if unknown."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak() -> bool:
    """Make the peak equal the current RSS; False where the kernel refuses."""
    try:
        with open(_CLEAR_REFS, "w") as clear_refs:
            clear_refs.write(_RESET_PEAK)
        return True
    except OSError:
        return False
