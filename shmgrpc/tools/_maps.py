"""Where a buffer lies in this process: its mapping in /proc/self/maps.

What proves the buffer codec's "no copy on receipt": a message's memory is
a view of shared memory (a memfd, or a file in /dev/shm) rather than of the
heap. Used by the array bench, the demo's array method and the tests.
"""

from __future__ import annotations

from typing import Any, Dict

from ..transports._vm import address_of


def mapping_of(buffer: Any) -> Dict[str, Any]:
    """{"shared": the mapping holding `buffer`'s first byte is shared,
    "path": its path ("" for anonymous memory)}."""
    address = address_of(buffer)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return {"shared": fields[1][3] == "s", "path": fields[5].strip() if len(fields) > 5 else ""}
    return {"shared": False, "path": ""}
