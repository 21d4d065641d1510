"""What large messages actually did, per peer and direction, in words.

The status of a channel (and of each client route of a server) is derived
from what happened, not from what the handshake promised: every message at
or above the threshold that goes out on a framed call records what carried
it (a transport, or the fallback reason it went inline for), and every one
that comes in records its transport, or that it came inline. `Recent` keeps
the last RECENT such outcomes of one direction of one route; `Direction`
sums them up; ChannelStatus and PeerStatus put both directions beside the
route's reason. Before any large message, a direction says what the route
expects (messages == 0).

A message that went inline is explained by the side that knows why: the
sender names its fallback reason; a receiver knows only that it came inline,
unless its own state explains it (it cannot read that peer's transports, or
the message is above what it accepts offloaded). Then its words say so and
point to the sender's status.

Nothing here is on the path of a small message.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .config import format_size

TRANSPORT_NAMES = frozenset(("memfd", "shm", "cma"))

# Large messages remembered per direction and route: enough to tell a blip
# (one pool_full among many offloads) from a pattern, few enough that the
# status follows a change within that many messages.
RECENT = 32

# The outcome a receiver records for a large message that came inline and
# whose reason only its sender knows.
SENT_INLINE = "inline"


class Recent:
    """The outcomes of the last RECENT large messages one way on one route:
    a transport name, a fallback reason (a stats()["fallbacks"] key) or
    SENT_INLINE.

    `add` runs once per large message, without a lock: a list store and an
    attribute store, each atomic under the GIL, of strings that exist
    already. Two threads recording at once may both write one slot (the
    window then holds one outcome fewer than RECENT); a summary tolerates
    that, and a lock here would be the only one some messages take."""

    __slots__ = ("ring", "count")

    def __init__(self) -> None:
        self.ring: List[Optional[str]] = [None] * RECENT
        self.count = 0  # large messages recorded in all

    def add(self, outcome: str) -> None:
        n = self.count
        self.ring[n % RECENT] = outcome
        self.count = n + 1

    def window(self) -> List[str]:
        """The remembered outcomes, oldest first."""
        n, ring = self.count, list(self.ring)
        if n > RECENT:  # wrapped: the oldest is the one the next add overwrites
            ring = ring[n % RECENT:] + ring[: n % RECENT]
        return [o for o in ring[:n] if o is not None]


@dataclass(frozen=True)
class Direction:
    """What large messages (at or above SHMGRPC_THRESHOLD) did one way.

    via: the transport that carried the latest one, or "inline"; before the
        first (messages == 0), what the route expects, or "" when there is
        no route.
    reason: for "inline", why, in words; "" otherwise.
    fallback: the latest inline one's reason among the recent ones, as
        stats()["fallbacks"] names it ("inline": it came inline and only its
        sender knows why), "" when none of them went inline.
    messages: large messages this way since the route was learned.
    recent: (transport or reason, count) over the last RECENT of them, most
        frequent first.
    """

    via: str = ""
    reason: str = ""
    fallback: str = ""
    messages: int = 0
    recent: Tuple[Tuple[str, int], ...] = ()

    @property
    def inline(self) -> bool:
        """The latest large message (or, before any, the expected one) goes inline."""
        return self.via == "inline"

    @property
    def offloads(self) -> bool:
        return self.via in TRANSPORT_NAMES

    def words(self, noun: str) -> str:
        """'requests via memfd', 'responses inline (why)', with the mix of
        the recent ones when they differ."""
        if not self.via:
            return f"{noun}: no route"
        if not self.messages:
            return f"{noun} {'would go' if self.inline else 'expected'} " + (
                f"inline ({self.reason})" if self.inline else f"via {self.via}") + " (none yet)"
        text = f"{noun} inline ({self.reason})" if self.inline else f"{noun} via {self.via}"
        if len(self.recent) > 1:
            seen = sum(count for _, count in self.recent)
            text += f" [last {seen}: " + ", ".join(f"{k} {v}" for k, v in self.recent) + "]"
        return text

    def __str__(self) -> str:
        return self.words("large messages")

    def to_json(self) -> Dict[str, object]:
        return {"via": self.via, "reason": self.reason, "fallback": self.fallback, "messages": self.messages,
                "recent": dict(self.recent)}


def summarize(recent: Recent, expected: Tuple[str, str],
              explain: Callable[[str], Tuple[str, str]]) -> Direction:
    """The Direction of `recent`: its latest outcome, or `expected` (via,
    reason) before any. `explain(outcome)`: (reason code, words) for an
    outcome that went inline (a receiver may know better than "inline")."""
    outcomes = recent.window()
    if not outcomes:
        return Direction(expected[0], expected[1] if expected[0] == "inline" else "", "", 0, ())
    last = outcomes[-1]
    counts = tuple(collections.Counter(outcomes).most_common())
    latest_inline = next((o for o in reversed(outcomes) if o not in TRANSPORT_NAMES), None)
    code, words = explain(latest_inline) if latest_inline is not None else ("", "")
    if last in TRANSPORT_NAMES:
        return Direction(last, "", code, recent.count, counts)
    return Direction("inline", words, code, recent.count, counts)


def carrier(sent: Direction, received: Direction) -> str:
    """ChannelStatus.transport: what carried the large messages seen (either
    way; the sent direction first), or before any, what sending expects;
    "inline" when nothing carries them."""
    seen = [d for d in (sent, received) if d.messages]
    if seen:
        return next((d.via for d in seen if d.offloads), "inline")
    return sent.via if sent.offloads else "inline"


def inline_notes(requests: Direction, responses: Direction) -> str:
    """'; responses inline: why', for each direction whose large messages go
    (or, before any, would go) inline, or of which some of the recent ones
    did: appended to a status's reason."""
    out = []
    for d, noun in ((requests, "requests"), (responses, "responses")):
        if d.inline:
            out.append(f"{noun} {'inline' if d.messages else 'would go inline'}: {d.reason}")
        elif d.fallback:
            count = sum(c for k, c in d.recent if k not in TRANSPORT_NAMES)
            seen = sum(c for _, c in d.recent)
            out.append(f"{count} of the last {seen} {noun} inline ({d.fallback})")
    return "".join("; " + text for text in out)


