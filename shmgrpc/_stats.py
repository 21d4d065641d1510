"""Counters: per engine, summed for the process when asked."""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Any, Dict, Tuple

from .transports import NAMES


class Stats:
    """Counters of one engine. The process's totals (stats()) are summed
    over every engine's counters when asked for, so that counting costs one
    lock per message, not two."""

    _lock_all = threading.Lock()  # protects _live and _retired
    _live: "weakref.WeakSet[Stats]" = weakref.WeakSet()
    _retired: Dict[Tuple[str, str], int] = collections.Counter()  # counts of Stats gone since
    _notes: Dict[str, str] = {}  # the latest note of every key, process-wide

    def __init__(self, track: bool = True):
        self._lock = threading.Lock()
        # (kind, key) -> count, and (kind, key + ":bytes") -> bytes
        self._counts: Dict[Tuple[str, str], int] = collections.Counter()
        self.notes: Dict[str, str] = {}
        if track:
            with Stats._lock_all:
                Stats._live.add(self)
            weakref.finalize(self, Stats._retire, self._counts, self._lock)

    @staticmethod
    def _retire(counts, lock) -> None:
        with lock:
            final = dict(counts)
        with Stats._lock_all:
            Stats._retired.update(final)

    def add(self, kind: str, key: str, count: int = 1, nbytes: int = 0) -> None:
        with self._lock:
            self._counts[(kind, key)] += count
            if nbytes:
                self._counts[(kind, key + ":bytes")] += nbytes

    def add_inline(self, nbytes: int) -> None:
        """add("inline", "all", 1, nbytes): every small message, so kept short."""
        with self._lock:
            counts = self._counts
            counts[_INLINE] += 1
            counts[_INLINE_BYTES] += nbytes

    def note(self, key: str, text: str) -> None:
        self.notes[key] = text
        Stats._notes[key] = text

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
        return _snapshot(counts, dict(self.notes))

    @classmethod
    def process_snapshot(cls) -> Dict[str, Any]:
        """Every engine's counters summed, those of engines gone included."""
        with cls._lock_all:
            total = collections.Counter(cls._retired)
            live = list(cls._live)
            notes = dict(cls._notes)
        for one in live:
            with one._lock:
                total.update(one._counts)
        return _snapshot(total, notes)


_INLINE = ("inline", "all")
_INLINE_BYTES = ("inline", "all:bytes")


def _snapshot(counts: Dict[Tuple[str, str], int], notes: Dict[str, str]) -> Dict[str, Any]:
    def pair(kind: str, key: str) -> Dict[str, int]:
        return {"count": counts.get((kind, key), 0), "bytes": counts.get((kind, key + ":bytes"), 0)}

    return {
        "offloaded": {
            "count": sum(counts.get(("offloaded", t), 0) for t in NAMES),
            "bytes": sum(counts.get(("offloaded", t + ":bytes"), 0) for t in NAMES),
        },
        "restored": {
            "count": sum(counts.get(("restored", t), 0) for t in NAMES),
            "bytes": sum(counts.get(("restored", t + ":bytes"), 0) for t in NAMES),
        },
        "by_transport": {t: {"offloaded": pair("offloaded", t), "restored": pair("restored", t)} for t in NAMES},
        "inline": pair("inline", "all"),
        "fallbacks": {k: v for (kind, k), v in counts.items() if kind == "fallback"},
        "errors": {k: v for (kind, k), v in counts.items() if kind == "error"},
        "notes": notes,
    }
