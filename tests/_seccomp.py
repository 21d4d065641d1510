"""Test helper: make process_vm_readv/writev fail in this process, for real.

Yama and user namespaces cannot be switched per process in a test, but a
seccomp filter can: it makes the kernel itself answer EPERM (or any errno) to
cross-memory attach while everything else keeps working, so the library's
fallback paths meet the same error a locked-down host would give them.

Stdlib only, so a child can run it first thing:
    python -c "from tests._seccomp import deny_process_vm; deny_process_vm(); ..."
There is no way back: the filter lasts for the life of the process and is
inherited by its threads and children.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import sys

# machine -> (AUDIT_ARCH_* from <linux/audit.h>,
#             __NR_process_vm_readv, __NR_process_vm_writev, __NR_seccomp)
_ARCHES = {
    "x86_64": (0xC000003E, 310, 311, 317),
    "aarch64": (0xC00000B7, 270, 271, 277),
}
_ARCHES["amd64"] = _ARCHES["x86_64"]
_ARCHES["arm64"] = _ARCHES["aarch64"]

PR_SET_NO_NEW_PRIVS = 38  # <linux/prctl.h>; lets an unprivileged process install a filter
SECCOMP_SET_MODE_FILTER = 1  # <linux/seccomp.h>, the seccomp(2) operation
SECCOMP_FILTER_FLAG_TSYNC = 1  # apply to every thread of the process, not just the caller
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000  # the low 16 bits (SECCOMP_RET_DATA) are the errno

# struct seccomp_data: int nr at offset 0, __u32 arch at offset 4, then the
# instruction pointer and the six arguments, which this filter ignores.
_NR_OFFSET = 0
_ARCH_OFFSET = 4

# Classic BPF opcodes from <linux/filter.h>.
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS: A = data[k], 32 bits
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K: pc += (A == k) ? jt : jf
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K: return k


class _SockFilter(ctypes.Structure):
    # struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; }
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _program(arch: int, readv: int, writev: int, deny: int):
    return _program_for(arch, (readv, writev), deny)


def _program_for(arch: int, numbers, deny: int):
    """The filter: `deny` for every system call in `numbers` (and for any
    other ABI), allow for the rest."""
    n = len(numbers)
    ops = [
        (_LD_W_ABS, 0, 0, _ARCH_OFFSET),
        (_JEQ_K, 1, 0, arch),  # our ABI: go on to the numbers
        (_RET_K, 0, 0, deny),  # another ABI (i386 compat): its numbers mean other calls; deny them all
        (_LD_W_ABS, 0, 0, _NR_OFFSET),
    ]
    # Each match jumps over the matches after it and the allow: to the deny.
    ops += [(_JEQ_K, n - i, 0, nr) for i, nr in enumerate(numbers)]
    ops += [(_RET_K, 0, 0, SECCOMP_RET_ALLOW), (_RET_K, 0, 0, deny)]
    return (_SockFilter * len(ops))(*[_SockFilter(*op) for op in ops])


def deny_process_vm(err: int = errno.EPERM, *, readv: bool = True, writev: bool = True) -> None:
    """Install a seccomp filter on every thread of this process so that
    process_vm_readv and process_vm_writev fail with `err`; all other system
    calls are allowed. RuntimeError when the platform has no such filter.

    `readv=False` leaves process_vm_readv allowed (only the write, cma's ack,
    is denied); `writev=False` the other way round."""
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux") or machine not in _ARCHES:
        raise RuntimeError(
            f"deny_process_vm supports Linux on x86_64 and aarch64, not {sys.platform}/{platform.machine()}"
        )
    if not 0 < err <= 0xFFFF:
        raise ValueError(f"err={err} does not fit SECCOMP_RET_DATA (1..65535)")
    if not (readv or writev):
        raise ValueError("deny_process_vm: nothing to deny (readv=False, writev=False)")

    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise RuntimeError(f"prctl(PR_SET_NO_NEW_PRIVS): {errno.errorcode.get(code, code)}")

    arch, nr_readv, nr_writev, nr_seccomp = _ARCHES[machine]
    numbers = [nr for nr, on in ((nr_readv, readv), (nr_writev, writev)) if on]
    filters = _program_for(arch, numbers, SECCOMP_RET_ERRNO | err)
    prog = _SockFprog(len(filters), filters)
    # seccomp(2) rather than prctl(PR_SET_SECCOMP): prctl filters only the
    # calling thread, and a process that already runs threads (gRPC's poller,
    # a thread pool) would keep calling process_vm_readv from those unharmed.
    syscall = libc.syscall
    syscall.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p]
    syscall.restype = ctypes.c_long
    rc = syscall(nr_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, ctypes.addressof(prog))
    if rc < 0:
        code = ctypes.get_errno()
        raise RuntimeError(f"seccomp(SECCOMP_SET_MODE_FILTER): {errno.errorcode.get(code, code)}")
    if rc > 0:  # TSYNC names the thread that could not take the filter
        raise RuntimeError(f"seccomp(SECCOMP_FILTER_FLAG_TSYNC): thread {rc} could not be synchronised")