@dataclass(frozen=True)
class ChannelStatus:
    """Where a channel stands: what carries its large messages, and why.

    transport: what carried the large messages seen lately (either way:
        "memfd", "shm" or "cma"), or before any, the first rung a large
        request tries; "inline" when they travel through gRPC as they would
        without shmgrpc (see sent and received for which way and why);
    transports: every rung in effect for requests, in the order tried
        (empty when inline);
    reason: why, in words: what the handshake found, or why offload is off,
        and for each direction whose large messages go inline, why;
    settled: the handshake has concluded (False until the first call, or
        while a transient failure leaves it to be tried again);
    sent: what large requests did (Direction);
    received: what large responses did.
    """

    transport: str
    transports: Tuple[str, ...]
    reason: str
    settled: bool
    sent: Direction = Direction()
    received: Direction = Direction()

    def __str__(self) -> str:
        return _line(self.transport, self.reason, self.sent, self.received)


@dataclass(frozen=True)
class PeerStatus:
    """What a server's large messages to and from one client route did
    (server.shmgrpc.status()); the fields mean what ChannelStatus's do, seen
    from the server: sent are responses, received are requests.

    peer: "client pid N" (pid None: known only by its side connection)."""

    peer: str
    pid: Optional[int]
    transport: str
    transports: Tuple[str, ...]
    reason: str
    sent: Direction = Direction()
    received: Direction = Direction()

    def __str__(self) -> str:
        return f"{self.peer}: " + _line(self.transport, self.reason, self.received, self.sent)


def _line(transport: str, reason: str, requests: Direction, responses: Direction) -> str:
    """str() of a status: 'memfd: requests via memfd; responses via memfd;
    co-located server pid 6112'. The reason's notes on inline directions
    are left out: each direction says its own."""
    if not requests.via and not responses.via:
        return f"{transport}: {reason}"
    notes = inline_notes(requests, responses)
    basis = reason[: -len(notes)] if notes and reason.endswith(notes) else reason
    return f"{transport}: {requests.words('requests')}; {responses.words('responses')}; {basis}"


def peer_json(of: str, peer: str, pid: Optional[int], transport: str, reason: str, sent: Direction,
              received: Direction) -> Dict[str, object]:
    """One entry of stats()["peers"]."""
    return {"of": of, "peer": peer, "pid": pid, "transport": transport, "reason": reason,
            "sent": sent.to_json(), "received": received.to_json()}


# --- words ---------------------------------------------------------------------


def shm_room(shm_dir: str) -> str:
    """'/dev/shm has 7.9 MiB free of 8 MiB' (or why that is unknown)."""
    try:
        st = os.statvfs(shm_dir)
    except OSError as err:
        return f"{shm_dir} cannot be examined ({err.strerror})"
    return f"{shm_dir} has {format_size(st.f_bavail * st.f_frsize)} free of {format_size(st.f_blocks * st.f_frsize)}"


