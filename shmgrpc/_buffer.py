"""Buffers as messages: a codec for methods whose payload is raw bytes.

`buffer_serializer` and `buffer_deserializer` are a method's serializer
pair, as gRPC takes them (generic handlers, a stub's multicallables). With
plain gRPC they do what gRPC needs: any object with the buffer protocol in,
its bytes out; bytes in, a read-only memoryview of them out. Under shmgrpc
(the codec recognises them, _codec.py), protobuf's copies go away:

- sending, the payload is copied once, from the caller's buffer straight
  into a slot of shared memory (no `bytes` is made); inline, it becomes the
  bytes gRPC sends, as without shmgrpc;
- receiving from a co-located sender, the memoryview is a view of the slot
  itself: no copy, no page faulted in beyond what the application touches
  (`numpy.frombuffer(buf, dtype)` is an array over the shared mapping).

The slot stays the receiver's while the memoryview, or anything made from
it (a numpy array, a slice), is alive: releasing it (`buf.release()`, `with
buf:`) or dropping the last reference gives it back. The sender counts a
slot held so against that reader's share of its pool, never reuses it
before, and sends inline when the share is used up (transports/_pool.py).

A memoryview, not a class of shmgrpc's own: before Python 3.12 only a type
written in C can lend its memory to numpy; memoryview is one, and its
release() and `with` are the early return this API wants.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from typing import Any, Callable

# Attributes by which the codec knows these functions (and shmgrpc's own
# pass-through wrappers of them say they wrap one).
VIEWS = "_shmgrpc_views"  # a serializer: the function making the flat view to offload
KEEPS = "_shmgrpc_keeps_view"  # a deserializer: takes the restored bytes as a kept view

Buffer = memoryview  # what buffer_deserializer returns: read-only, format "B"


def flat_view(obj: Any) -> memoryview:
    """`obj`'s bytes as a flat, read-only memoryview (format "B"), without
    a copy where its memory is contiguous; a copy (C order) otherwise."""
    view = obj if type(obj) is memoryview else memoryview(obj)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view.toreadonly() if not view.readonly else view


def buffer_serializer(obj: Any) -> bytes:
    """The serializer of a method whose messages are buffers: `obj` is any
    object with the buffer protocol (bytes, bytearray, memoryview, a numpy
    array, mmap, ...); gRPC sends its bytes. Through a shmgrpc channel or
    server they go to a co-located peer with one copy, straight into shared
    memory."""
    return obj if type(obj) is bytes else flat_view(obj).tobytes()


def buffer_deserializer(data: Any) -> memoryview:
    """The deserializer of a method whose messages are buffers: a read-only
    memoryview (format "B") of the message's bytes. From a co-located
    shmgrpc peer it is a view of shared memory, kept while it (or anything
    made from it) lives; release() or `with` give it back early."""
    return flat_view(data)


setattr(buffer_serializer, VIEWS, flat_view)
setattr(buffer_deserializer, KEEPS, True)


def views_of(serializer: Any) -> "Callable[[Any], memoryview] | None":
    """The flat-view function of a buffer serializer (or of a shmgrpc
    wrapper of one), else None."""
    return getattr(serializer, VIEWS, None)


def keeps_view(deserializer: Any) -> bool:
    """Is this a buffer deserializer (or a shmgrpc wrapper of one)?"""
    return getattr(deserializer, KEEPS, False) is True


def kept_view(buffer: Any, offset: int, length: int, release: Callable[[], None]) -> memoryview:
    """A read-only memoryview of `length` bytes of writable `buffer` at
    `offset`, without a copy; `release()` is called once when that view and
    every view or array made from it are gone (released or collected).

    The memory is lent through a ctypes array, which (unlike a memoryview)
    can carry a finalizer; the caller must keep `buffer`'s bytes unchanged
    until then. Only the process that made the view lets go of it: a forked
    child that inherited it (and drops it, or exits) acknowledges nothing,
    or the parent's view would change under it."""
    exporter = (ctypes.c_ubyte * length).from_buffer(buffer, offset)
    weakref.finalize(exporter, _release_in, os.getpid(), release)
    return memoryview(exporter).cast("B").toreadonly()


def _release_in(pid: int, release: Callable[[], None]) -> None:
    if os.getpid() == pid:
        release()
