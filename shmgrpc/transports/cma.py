"""cma: the receiver pulls the sender's bytes with process_vm_readv.

The sender pins the bytes serialization made (no copy) and describes them in
an entry of its pin table (_pins.py: the entry layout and why a receiver can
trust it); the handle carries its pid and the entry's and payload's
addresses; the receiver checks the entry and copies the payload into a
buffer of its own with one system call (_vm.py), then acknowledges.

It needs the kernel to let the receiver read the sender (same uid, ptrace
permitted: Yama ptrace_scope, CAP_SYS_PTRACE in containers, seccomp), which
is tested per peer by reading 16 known bytes of it (probe). It trusts the
peer as far as ptrace does: use memfd towards processes you do not trust.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

from .. import wire
from .._status import cma_fix
from ..errors import HandleError
from . import _pins, _vm
from .base import Offer, Part, Sent, Transport


class Pinned(Part):
    """The pin table this process sends from (made on first use) and the
    receive buffers it reads into (kept warm for the next read)."""

    def __init__(self, node):
        self._node = node
        self.pins: Optional[_pins.Pins] = None
        self.buffers = _pins.Buffers(node.config.cma_max_pinned)

    def get_pins(self) -> _pins.Pins:
        if self.pins is None:
            with self._node.setup_lock:
                if self.pins is None:
                    c = self._node.config
                    self.pins = _pins.Pins(c.cma_max_pinned, c.lease_seconds, peer_share=c.peer_share)
                    self._node.start_janitor()
        return self.pins

    def housekeep(self) -> None:
        if self.pins is not None:
            self.pins.reclaim()

    def stats(self) -> Dict[str, int]:
        return {"cma_pinned": self.pins.pinned_bytes} if self.pins is not None else {}

    def close(self) -> None:
        if self.pins is not None:
            self.pins.close()


class Cma(Transport):
    name = "cma"
    letter = "c"
    handle_type = wire.CmaHandle
    ticket_type = _pins.Ticket
    probes_peers = True
    announced = False  # a peer that may not read us still sends cma: its accepts lack "c"

    def __init__(self, node):
        super().__init__(node)
        self.part: Pinned = node.part("pins", Pinned)

    def cannot_read_here(self) -> Optional[str]:
        return None if _vm.available() else "process_vm_readv is not available on this platform"

    def probe(self, peer) -> Optional[str]:
        return self.cannot_read_here() or _vm.probe(peer.pid, peer.probe_addr, peer.inst)

    def fix(self, why: str) -> str:
        return cma_fix(why)

    def may_send(self, offer: Offer) -> bool:
        return super().may_send(offer) and offer.cma_key is not None

    def offload(self, data, route, held: int) -> Sent:
        if len(data) < self.config.cma_threshold:
            return None, None, "below_cma_threshold"
        peer = route.peer
        return self.part.get_pins().pin(data, route.peer_key, peer.inst, (peer.pid, peer.start), os.getpid(),
                                        held=held)

    def open(self, h, peer, reread: bool) -> Tuple[memoryview, Callable[[], None]]:
        payload, buffer = self._read(h, peer, reread, self.part.buffers.take)
        return payload, lambda: self.part.buffers.give(buffer)

    def keep(self, h, peer, reread: bool) -> memoryview:
        # The bytes are in a buffer of our own: lent as they are (a fresh one,
        # not one of the warm buffers a next read would reuse).
        payload, _ = self._read(h, peer, reread, bytearray)
        return payload.toreadonly()

    def _read(self, h, peer, reread: bool, take: Callable[[int], bytearray]) -> Tuple[memoryview, bytearray]:
        """(a view of the payload, the buffer it is in) after _pins.read."""
        identity = self.node.identity
        if identity is None:
            raise HandleError("received a cma handle, but cma is not enabled or not permitted here")
        held: List[bytearray] = []

        def dest(n: int) -> memoryview:
            held.append(take(n))
            return memoryview(held[0])[:n]

        try:
            payload = _pins.read(h, peer.pid, identity.inst, identity.cma_key_for(peer.inst),
                                 self.config.max_message, dest, reread)
        except BaseException:
            if held and take is self.part.buffers.take:
                self.part.buffers.give(held[0])
            raise
        return payload, held[0]

    def release(self, ticket, unread_only: bool = False) -> None:
        if self.part.pins is not None:
            self.part.pins.release(ticket)

    def reclaim(self) -> None:
        # Payloads our readers are done with are let go before this call
        # serializes anything, so their memory serves the next one warm (a
        # payload pinned until pressure costs fresh page faults).
        if self.part.pins is not None:
            self.part.pins.reclaim()