def fallback_words(reason: str, config, notes: Dict[str, str]) -> str:
    """A sender's fallback reason in words, with the numbers that matter."""
    if reason == "shm_no_space":
        return f"shm_no_space: {shm_room(config.shm_dir)}, no room for a new pool segment"
    if reason == "memfd_no_space":
        return "memfd_no_space: the kernel gave no memory for a new memfd segment (the memory limit?)"
    if reason == "pool_full":
        return f"pool_full: the pool is at SHMGRPC_POOL_SIZE ({format_size(config.pool_size)}) with its slots in use"
    if reason == "peer_share_full":
        return (f"peer_share_full: the messages for this peer hold its share of the pool "
                f"(SHMGRPC_PEER_SHARE {config.peer_share:g} of {format_size(config.pool_size)}) unread")
    if reason == "cma_peer_share_full":
        return (f"cma_peer_share_full: the cma pins for this peer hold its share of SHMGRPC_CMA_MAX_PINNED "
                f"(SHMGRPC_PEER_SHARE {config.peer_share:g}) unread")
    if reason == "pool_too_small":
        return (f"pool_too_small: a segment for it needs more than SHMGRPC_POOL_SIZE "
                f"({format_size(config.pool_size)})")
    if reason == "below_cma_threshold":
        return f"below_cma_threshold: cma carries nothing below SHMGRPC_CMA_THRESHOLD ({format_size(config.cma_threshold)})"
    if reason == "too_large":
        return f"too_large: above SHMGRPC_MAX_MESSAGE ({format_size(config.max_message)})"
    if reason == "over_limit":
        return "over_limit: above a gRPC message-size limit of one side (gRPC accepts or refuses it inline)"
    if reason == "side_closed":
        return "side_closed: the memfd side connection to the peer was closed"
    if reason == "side_budget":
        return ("side_budget: the peer holds all the memfd segments its share of descriptors allows "
                "(it grants more on request, while it has room)")
    if reason == "side_busy":
        return "side_busy: the peer's side connection queue was full (it is not reading it); nothing waits for it"
    if reason == "cma_pinned_full":
        return "cma_pinned_full: SHMGRPC_CMA_MAX_PINNED bytes are pinned for readers that have not acknowledged"
    if reason == "cma_entries_full":
        return "cma_entries_full: too many cma messages unread at once"
    if reason == "pool_closed":
        return "pool_closed: the channel or server was closing"
    if reason == "resent_inline":
        return "resent_inline: the server could not read it (another server process): resent inline"
    if reason == "peer_not_colocated":
        return "peer_not_colocated: the peer could not prove it shares this host, shm directory or side socket and uid"
    if reason == "peer_without_shmgrpc":
        return "peer_without_shmgrpc: a request frame reached a server without shmgrpc: plain gRPC from then on"
    if reason == "peer_cannot_read":
        why = "; ".join(f"{k}: {v}" for k, v in sorted(notes.items()) if k in TRANSPORT_NAMES)
        return "peer_cannot_read: the peer reads none of the transports in effect" + (f" ({why})" if why else "")
    return reason


def cma_fix(why: str) -> str:
    """What to change so that this process may read its peer with cma."""
    first = ""
    if "ptrace_scope=" in why:
        first = ("kernel.yama.ptrace_scope lets a process read only its descendants (1) or nothing (2, 3) without "
                 "CAP_SYS_PTRACE: sysctl -w kernel.yama.ptrace_scope=0 on the host, or ")
    return (first + "give the processes CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE; Kubernetes: "
            "securityContext.capabilities.add: [SYS_PTRACE]); without it both must run as one uid in one user "
            "namespace, the peer must not be non-dumpable (PR_SET_DUMPABLE 0), no seccomp filter may deny "
            "process_vm_readv/writev, and they must share a pid namespace; or set SHMGRPC_TRANSPORT=memfd "
            "(or auto)")


def cannot_honour(reason: str, config, role: str, peer: str, n: int, notes: Dict[str, str]) -> Optional[str]:
    """The one WARNING for a large message that an explicitly configured
    transport could not carry for a cause a configuration change fixes, or
    None (a passing cause: pool pressure, a side connection being replaced,
    a limit with its own INFO line)."""
    t = config.transport
    what = "requests" if role == "client" else "responses"
    head = f"SHMGRPC_TRANSPORT={t} cannot be honoured: a {format_size(n)} message went inline"
    if reason == "shm_no_space":
        return (f"{head} ({shm_room(config.shm_dir)}: no room for a new pool segment), and so will large "
                f"messages while it is full. Mount a larger {config.shm_dir} (docker run --shm-size=1g; "
                "Kubernetes: an emptyDir with medium: Memory and a sizeLimit, mounted at /dev/shm), or lower "
                "SHMGRPC_SEGMENT_SIZE, or set SHMGRPC_TRANSPORT=memfd, which needs no /dev/shm")
    if reason == "memfd_no_space":
        return (f"{head}: the kernel gave no memory for a new memfd segment. Raise the memory limit of this "
                "process's container (memfd segments count against it), or lower SHMGRPC_SEGMENT_SIZE")
    if reason == "pool_too_small":
        return (f"{head}: a segment for it needs more than SHMGRPC_POOL_SIZE ({format_size(config.pool_size)}). "
                "Raise SHMGRPC_POOL_SIZE, or lower SHMGRPC_SEGMENT_SIZE")
    if reason == "peer_cannot_read":
        why = notes.get(t, "")
        if t == "cma":
            fix = cma_fix(why)
        elif t == "memfd":
            fix = ("the peer's side socket must be reachable (one network namespace, or SHMGRPC_SIDE_DIR in "
                   "both) and its SHMGRPC_SIDE_UIDS must allow this uid; or set SHMGRPC_TRANSPORT=auto")
        else:
            fix = ("both must see one shm directory and run as one uid; or set SHMGRPC_TRANSPORT=memfd "
                   "(or auto)")
        return (f"SHMGRPC_TRANSPORT={t} cannot be honoured for {what} to {peer}: it does not accept {t} from this "
                f"process{f' ({why})' if why else ''}, so large {what} go inline; its own log and status say why. "
                f"To change it: {fix}")
    return None


__all__ = ["ChannelStatus", "Direction", "PeerStatus", "Recent"]
