"""Configuration: one frozen dataclass, and the SHMGRPC_* names, once.

`Config.from_env()` reads the environment when it is called (the interceptors
call it when they are built, never at import), and every invalid value raises
ConfigError naming the variable and the forms it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import threading
from typing import Any, Dict, Mapping, Optional, Set, Tuple

from .errors import ConfigError

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

TRANSPORTS = ("auto", "memfd", "shm", "cma", "off")
MALLOC = ("default", "keep")

# Binary multiples only: "64K", "64KB" and "64KiB" all mean 65536. A storage
# library that read "1MB" as 10**6 would round slot sizes to odd numbers.
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}
_SIZE_RE = re.compile(r"^\s*(\d{1,20})\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_FORMS = "a byte count such as 65536, 64K, 64KiB, 1M, 1MiB or 2G (binary units)"
_SECONDS_RE = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,12})?)\s*(ms|s|m)?\s*$", re.IGNORECASE)
_SECONDS_FORMS = "seconds such as 30, 30s, 500ms or 2m"
_FRACTION_RE = re.compile(r"^\s*(\d{1,3}(?:\.\d{1,6})?|\.\d{1,6})\s*(%?)\s*$")
_FRACTION_FORMS = "a fraction such as 0.5 or 50%"


def _shown(text: object) -> str:
    """A value as quoted in an error: repr, cut short (a 5000-digit number
    should not fill the log)."""
    text = repr(text)
    return text if len(text) <= 42 else text[:30] + "..." + text[-8:]


def parse_size(text: str, name: str = "size") -> int:
    """Parse '65536', '64KiB', '1MiB', '1M' into bytes; ConfigError otherwise."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"{name}={_shown(text)} is not {_SIZE_FORMS}")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def format_size(n: float) -> str:
    """A byte count for people: 4194304 -> '4 MiB', 1536 -> '1.5 KiB', 100 -> '100 B'."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n // size:.0f} {unit}" if n % size == 0 else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def parse_fraction(text: str, name: str = "fraction") -> float:
    """Parse '0.5', '50%', '1' into a float; ConfigError otherwise."""
    match = _FRACTION_RE.match(str(text))
    if not match:
        raise ConfigError(f"{name}={_shown(text)} is not {_FRACTION_FORMS}")
    value = float(match.group(1))
    return value / 100.0 if match.group(2) else value


def parse_seconds(text: str, name: str = "seconds") -> float:
    """Parse '30', '30s', '500ms', '2m' into seconds; ConfigError otherwise."""
    match = _SECONDS_RE.match(str(text))
    if not match:
        raise ConfigError(f"{name}={_shown(text)} is not {_SECONDS_FORMS}")
    value = float(match.group(1))
    unit = (match.group(2) or "s").lower()
    return value / 1000.0 if unit == "ms" else value * 60.0 if unit == "m" else value


@dataclasses.dataclass(frozen=True)
class Config:
    """What an interceptor offloads, how, and with how much shared memory.

    Every field has an environment variable (see ENV below and the README).
    """

    # Serialized size at or above which a message is offloaded. Measured on a
    # 2-core VM (README, "Threshold"): at 64 KiB a handle still costs more than
    # the socket, from 128 KiB on it wins.
    threshold: int = 128 * KiB
    # auto | shm | cma | off. auto takes the ladder in AUTO_ORDER.
    transport: str = "auto"
    # Most bytes of shared memory this process's pool may hold at once.
    pool_size: int = 1 * GiB
    # Slots smaller than this are carved out of segments of this size; larger
    # messages get a segment of their own, rounded to their size class.
    segment_size: int = 16 * MiB
    # Largest message offloaded; a larger one goes inline. A receiver also
    # refuses a handle longer than its own limit.
    max_message: int = 1 * GiB
    # A slot nobody acknowledged is reused after this long (if its reader is
    # still alive). A reader that comes later gets DATA_LOSS, never other bytes.
    lease_seconds: float = 60.0
    # Smallest message the cma transport carries (and never below
    # `threshold`): each cma read costs four calls into the peer's memory,
    # so below ~512 KiB cma loses to the socket (README, "Threshold"); such
    # a message takes the next rung, or goes inline.
    cma_threshold: int = 512 * KiB
    # Most bytes the cma transport keeps pinned for readers that have not
    # acknowledged yet; past it, messages take the next rung (shm, then inline).
    cma_max_pinned: int = 1 * GiB
    # The share of pool_size, and of cma_max_pinned, that the messages this
    # process has offloaded to one peer process and that it has not read yet
    # (or may read again: a request gRPC may resend) may hold. Past it, that
    # peer's messages take the next rung, or go inline (where gRPC's flow
    # control holds a slow reader back); other peers still offload. A half:
    # one peer that reads nothing leaves the other half to everyone else,
    # and a single peer still offloads a 256 MiB message under the default
    # caps (its size class, 320 MiB, fits 512 MiB). 1 turns the limit off.
    peer_share: float = 0.5
    # Where POSIX shared memory lives (a tmpfs). Names under it always start
    # with the fixed prefix "shmgrpc-".
    shm_dir: str = "/dev/shm"
    # Where a server's side socket (memfd transport) lives: "" for the
    # abstract namespace (reachable from the same network namespace, e.g. the
    # containers of one pod), or a directory (a volume shared by containers).
    side_dir: str = ""
    # Uids besides our own whose processes may use our side socket.
    side_uids: Tuple[int, ...] = ()
    # "keep": tell glibc's malloc to keep freed memory warm (shmgrpc._malloc),
    # once per process, when the first channel or server is built.
    malloc: str = "default"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            problem = _problem(field.name, getattr(self, field.name))
            if problem:
                raise ConfigError(f"{field.name}={_shown(getattr(self, field.name))}: {problem}")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> "Config":
        """Build a Config from SHMGRPC_* variables; `overrides` win over both."""
        env = os.environ if environ is None else environ
        _warn_unknown(env)
        values: Dict[str, Any] = {}  # field -> value, of the field's type
        for var, (field, parse) in ENV.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                value = parse(raw, var)
            except ConfigError as err:
                accepted = _accepted(field)
                raise ConfigError(f"{err}; accepted: {accepted}" if accepted else str(err)) from None
            problem = _problem(field, value)
            if problem:
                raise ConfigError(f"{var}={_shown(raw)}: {problem}")
            values[field] = value
        values.update(overrides)
        return cls(**values)

    def for_transport(self, transport: str) -> "Config":
        return dataclasses.replace(self, transport=transport)


# The accepted range of each field, (least, most); sizes in bytes. Values out
# of range are refused when the Config is built, never found out later.
MAX_BYTES = 1 << 50  # 1 PiB: anything larger is a typo, not a plan
LEASE_RANGE = (0.1, 86400.0)  # a lease shorter than a read fails every read; a day is plenty
# Above 0: a peer with no share could never offload (that is TRANSPORT=off);
# 1: no limit per peer, only the caps.
SHARE_RANGE = (0.0, 1.0)
SIZE_RANGES = {
    "threshold": (1, MAX_BYTES),
    # zero would be "offload nothing": that is SHMGRPC_TRANSPORT=off, said plainly
    "pool_size": (64 * KiB, MAX_BYTES),
    "segment_size": (64 * KiB, MAX_BYTES),
    "max_message": (1, MAX_BYTES),
    "cma_max_pinned": (0, MAX_BYTES),  # 0: this process never pins for cma
    "cma_threshold": (1, MAX_BYTES),
}


def _accepted(field: str) -> str:
    """The accepted range of a numeric field, in words ("" for the others)."""
    if field == "lease_seconds":
        return f"seconds from {LEASE_RANGE[0]} to {LEASE_RANGE[1]:.0f}"
    if field == "peer_share":
        return "a fraction above 0 and at most 1 (0.5 or 50%)"
    if field in SIZE_RANGES:
        least, most = SIZE_RANGES[field]
        return f"from {_fmt(least)} to {_fmt(most)}"
    return ""


def _fmt(n: int) -> str:
    for unit, size in (("PiB", 1 << 50), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _problem(field: str, value: object) -> Optional[str]:
    """Why `value` is not acceptable for `field`, or None."""
    if field == "transport":
        return None if value in TRANSPORTS else f"expected one of {', '.join(TRANSPORTS)}"
    if field == "malloc":
        return None if value in MALLOC else f"expected one of {', '.join(MALLOC)}"
    if field == "lease_seconds":
        least, most = LEASE_RANGE
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and least <= value <= most
        return None if ok else f"expected seconds from {least} to {most:.0f}"
    if field == "peer_share":
        least, most = SHARE_RANGE
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and least < value <= most
        return None if ok else "expected a fraction above 0 and at most 1 (such as 0.5 or 50%)"
    if field == "side_dir":
        if value == "":
            return None
        if not isinstance(value, str) or not os.path.isabs(value) or " " in value:
            return "expected an absolute directory path without spaces, or empty for the abstract namespace"
        return None if os.path.isdir(value) else "is not a directory"
    if field == "side_uids":
        ok = isinstance(value, tuple) and all(isinstance(u, int) and 0 <= u < 2**32 for u in value)
        return None if ok else "expected uids (whole numbers), comma separated"
    if field == "shm_dir":
        if not isinstance(value, str) or not os.path.isabs(value):
            return "expected an absolute directory path"
        if os.path.exists(value) and not os.path.isdir(value):
            return "exists but is not a directory"
        return None  # missing: offload is off on this machine, with a note saying why
    least, most = SIZE_RANGES[field]
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
        hint = " (to turn offload off, set SHMGRPC_TRANSPORT=off)" if field == "pool_size" and value == 0 else ""
        return f"expected a whole number of bytes from {_fmt(least)} to {_fmt(most)}{hint}"
    return None


def _transport(text: str, name: str) -> str:
    value = text.strip().lower()
    if value not in TRANSPORTS:
        raise ConfigError(f"{name}={_shown(text)}: expected one of {', '.join(TRANSPORTS)}")
    return value


def _uids(text: str, name: str) -> Tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(re.match(r"^\d{1,10}$", p) for p in parts):
        raise ConfigError(f"{name}={_shown(text)}: expected uids (whole numbers), comma separated")
    return tuple(int(p) for p in parts)


def _malloc(text: str, name: str) -> str:
    value = text.strip().lower()
    if value not in MALLOC:
        raise ConfigError(f"{name}={_shown(text)}: expected one of {', '.join(MALLOC)}")
    return value


def _size(text: str, name: str) -> int:
    return parse_size(text, name)


def _seconds(text: str, name: str) -> float:
    return parse_seconds(text, name)


def _fraction(text: str, name: str) -> float:
    return parse_fraction(text, name)


def _path(text: str, name: str) -> str:
    return text  # checked by _problem, like a Config field


# Environment variable -> (Config field, parser): every SHMGRPC_* name shmgrpc
# reads; from_env() warns about any other. The README's table mirrors this.
ENV = {
    "SHMGRPC_THRESHOLD": ("threshold", _size),
    "SHMGRPC_TRANSPORT": ("transport", _transport),
    "SHMGRPC_POOL_SIZE": ("pool_size", _size),
    "SHMGRPC_SEGMENT_SIZE": ("segment_size", _size),
    "SHMGRPC_MAX_MESSAGE": ("max_message", _size),
    "SHMGRPC_LEASE": ("lease_seconds", _seconds),
    "SHMGRPC_CMA_MAX_PINNED": ("cma_max_pinned", _size),
    "SHMGRPC_CMA_THRESHOLD": ("cma_threshold", _size),
    "SHMGRPC_PEER_SHARE": ("peer_share", _fraction),
    "SHMGRPC_SHM_DIR": ("shm_dir", _path),
    "SHMGRPC_SIDE_DIR": ("side_dir", _path),
    "SHMGRPC_SIDE_UIDS": ("side_uids", _uids),
    "SHMGRPC_MALLOC": ("malloc", _malloc),
}

PREFIX = "SHMGRPC_"
# Names already warned about: one WARNING per name and process, however many
# channels and servers read the environment. The lock guards the set.
_warned: Set[str] = set()
_warned_lock = threading.Lock()


def _warn_unknown(env: Mapping[str, str]) -> None:
    """One WARNING per SHMGRPC_* variable that is not in ENV (most likely a
    misspelling, silently doing nothing otherwise), naming the closest known
    one. Lower-case names count too: environment names are case-sensitive,
    so `shmgrpc_threshold` is ignored as surely as a typo."""
    for var in list(env):
        if not var.upper().startswith(PREFIX) or var in ENV:
            continue
        with _warned_lock:
            if var in _warned:
                continue
            _warned.add(var)
        # Compared without the prefix every name shares, which would make any
        # SHMGRPC_* name look close to all of them.
        close = difflib.get_close_matches(var.upper()[len(PREFIX):], [n[len(PREFIX):] for n in ENV], n=1)
        hint = f"did you mean {PREFIX}{close[0]}?" if close else "known: " + ", ".join(ENV)
        log.warning("%s is not a shmgrpc setting (%s); ignored", var, hint)


def check_config(config: object, where: str) -> None:
    """TypeError unless `config` is a Config or None: a list there is almost
    always channel options given where the config goes."""
    if config is None or isinstance(config, Config):
        return
    hint = ""
    if isinstance(config, (list, tuple)):
        hint = f"; channel options go by keyword: {where}(channel, options=OPTIONS)"
    raise TypeError(f"{where}: config must be a shmgrpc.Config or None, not {type(config).__name__}{hint}")
