"""What the demo's shmgrpc counters mean, printed under them: the server's
"offloaded 189, restored 186" and each fallback reason that appeared, in
the words shmgrpc.channel_status() gives it (shmgrpc._status.fallback_words)."""

from __future__ import annotations

import re
from typing import Iterable, List

import shmgrpc
from shmgrpc._status import fallback_words


def explain(summary: str, reasons: Iterable[str] = ()) -> str:
    """Lines under "server shmgrpc: <summary>" (server_example/offload.py's
    stats_summary): what its counters mean, and each fallback reason seen
    there or in `reasons` (the tables' "fell back to inline" notes)."""
    lines: List[str] = [
        "  what the server's counts mean:",
        "    offloaded: messages it sent as a handle, their bytes through shared memory"
        " (answers: Echo, Get, Download chunks)",
        "    restored: messages it received as a handle and read back out of shared memory"
        " (requests: Echo, Put, Upload chunks)",
        "    the two differ because not every call is large both ways: Put is large only in, Get only out,"
        " and Download sends back 512 KiB chunks where Upload sent 1 MiB ones",
        "    inline: messages that went through gRPC itself: below the threshold (SHMGRPC_THRESHOLD), or a fallback",
        "    by transport: offloaded plus restored, per transport (every client's shmgrpc channels together)",
    ]
    seen = set(reasons)
    listed = re.search(r"fallbacks: (.*?);", summary)
    if listed and listed.group(1) != "none":
        seen.update(part.rsplit(" ", 1)[0] for part in listed.group(1).split(", "))
    if seen:
        # The library's own words, with this process's settings: the demo
        # server (--demo) runs with the same environment.
        config = shmgrpc.Config.from_env()
        lines.append("    fallbacks: messages at or above the threshold that went inline anyway, by reason:")
        for reason in sorted(seen):
            words = fallback_words(reason, config, {})
            if words == reason:  # a reason this shmgrpc has no words for (a newer server's)
                words += ": see the README, \"Metrics\" (shmgrpc_fallbacks_total)"
            lines.append(f"      {words}")
    return "\n".join(lines)
