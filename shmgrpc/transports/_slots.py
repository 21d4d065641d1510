"""The transport glue of the slots memfd and shm share: Slots, the node's part
(the pool it sends from, the attacher it reads peers' segments with), and
SlotTransport, the base of both transports. The layout both sides share is
_layout.py, the sender's pool _pool.py, the receiver's attacher _attacher.py.
"""

from __future__ import annotations

import threading
from typing import Callable, ClassVar, Dict, Optional, Tuple, Type

from .. import wire
from .._buffer import kept_view
from ._attacher import Attached, Attacher
from ._pool import Pool, Segment
from .base import Part, Transport


class Slots(Part):
    """The slots of the transports that keep messages in a shared mapping
    (shm and memfd), per node: the pool this process sends from, made on
    first use, and the attacher of the peers' segments it reads.

    Each such transport registers its Segment class in `kinds`."""

    def __init__(self, node):
        self._node = node
        self._lock = threading.Lock()  # protects the pool's creation
        self.kinds: Dict[str, Type[Segment]] = {}
        self.pool: Optional[Pool] = None  # see get_pool()
        # The receive limit is the engine's (it knows its gRPC options); the
        # attacher only refuses what no engine here could accept.
        self.attacher = Attacher(node.config.shm_dir, node.config.max_message)

    def get_pool(self) -> Pool:
        if self.pool is None:
            with self._lock:
                if self.pool is None:
                    c = self._node.config
                    pool = Pool(c.shm_dir, c.pool_size, c.segment_size, c.lease_seconds,
                                self._node.identity.inst, peer_share=c.peer_share, kinds=self.kinds)
                    self.pool = pool
                    self._node.start_janitor()
        return self.pool

    def tidy(self) -> None:
        self.attacher.maybe_trim()

    def housekeep(self) -> None:
        if self.pool is not None:
            self.pool.trim_idle()
        self.attacher.maybe_trim()

    def stats(self) -> Dict[str, int]:
        if self.pool is None:
            return {}
        s = self.pool.stats()
        return {"capacity": s.capacity, "bytes_mapped": s.bytes_mapped, "bytes_in_use": s.bytes_in_use,
                "segments": s.segments}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.attacher.close()

    def abandon(self) -> None:
        if self.pool is not None:
            self.pool.abandon()


class SlotTransport(Transport):
    """A transport whose messages are slots of the node's pool (shm, memfd):
    what it adds is how a segment is made and named (`segment_class`) and
    how a handle finds its mapping (_attach); reading, keeping and freeing
    a slot are the same for both."""

    segment_class: ClassVar[Type[Segment]] = Segment

    def __init__(self, node):
        super().__init__(node)
        self.slots: Slots = node.part("slots", Slots)
        self.slots.kinds[self.name] = self.segment_class

    def _attach(self, h, peer, reread: bool, hold: bool) -> Tuple[memoryview, Attached]:
        """Attacher.open (or open_memfd) of `h`: a view and its mapping."""
        raise NotImplementedError

    def open(self, h, peer, reread: bool) -> Tuple[memoryview, Callable[[], None]]:
        view, seg = self._attach(h, peer, reread, False)
        attacher = self.slots.attacher
        return view, lambda: attacher.finish(h, seg)

    def keep(self, h, peer, reread: bool) -> memoryview:
        """The slot itself, HELD: acknowledged, and its mapping let go, when
        the view and everything made from it are gone (_buffer.kept_view).
        A copy from a sender that may reuse it (no FLAG_HOLDS)."""
        if not h.flags & wire.FLAG_HOLDS:
            return super().keep(h, peer, reread)
        view, seg = self._attach(h, peer, reread, True)
        view.release()
        attacher = self.slots.attacher
        try:
            return kept_view(seg.mm, h.offset, h.length, lambda: attacher.unhold(h, seg))
        except BaseException:
            attacher.unhold(h, seg)
            raise

    def release(self, ticket, unread_only: bool = False) -> None:
        if self.slots.pool is not None:
            self.slots.pool.release(ticket, unread_only)
