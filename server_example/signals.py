"""SIGTERM and SIGINT as a request to stop, for the server and its workers."""

from __future__ import annotations

import signal
import time
from typing import Callable, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_POLL_SECONDS = 0.2  # how soon wait() notices the flag


class StopSignals:
    """From construction on, SIGTERM/SIGINT set `stopping` and call `on_stop`
    (settable later, e.g. once an event loop exists).

    The handler only flips a bool, which the main thread polls: setting a
    threading.Event from a handler can deadlock when the signal lands while
    the main thread holds that Event's own lock.

    Leaving the `with` block ignores both signals for good. We are exiting by
    then, and a late duplicate (Ctrl-C reaches a parent and its workers alike;
    `timeout` and systemd signal a whole group) must not turn a clean exit
    into death by signal: at interpreter shutdown CPython puts Python-level
    handlers back to SIG_DFL, but leaves SIG_IGN alone.
    """

    def __init__(self, on_stop: Optional[Callable[[], None]] = None) -> None:
        self.stopping = False
        self.on_stop = on_stop
        for signum in SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.stopping = True
        if self.on_stop is not None:
            self.on_stop()

    def wait(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Sleep until a signal arrives or `alive()` turns false."""
        while not self.stopping and alive():
            time.sleep(_POLL_SECONDS)

    def __enter__(self) -> "StopSignals":
        return self

    def __exit__(self, *exc_info) -> None:
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
