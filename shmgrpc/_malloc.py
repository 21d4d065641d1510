"""Warm memory: tell glibc's malloc to keep what it frees.

Where the time of a large message goes is not the IPC but first-touch page
faults: every fresh buffer (the serialized bytes, the parsed message, a
field's bytes) above glibc's mmap threshold is a new mapping, faulted in at
~1 GB/s, and freeing it trims it straight back to the kernel. Three settings
keep that memory in the process, warm, for the next message (measured in
docs/performance notes and README, "Performance"):

    M_TRIM_THRESHOLD = 2 GiB  never give freed heap back to the kernel
    M_MMAP_MAX       = 0      no per-allocation mappings: large buffers come
                              from the heap, and so are kept and reused
    M_ARENA_MAX      = 1      one arena: buffers freed by one thread serve
                              the next allocation of any other (gRPC's and
                              the executor's threads included)

Measured pitfalls: the trim threshold alone freezes the mmap threshold and
makes 1 MiB messages slower; without the single arena, threads created
later still map anything large. The price: the process's RSS stays at its
peak, and one arena serializes malloc between threads. So it is opt-in:
SHMGRPC_MALLOC=keep (applied when the first channel or server is built) or
shmgrpc.tune_malloc() (call it early, before threads start: M_ARENA_MAX only
shapes arenas made afterwards).

The narrower lever needs no code and cannot be set from here:
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in a process's environment (glibc
reads it at start-up) makes glibc ask for transparent huge pages on what it
maps, so fresh buffers fault 2 MiB at a time and freed memory still goes
back to the kernel (README, "Warm memory"; `make bench`'s hugepages phase).
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from typing import Dict, Mapping

log = logging.getLogger(__name__)

# <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_TRIM_THRESHOLD, 2 << 30), (M_MMAP_MAX, 0), (M_ARENA_MAX, 1))

# The narrower lever's setting, in GLIBC_TUNABLES (colon separated).
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def hugetlb_requested(environ: Mapping[str, str]) -> bool:
    """Does `environ`'s GLIBC_TUNABLES hold HUGETLB_TUNABLE?"""
    return HUGETLB_TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def with_hugetlb(environ: Mapping[str, str]) -> Dict[str, str]:
    """A copy of `environ` whose GLIBC_TUNABLES holds HUGETLB_TUNABLE."""
    env = dict(environ)
    if not hugetlb_requested(env):
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        env["GLIBC_TUNABLES"] = ":".join(tunables + [HUGETLB_TUNABLE])
    return env


def thp_mode() -> str:
    """The kernel's transparent huge page mode (always, madvise, never), or
    "unknown" where it cannot be read."""
    try:
        with open(THP_ENABLED) as f:
            match = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return "unknown"
    return match.group(1) if match else "unknown"


_lock = threading.Lock()  # protects _applied
_applied = None  # None: not tried yet; then True or False


def tune_malloc() -> bool:
    """Keep freed memory warm in this process (see the module text). Once per
    process; True if glibc took every setting, False where there is no glibc
    mallopt (musl, other platforms), which changes nothing else."""
    global _applied
    with _lock:
        if _applied is not None:
            return _applied
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # glibc only: musl's has no mallopt semantics to speak of
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _applied = False
            log.info("SHMGRPC_MALLOC=keep has no effect here (no glibc mallopt)")
            return False
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
        if _applied:
            log.info(
                "malloc keeps freed memory (M_TRIM_THRESHOLD=2GiB, M_MMAP_MAX=0, M_ARENA_MAX=1): "
                "large messages reuse warm memory; RSS stays at its peak"
            )
        else:
            log.warning("glibc refused a malloc setting; SHMGRPC_MALLOC=keep is only partly in effect")
        return _applied
