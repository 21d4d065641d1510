"""Log helpers: one line per cause, not one per message.

Loggers are per module (`shmgrpc._core`, `shmgrpc.pool`, ...) under the
parent "shmgrpc", so a handler or level set on "shmgrpc" covers them all.
Levels: DEBUG for each handshake step and each fallback (rate-limited),
INFO once per channel when it settles and for one-off facts, WARNING only
when something the user configured cannot be honoured (or a channel that
was offloading stops).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, Hashable, Optional, Set, Tuple


class RateLimit:
    """`allow(key)`: the number of calls for `key` suppressed since its
    last allowed one (0 the first time), or None to suppress this one. At
    most one allowed call per key per `interval` seconds; at most
    `max_keys` keys remembered (the oldest are forgotten)."""

    def __init__(self, interval: float = 60.0, max_keys: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: Dict[Hashable, Tuple[float, int]] = {}  # key -> (last allowed, suppressed since)

    def allow(self, key: Hashable) -> Optional[int]:
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None and now - entry[0] < self.interval:
                self._keys[key] = (entry[0], entry[1] + 1)
                return None
            if entry is None and len(self._keys) >= self.max_keys:
                self._keys.pop(next(iter(self._keys)))
            self._keys[key] = (now, 0)
            return entry[1] if entry is not None else 0


_said_lock = threading.Lock()  # protects _said
_said: Set[Hashable] = set()


def once(key: Hashable) -> bool:
    """True the first time `key` is asked about in this process, then False:
    for the one WARNING a cause gets however many engines meet it."""
    if key in _said:
        return False
    with _said_lock:
        if key in _said:
            return False
        _said.add(key)
        return True


def repeats(suppressed: int) -> str:
    """' (and 3 more like it)' for a log line that stood for others."""
    return f" (and {suppressed} more like it)" if suppressed else ""
