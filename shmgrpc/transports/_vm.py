"""Cross-memory attach: copy bytes straight out of (or into) another process.

Why: shared memory costs the sender a copy into the segment and the receiver
a copy out of it. With process_vm_readv(2) the sender only says where its
serialized message already lies (pid, address, length) and the receiver
*pulls* the bytes into its own buffer with one kernel copy, no segment, no
lifetime to negotiate beyond "keep the buffer alive until the peer answers".

The kernel side is page-pinned and may stop early, so the two transfers here
loop until every byte has moved, resume exactly where the kernel stopped, and
turn errno into the typed errors of shmgrpc.errors. Linux only; pure (no grpc,
no I/O besides the syscalls and one /proc read for error messages).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import os
import sys
from typing import Iterator, List, Optional, Sequence, Tuple, Type

from ..errors import CmaBadAddress, CmaError, CmaNotPermitted, CmaPeerGone

# The kernel rejects a call with more iovecs than UIO_MAXIOV (EINVAL) on
# either side; libc reports that limit as IOV_MAX. 1024 is its Linux value.
try:
    _IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError, AttributeError):
    _IOV_MAX = -1
if _IOV_MAX <= 0:
    _IOV_MAX = 1024

# MAX_RW_COUNT in include/linux/fs.h: INT_MAX rounded down to a page. Longer
# requests are silently shortened by the kernel; we never ask for more per call
# so every short count we see is a real stop, not a clipped request.
_MAX_RW_COUNT = 0x7FFFF000

_YAMA_PTRACE_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"

# Py_buffer request flags from Include/pybuffer.h. SIMPLE asks for one
# contiguous run of bytes, read-only allowed; WRITABLE also demands writes.
_PYBUF_SIMPLE = 0
_PYBUF_WRITABLE = 0x0001


class _Iovec(ctypes.Structure):
    # struct iovec from <sys/uio.h>
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _PyBuffer(ctypes.Structure):
    # Py_buffer from Include/pybuffer.h; this layout is part of the stable ABI
    # since 3.11 and unchanged since 3.3. `obj` is a strong reference that
    # PyBuffer_Release drops, so ctypes must not manage it: plain c_void_p.
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.POINTER(ctypes.c_ssize_t)),
        ("strides", ctypes.POINTER(ctypes.c_ssize_t)),
        ("suboffsets", ctypes.POINTER(ctypes.c_ssize_t)),
        ("internal", ctypes.c_void_p),
    ]


def _bind(libc, name):
    # ssize_t name(pid_t pid, const struct iovec *local_iov, unsigned long
    #              liovcnt, const struct iovec *remote_iov,
    #              unsigned long riovcnt, unsigned long flags);
    fn = getattr(libc, name)
    fn.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_Iovec),
        ctypes.c_ulong,
        ctypes.POINTER(_Iovec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    fn.restype = ctypes.c_ssize_t
    return fn


_readv = _writev = None
if sys.platform.startswith("linux"):
    try:
        # CDLL(None) is the already loaded program, libc included: no search
        # through ldconfig, and it works with glibc and musl alike.
        _libc = ctypes.CDLL(None, use_errno=True)
        _readv = _bind(_libc, "process_vm_readv")
        _writev = _bind(_libc, "process_vm_writev")
    except (OSError, AttributeError):  # libc older than glibc 2.15
        _readv = _writev = None

# ctypes.pythonapi is a PyDLL: the GIL stays held and a Python error set by the
# callee (BufferError, TypeError) is raised as that exception.
_PyObject_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
_PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_PyObject_GetBuffer.restype = ctypes.c_int
_PyBuffer_Release = ctypes.pythonapi.PyBuffer_Release
_PyBuffer_Release.argtypes = [ctypes.POINTER(_PyBuffer)]
_PyBuffer_Release.restype = None


def available() -> bool:
    """True on Linux when libc exposes process_vm_readv/process_vm_writev.

    This says nothing about permission: Yama, seccomp or user namespaces may
    still refuse a given peer. Use probe() for that."""
    return _readv is not None and _writev is not None


def ptrace_scope() -> Optional[int]:
    """kernel.yama.ptrace_scope, or None when Yama is absent or unreadable."""
    try:
        with open(_YAMA_PTRACE_SCOPE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _pinned(obj, writable: bool) -> Iterator[Tuple[int, int]]:
    """Yield (address, length) of obj's bytes, held exported meanwhile: a
    bytearray cannot be resized nor an mmap closed under a running copy."""
    view = _PyBuffer()
    try:
        _PyObject_GetBuffer(obj, ctypes.byref(view), _PYBUF_WRITABLE if writable else _PYBUF_SIMPLE)
    except (BufferError, TypeError) as err:
        kind = "a writable" if writable else "a"
        raise TypeError(f"expected {kind} C-contiguous buffer, got {type(obj).__name__}: {err}") from None
    try:
        yield view.buf or 0, view.len
    finally:
        _PyBuffer_Release(ctypes.byref(view))


def address_of(buf) -> int:
    """Address of the first byte of any C-contiguous buffer-protocol object,
    read-only ones (bytes, read-only memoryview) included.

    The buffer is released before returning, so the address is only valid
    while the caller keeps `buf` alive and unresized (no bytearray appends, no
    mmap.close()). A memoryview slice gives the address of the slice."""
    with _pinned(buf, writable=False) as (address, _):
        return address


def _checked(remote: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """The non-empty ranges of `remote`, each checked to fit in 64 bits."""
    ranges = []
    for address, length in remote:
        address, length = int(address), int(length)
        if length < 0:
            raise ValueError(f"remote range 0x{address:x}+{length}: negative length")
        if address < 0 or address + length > 1 << 64:
            err = CmaBadAddress(f"remote range 0x{address:x}+{length} lies outside the address space")
            err.errno = _errno.EFAULT
            raise err
        if length:  # a zero-length iovec moves nothing but still counts against IOV_MAX
            ranges.append((address, length))
    return ranges


def _error(call: str, pid: int, address: int, length: int, code: int) -> CmaError:
    name = _errno.errorcode.get(code, str(code))
    text = f"{call}(pid {pid}, 0x{address:x}+{length}): {name}, {os.strerror(code).lower()}"
    cls: Type[CmaError]
    if code in (_errno.EPERM, _errno.EACCES):
        cls = CmaNotPermitted
        scope = ptrace_scope()
        if scope is not None:
            text += f" (kernel.yama.ptrace_scope={scope})"
    elif code == _errno.ESRCH:
        cls = CmaPeerGone
    elif code == _errno.EFAULT:
        cls = CmaBadAddress
    else:
        cls = CmaError
    # One argument keeps str(err) our message; OSError's two-argument form
    # would prefix "[Errno N]". errno is set by hand so callers can still
    # switch on it as on any OSError.
    err = cls(text)
    err.errno = code
    return err


def _transfer(fn, call: str, pid: int, remote: Sequence[Tuple[int, int]], local: int, size: int) -> None:
    ranges = _checked(remote)
    total = sum(length for _, length in ranges)
    if total != size:
        raise ValueError(f"{call}: the remote ranges hold {total} bytes but the local buffer has {size}")
    if fn is None:
        err = CmaError(f"{call} is not available on this platform ({sys.platform})")
        err.errno = _errno.ENOSYS
        raise err

    iovecs = (_Iovec * min(_IOV_MAX, max(len(ranges), 1)))()
    local_iov = _Iovec()
    index, skip, done = 0, 0, 0  # resume point: ranges[index], `skip` bytes in
    while done < total:
        # One call: at most IOV_MAX remote iovecs and MAX_RW_COUNT bytes,
        # starting mid-range when the previous call stopped there.
        count, asked, at, offset = 0, 0, index, skip
        while at < len(ranges) and count < len(iovecs) and asked < _MAX_RW_COUNT:
            address, length = ranges[at]
            take = min(length - offset, _MAX_RW_COUNT - asked)
            iovecs[count].iov_base = address + offset
            iovecs[count].iov_len = take
            count, asked, at, offset = count + 1, asked + take, at + 1, 0
        local_iov.iov_base = local + done
        local_iov.iov_len = asked

        moved = fn(pid, ctypes.byref(local_iov), 1, iovecs, count, 0)
        address, length = ranges[index]
        if moved < 0:
            # The kernel fails only when nothing moved, so the culprit is the
            # first byte we asked for.
            raise _error(call, pid, address + skip, length - skip, ctypes.get_errno())
        if moved == 0:
            # Not documented to happen; bail out rather than spin forever.
            raise CmaBadAddress(f"{call}(pid {pid}, 0x{address + skip:x}+{length - skip}): moved 0 bytes")

        # Partial transfers stop on a page boundary, possibly inside an
        # iovec: walk the ranges forward by exactly what moved.
        done += moved
        while moved:
            step = min(ranges[index][1] - skip, moved)
            moved -= step
            skip += step
            if skip == ranges[index][1]:
                index, skip = index + 1, 0


def read_into(pid: int, remote: Sequence[Tuple[int, int]], dest) -> None:
    """Copy the (address, length) ranges of process `pid`, in order, into the
    writable buffer `dest`, whose length must equal their sum (ValueError).

    Raises CmaNotPermitted, CmaPeerGone, CmaBadAddress or CmaError; after
    CmaBadAddress the bytes before the failing range may already be in dest."""
    with _pinned(dest, writable=True) as (address, size):
        _transfer(_readv, "process_vm_readv", pid, remote, address, size)


def write_from(pid: int, remote: Sequence[Tuple[int, int]], src) -> None:
    """Copy the buffer `src` (bytes allowed) into the (address, length) ranges
    of process `pid`, in order; len(src) must equal their sum (ValueError)."""
    with _pinned(src, writable=False) as (address, size):
        _transfer(_writev, "process_vm_writev", pid, remote, address, size)


def probe(pid: int, address: int, expected: bytes) -> Optional[str]:
    """Can we use cma with `pid`? Reads len(expected) bytes of `pid` at
    `address` (the read of a payload) and writes the same bytes back (the
    ack is a process_vm_writev: a seccomp profile may allow one and deny the
    other). None when both work and the bytes equal `expected`, otherwise a
    short reason. OS errors never escape."""
    got = bytearray(len(expected))
    step = "process_vm_readv"
    try:
        read_into(pid, [(address, len(expected))], got)
        if got != expected:
            return "content mismatch"
        step = "process_vm_writev"
        write_from(pid, [(address, len(expected))], expected)  # the same bytes: changes nothing
    except CmaNotPermitted as err:
        name = _errno.errorcode.get(err.errno or 0, str(err.errno))  # _error always sets errno
        scope = ptrace_scope()
        which = "" if step == "process_vm_readv" else " for process_vm_writev (the ack)"
        return f"not permitted: {name}{which}" + ("" if scope is None else f" (kernel.yama.ptrace_scope={scope})")
    except CmaPeerGone:
        return "peer gone"
    except CmaBadAddress:
        return f"{step}: bad address"
    except CmaError as err:
        return f"{step} failed: {err}"
    return None


__all__ = ["address_of", "available", "probe", "ptrace_scope", "read_into", "write_from"]
