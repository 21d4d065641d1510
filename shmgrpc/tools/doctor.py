"""`python -m shmgrpc doctor [TARGET]`: which transports work here, and why not.

Two parts:

- this machine: each transport's needs, tried for real (a sealed memfd
  passed over a unix socket, a segment reserved in the shm directory,
  process_vm_readv/writev on this process and from a child of it, which a
  sibling client and server are to each other as far as Yama is concerned);
- a TARGET (a live server): a real handshake per transport, then one
  offloaded round trip, through server reflection (its ServerReflectionInfo
  answers with the request it got: an echo with no side effects) or the
  unary method given with --method, with a request of unknown fields only
  (any protobuf message type parses it), or with the payload in the bytes
  field --field names (an echo that copies only the fields it knows, such
  as `Blob(data=request.data)`, drops an unknown field: its answer is empty).

Each check says what it found, and for a failure the fix. The result is OK
only when the transport the configuration would choose works both ways: a
channel's status (shmgrpc.ChannelStatus.sent / .received) says, for requests
and for responses, what carried the round trip's messages or, without a
round trip, what the handshake expects; either way going inline fails the
check, naming the way and why.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import functools
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import wire
from .._core import AUTO_ORDER
from ..transports import NAMES as TRANSPORTS
from ..transports import _layout as layout, _side as side, _vm as cma
from .._status import cma_fix
from .._malloc import HUGETLB_TUNABLE, hugetlb_requested, thp_mode
from .._version import __version__
from ..config import Config, format_size
from ._table import format_table

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
CAP_SYS_PTRACE = 19  # <linux/capability.h>
NAMESPACES = ("pid", "ipc", "mnt", "net", "user")
OK, WARN, FAIL, SKIP, INFO = STATUSES = ("ok", "warn", "FAIL", "skip", "info")


@dataclasses.dataclass
class Check:
    """One line of the report: what was checked, how it went, why, and the fix."""

    name: str
    status: str  # ok, warn, FAIL, skip, info
    detail: str
    fix: str = ""
    data: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "status": self.status.lower(), "detail": self.detail}
        if self.fix:
            out["fix"] = self.fix
        if self.data:
            out["data"] = self.data
        return out


# --- facts about this process -------------------------------------------------


def proc_status(pid: "int | str" = "self") -> Dict[str, str]:
    """/proc/PID/status as a dict ({} when unreadable)."""
    out: Dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except OSError:
        pass
    return out


def namespaces(pid: "int | str" = "self") -> Dict[str, Optional[str]]:
    """pid, ipc, mnt, net, user namespace ids ('net:[4026531840]'), None
    where unreadable."""
    out: Dict[str, Optional[str]] = {}
    for ns in NAMESPACES:
        try:
            out[ns] = os.readlink(f"/proc/{pid}/ns/{ns}")
        except OSError:
            out[ns] = None
    return out


def has_cap_sys_ptrace() -> Optional[bool]:
    cap = proc_status().get("CapEff")
    if cap is None:
        return None
    try:
        return bool(int(cap, 16) >> CAP_SYS_PTRACE & 1)
    except ValueError:
        return None


def seccomp_mode() -> Tuple[Optional[int], Optional[int]]:
    """(Seccomp mode: 0 none, 1 strict, 2 filter; number of filters)."""
    st = proc_status()

    def number(key: str) -> Optional[int]:
        try:
            return int(st[key])
        except (KeyError, ValueError):
            return None

    return number("Seccomp"), number("Seccomp_filters")


def mount_of(path: str) -> Tuple[Optional[str], Optional[str]]:
    """(file system type, mount point) of the mount that holds `path`."""
    best: Tuple[Optional[str], Optional[str]] = (None, None)
    try:
        real = os.path.realpath(path)
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return best
    length = -1
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or not rest:
            continue
        point = fields[4].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= length:  # the last of equal mount points is the one on top
            best, length = (rest[0], point), len(point)
    return best


# --- this machine --------------------------------------------------------------


def check_platform() -> Check:
    linux = sys.platform.startswith("linux")
    text = f"{platform.system()} {platform.release()} {platform.machine()}, Python {platform.python_version()}"
    if not linux:
        return Check("platform", FAIL, f"{text}: shmgrpc offloads on Linux only; everything here is plain gRPC",
                     "run client and server on Linux")
    return Check("platform", OK, text)


def check_memfd(config: Config) -> Check:
    """A sealed memfd, passed over a unix socket with SCM_RIGHTS, checked
    on arrival as the reader does; then the side socket where a server
    would listen."""
    if not side.available():
        return Check("memfd", FAIL, "memfd_create, socket.send_fds or SO_PEERCRED is missing here",
                     "needs Linux >= 3.17 and Python >= 3.9; shm and cma remain")
    size = 64 * KiB
    try:
        fd = side.memfd_segment("shmgrpc-doctor", size)
    except OSError as err:
        return Check("memfd", FAIL, f"cannot make a sealed {format_size(size)} memfd: {err.strerror}",
                     "the memory cgroup or RLIMIT_MEMLOCK of this container is exhausted, or seals are "
                     "not supported; raise the container's memory limit")
    problem = None
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b:
            socket.send_fds(a, [b"x"], [fd])
            _, fds, _, _ = socket.recv_fds(b, 16, 1)
            if len(fds) != 1:
                problem = "SCM_RIGHTS delivered no descriptor"
            else:
                problem = side.check_sealed(fds[0], size)
                os.close(fds[0])
            _, uid, _ = side.peer_cred(b)
            if problem is None and uid != os.geteuid():
                problem = f"SO_PEERCRED says uid {uid}, we are {os.geteuid()}"
    except OSError as err:
        problem = f"passing it over a unix socket failed: {err.strerror or err}"
    finally:
        os.close(fd)
    if problem is not None:
        return Check("memfd", FAIL, problem, "use shm (SHMGRPC_TRANSPORT=shm) or cma")
    where, problem = _side_socket(config)
    if problem is not None:
        return Check("memfd", FAIL, f"memfd works, but a side socket cannot listen {where}: {problem}",
                     "set SHMGRPC_SIDE_DIR to a writable directory both processes see, or leave it empty "
                     "for the abstract namespace")
    ns = namespaces().get("net") or "this network namespace"
    reach = (f"processes of {ns} reach it (the containers of one pod share it)" if not config.side_dir
             else "processes that see this directory reach it")
    return Check("memfd", OK, f"sealed memfd segments pass over unix sockets; a server's side socket listens "
                              f"{where}: {reach}")


def _side_socket(config: Config) -> Tuple[str, Optional[str]]:
    """Bind and connect a socket where a server's side socket would listen."""
    name = f"shmgrpc-doctor-{os.getpid()}-{secrets.token_hex(4)}"
    if config.side_dir:
        where = f"in {config.side_dir} (SHMGRPC_SIDE_DIR)"
        address = os.path.join(config.side_dir, name + ".sock")
    else:
        where = "in the abstract namespace"
        address = "\0" + name
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(address)
        listener.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.settimeout(2.0)
            client.connect(address)
        return where, None
    except OSError as err:
        return where, err.strerror or str(err)
    finally:
        listener.close()
        if config.side_dir:
            try:
                os.unlink(address)
            except OSError:
                pass


def segment_bytes(config: Config, length: int) -> int:
    """Bytes of the segment the pool makes for its first message of `length`
    bytes (_pool.Pool._grow)."""
    segment_size = max(layout.MIN_CLASS * 2, min(config.segment_size, config.pool_size))
    cls = layout.size_class(length)
    count = max(1, segment_size // cls) if cls * 2 <= segment_size else 1
    return layout.round_up(64 + layout.SLOT_HEADER * count, layout.PAGE) + cls * count


def check_shm(config: Config) -> Check:
    """The shm directory: there, a tmpfs, room for a segment (reserved for
    real, then removed), and room for the pool."""
    d = config.shm_dir
    if not os.path.isdir(d):
        return Check("shm", FAIL, f"no directory {d}",
                     f"mount a tmpfs there (mount -t tmpfs -o size=1g tmpfs {d}), or set SHMGRPC_SHM_DIR "
                     "to a tmpfs directory both processes share; memfd needs none")
    fstype, point = mount_of(d)
    try:
        st = os.statvfs(d)
    except OSError as err:
        return Check("shm", FAIL, f"cannot stat {d}: {err.strerror}", f"check the permissions of {d}")
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    need = segment_bytes(config, config.threshold)
    data = {"dir": d, "fstype": fstype, "mount": point, "total": total, "free": free, "segment": need,
            "pool_size": config.pool_size}
    where = f"{d} ({fstype or 'unknown file system'}): {format_size(free)} free of {format_size(total)}"
    if need > config.pool_size:
        return Check("shm", FAIL, f"SHMGRPC_POOL_SIZE ({format_size(config.pool_size)}) is smaller than one "
                                  f"segment ({format_size(need)})", "raise SHMGRPC_POOL_SIZE", data)
    problem = _reserve(d, need)
    grow = ("give it room: docker run --shm-size=1g (or --ipc=host); Kubernetes: mount an emptyDir "
            "{medium: Memory, sizeLimit: 1Gi} at /dev/shm; or make segments smaller (SHMGRPC_SEGMENT_SIZE, "
            "SHMGRPC_POOL_SIZE); or let memfd carry them (SHMGRPC_TRANSPORT=auto), which needs no /dev/shm")
    if problem is not None:
        return Check("shm", FAIL, f"{where}; a {format_size(config.threshold)} message (SHMGRPC_THRESHOLD) needs a "
                                  f"{format_size(need)} segment (SHMGRPC_SEGMENT_SIZE), and reserving one failed: "
                                  f"{problem}", grow, data)
    if total and config.pool_size > total:
        return Check("shm", WARN, f"{where}; the pool may grow to {format_size(config.pool_size)} "
                                  f"(SHMGRPC_POOL_SIZE), more than {d} holds: past that, large messages take the "
                                  "next rung or go inline",
                     f"SHMGRPC_POOL_SIZE={max(total // MiB // 2, 1)}MiB, or a larger {d}: " + grow.split(": ", 1)[1],
                     data)
    if fstype is not None and fstype != "tmpfs":
        return Check("shm", WARN, f"{where}; it is not a tmpfs, so segments may be written to disk",
                     "point SHMGRPC_SHM_DIR at a tmpfs", data)
    return Check("shm", OK, f"{where}; a {format_size(need)} segment reserved and removed; pool up to "
                            f"{format_size(config.pool_size)}", data=data)


def _reserve(d: str, size: int) -> Optional[str]:
    """Create a file of `size` bytes in `d` as a segment is made (O_EXCL,
    0600, posix_fallocate), then remove it. Why it failed, or None. Its name
    is not a segment name: ls, gc and the reaper never see it."""
    path = os.path.join(d, f".shmgrpc-doctor-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        return f"cannot create a file in {d}: {err.strerror}"
    try:
        os.posix_fallocate(fd, 0, size)
        return None
    except OSError as err:
        return err.strerror or str(err)
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass


# A child reads its parent with process_vm_readv and writes the bytes back
# with process_vm_writev (cma's ack). Yama treats a parent and its child as it
# treats a client and a server that are siblings: neither is the other's
# ancestor... for the child reading the parent. Plain ctypes, no imports of
# ours: it starts in a few milliseconds.
_CMA_CHILD = r"""
import ctypes, sys
pid, address, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(n)
local, remote = iovec(ctypes.addressof(buf), n), iovec(address, n)
for name in ("process_vm_readv", "process_vm_writev"):
    fn = getattr(libc, name)
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_ulong, ctypes.POINTER(iovec), ctypes.c_ulong,
                   ctypes.c_ulong]
    if fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != n:
        print("fail", name, ctypes.get_errno())
        sys.exit(0)
print("ok", buf.raw.hex())
"""


def _from_child(buf: bytearray) -> Optional[str]:
    """Why a child of ours cannot read `buf` in us and write it back, or None."""
    address = cma.address_of(buf)
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _CMA_CHILD, str(os.getpid()), str(address),
                               str(len(buf))], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not run the probe child: {err}"
    words = done.stdout.split()
    if words[:1] == ["ok"] and len(words) == 2:
        return None if bytes.fromhex(words[1]) == bytes(buf) else "content mismatch"
    if words[:1] == ["fail"] and len(words) == 3:
        code = int(words[2])
        return f"{words[1]}: {_errno.errorcode.get(code, code)}"
    return f"the probe child failed: {(done.stderr or done.stdout).strip()[-200:]}"


def _seccomp_text(mode: Optional[int], filters: Optional[int]) -> str:
    if mode == 2:
        return f"filter ({filters} filter{'s' if filters != 1 else ''})" if filters is not None else "filter"
    return {0: "off", 1: "strict"}.get(mode, "unknown") if mode is not None else "unknown"


def check_cma(config: Config) -> Check:
    if not cma.available():
        return Check("cma", FAIL, "process_vm_readv/process_vm_writev are not available (not Linux, or a libc "
                                  "older than glibc 2.15)", "use memfd or shm")
    scope = cma.ptrace_scope()
    cap = has_cap_sys_ptrace()
    mode, filters = seccomp_mode()
    facts = (f"Yama ptrace_scope={'absent' if scope is None else scope}, "
             f"CAP_SYS_PTRACE {'yes' if cap else 'no' if cap is not None else 'unknown'}, "
             f"seccomp {_seccomp_text(mode, filters)}")
    data = {"ptrace_scope": scope, "cap_sys_ptrace": cap, "seccomp": mode, "seccomp_filters": filters}
    buf = bytearray(secrets.token_bytes(64))
    mine = cma.probe(os.getpid(), cma.address_of(buf), bytes(buf))
    if mine is not None:
        why = f"process_vm_readv/writev on this very process fail ({mine})"
        if mode == 2:
            why = f"a seccomp filter on this process denies process_vm_readv/process_vm_writev ({mine})"
        return Check("cma", FAIL, f"{why}; {facts}",
                     "Docker's default seccomp profile allows them only with CAP_SYS_PTRACE: docker run "
                     "--cap-add SYS_PTRACE, or a profile that allows process_vm_readv and process_vm_writev "
                     "(--security-opt seccomp=PROFILE); Kubernetes: securityContext.capabilities.add: "
                     "[SYS_PTRACE]; or use memfd / shm", data)
    theirs = _from_child(buf)
    if theirs is not None:
        if scope == 1 and not cap:
            why = ("kernel.yama.ptrace_scope=1: a process may read only its descendants, so a client and a "
                   "server that are siblings cannot use cma")
            fix = ("sysctl -w kernel.yama.ptrace_scope=0 (host-wide; a container cannot change it), or give "
                   "the processes CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE); or use memfd / shm")
        elif scope == 2 and not cap:
            why = "kernel.yama.ptrace_scope=2: only processes with CAP_SYS_PTRACE may read others"
            fix = "docker run --cap-add SYS_PTRACE (Kubernetes: capabilities.add: [SYS_PTRACE]); or use memfd / shm"
        elif scope == 3:
            why = "kernel.yama.ptrace_scope=3: no process may read another until reboot"
            fix = "use memfd or shm"
        else:
            why = "ptrace permission is denied between processes of this uid"
            fix = ("give the processes CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE), keep them in one user "
                   "namespace and do not mark them non-dumpable; or use memfd / shm")
        return Check("cma", FAIL, f"{why} (a child reading its parent: {theirs}); {facts}", fix, data)
    return Check("cma", OK, f"process_vm_readv/writev work between processes of uid {os.geteuid()} ({facts}); "
                            "the peer must also share this pid namespace", data=data)


def check_malloc(config: Config) -> Check:
    """How large buffers meet fresh memory here (README, "Warm memory"): an
    INFO line, nothing shmgrpc needs."""
    thp = thp_mode()
    libc, version = platform.libc_ver()
    glibc_thp = libc == "glibc" and tuple(int(x) for x in re.findall(r"\d+", version)[:2]) >= (2, 35)
    hugetlb = hugetlb_requested(os.environ) and glibc_thp
    data = {"shmgrpc_malloc": config.malloc, "transparent_hugepage": thp, "glibc_hugetlb": hugetlb}
    if config.malloc == "keep":
        text = "SHMGRPC_MALLOC=keep: freed memory stays warm (RSS stays at its peak)"
    elif hugetlb and thp in ("madvise", "always"):
        text = f"GLIBC_TUNABLES={HUGETLB_TUNABLE}: fresh large buffers fault 2 MiB at a time"
    else:
        text = (f"default (transparent huge pages: {thp}): every fresh large buffer is first-touch page "
                "faults, the biggest cost of a large message here")
        fix = "for large messages: SHMGRPC_MALLOC=keep" + (
            f", or GLIBC_TUNABLES={HUGETLB_TUNABLE} in both processes' environment"
            if thp in ("madvise", "always") and glibc_thp else "") + " (README, \"Warm memory\")"
        return Check("malloc", INFO, text, fix, data)
    return Check("malloc", INFO, text, data=data)


def machine_checks(config: Config) -> List[Check]:
    checks = [check_platform()]
    if checks[0].status == FAIL:
        return checks
    checks += [check_memfd(config), check_shm(config), check_cma(config)]
    for check in checks[1:]:
        if check.name not in order_of(config):
            check.detail += f" (not in use: SHMGRPC_TRANSPORT={config.transport})"
            if check.status == FAIL:
                check.status = INFO
    checks.append(check_malloc(config))
    return checks


def order_of(config: Config) -> Tuple[str, ...]:
    t = config.transport
    return () if t == "off" else AUTO_ORDER if t == "auto" else (t,)


# --- a target --------------------------------------------------------------------


# The round trip's messages. protos/ does not ship with the package, and
# grpcio-reflection is not a dependency, so they are built here, once, from
# descriptors written as text (what protoc would make of the .proto beside
# each). A parser skips the fields its message does not declare.

# grpc/reflection/v1/reflection.proto, the fields the doctor uses:
#   message ServerReflectionRequest { string host = 1; oneof message_request { string list_services = 7; } }
#   message ServerReflectionResponse { ServerReflectionRequest original_request = 2;
#     oneof message_response { ListServiceResponse list_services_response = 6; } }
#   message ListServiceResponse { repeated ServiceResponse service = 1; }
#   message ServiceResponse { string name = 1; }
_REFLECTION = """
name: "shmgrpc/tools/doctor_reflection.proto" package: "shmgrpc.doctor" syntax: "proto3"
message_type { name: "ServerReflectionRequest"
  field { name: "host" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "list_services" number: 7 label: LABEL_OPTIONAL type: TYPE_STRING oneof_index: 0 }
  oneof_decl { name: "message_request" } }
message_type { name: "ServerReflectionResponse"
  field { name: "original_request" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".shmgrpc.doctor.ServerReflectionRequest" }
  field { name: "list_services_response" number: 6 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".shmgrpc.doctor.ListServiceResponse" oneof_index: 0 }
  oneof_decl { name: "message_response" } }
message_type { name: "ListServiceResponse"
  field { name: "service" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".shmgrpc.doctor.ServiceResponse" } }
message_type { name: "ServiceResponse"
  field { name: "name" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING } }
"""
# syntax = "proto2"; message Payload { optional bytes data = N; }: the --method
# request, N being --field or _UNKNOWN_FIELD (proto2: data is sent even empty).
_PAYLOAD = """
name: "shmgrpc/tools/doctor_payload_%(n)d.proto" package: "shmgrpc.doctor" syntax: "proto2"
message_type { name: "Payload" field { name: "data" number: %(n)d label: LABEL_OPTIONAL type: TYPE_BYTES } }
"""


@functools.lru_cache(maxsize=None)
def _messages(text: str) -> Dict[str, Any]:
    """{name: message class} of a FileDescriptorProto in text format."""
    from google.protobuf import descriptor_pb2, message_factory, text_format

    file = text_format.Parse(text, descriptor_pb2.FileDescriptorProto())
    return {name.rpartition(".")[2]: cls for name, cls in message_factory.GetMessages([file]).items()}


def _reflection(name: str) -> Any:
    return _messages(_REFLECTION)[name]


def _payload(number: int) -> Any:
    return _messages(_PAYLOAD % {"n": number})["Payload"]


REFLECTION_SERVICES = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")
# Any protobuf message type parses a Payload of this number: the largest
# field number, unknown to every schema (kept as an unknown field).
_UNKNOWN_FIELD = (1 << 29) - 1


@dataclasses.dataclass
class Echo:
    """How the round trip goes: reflection's echo or a --method call."""

    kind: str  # "reflection" or "method"
    method: str
    stream: bool
    field: Optional[int] = None  # --field: the request's bytes field for the payload

    def request(self, size: int) -> bytes:
        if self.kind == "reflection":
            # host carries the bulk; list_services makes it a valid query.
            return _reflection("ServerReflectionRequest")(host="x" * size, list_services="").SerializeToString()
        return _payload(self.field or _UNKNOWN_FIELD)(data=b"x" * size).SerializeToString()

    def carried_back(self, request: bytes, response: bytes) -> bool:
        """Does a --method answer carry the request's payload back? (If not,
        it was too small to be offloaded: the way back was not tried.)"""
        payload = _payload(self.field or _UNKNOWN_FIELD).FromString(request).data
        return response == request or payload in response

    def dropped(self, size: int, answer: int) -> str:
        """What a --method answer without our payload means, in words."""
        if self.field:
            return (f"the method answered without the doctor's payload (a {answer}-byte answer to a "
                    f"{format_size(size)} request in field {self.field}): it does not send field {self.field} back")
        return (f"the method answered without the doctor's payload (a {answer}-byte answer to a "
                f"{format_size(size)} request): the payload is an unknown field, and a handler that copies only the "
                "fields it knows (an echo such as `Blob(data=request.data)`) drops it")

    def call(self, channel: Any, request: bytes, timeout: float) -> bytes:
        if self.stream:
            responses = channel.stream_stream(self.method)(iter([request]), timeout=timeout)
            for response in responses:
                return bytes(response)
            return b""
        return bytes(channel.unary_unary(self.method)(request, timeout=timeout))

    def verify(self, request: bytes, response: bytes) -> Tuple[bool, str]:
        """Is `response` what this echo answers to `request`? (ok, note)"""
        from google.protobuf.message import DecodeError

        if self.kind != "reflection":
            if response == request:
                return True, "the answer is the request, unchanged"
            if self.carried_back(request, response):
                return True, f"a {len(response)}-byte answer carrying the request's payload"
            return True, f"a {len(response)}-byte answer"
        try:
            answer = _reflection("ServerReflectionResponse").FromString(response)
        except DecodeError as err:
            return False, f"malformed reflection answer: {err}"
        if answer.original_request.host != _reflection("ServerReflectionRequest").FromString(request).host:
            return False, "the reflection answer does not carry our request back"
        services = [service.name for service in answer.list_services_response.service]
        return True, "services: " + (", ".join(services) if services else "none listed")


def _rpc_error(err: Exception) -> Tuple[str, str]:
    code = getattr(err, "code", None)
    details = getattr(err, "details", None)
    try:
        return (code().name if code else type(err).__name__), (details() if details else str(err)) or ""
    except Exception:
        return type(err).__name__, str(err)


def _by(before: Dict[str, Any], after: Dict[str, Any], side_: str) -> List[str]:
    out = []
    for t in TRANSPORTS:
        a = after["by_transport"].get(t, {}).get(side_, {}).get("count", 0)
        b = before["by_transport"].get(t, {}).get(side_, {}).get("count", 0)
        if a > b:
            out.append(t)
    return out


def _delta(before: Dict[str, Any], after: Dict[str, Any], key: str) -> Dict[str, int]:
    return {k: v - before[key].get(k, 0) for k, v in after[key].items() if v - before[key].get(k, 0) > 0}


@dataclasses.dataclass
class Probe:
    """One channel's handshake and round trip."""

    transport: str  # the SHMGRPC_TRANSPORT it was built with
    code: str = ""  # the handshake method's answer
    details: str = ""
    status: Any = None  # shmgrpc.ChannelStatus at the end: what the round trip's messages did each way
    handshake: Any = None  # shmgrpc.ChannelStatus after the handshake: what each way expects
    peer_pid: Optional[int] = None
    notes: Dict[str, str] = dataclasses.field(default_factory=dict)
    echo_code: Optional[str] = None
    echo_details: str = ""
    echo_ok: bool = False
    echo_note: str = ""
    # A --method answer without our payload (None: not a --method round trip,
    # or no answer): the way back had nothing large to offload.
    echo_dropped: Optional[str] = None
    sent_via: List[str] = dataclasses.field(default_factory=list)
    received_via: List[str] = dataclasses.field(default_factory=list)
    fallbacks: Dict[str, int] = dataclasses.field(default_factory=dict)
    errors: Dict[str, int] = dataclasses.field(default_factory=dict)
    millis: float = 0.0

    def to_json(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("status", "handshake"):
            st = getattr(self, key)
            out[key] = None if st is None else {
                "transport": st.transport, "transports": list(st.transports), "reason": st.reason,
                "settled": st.settled, "sent": st.sent.to_json(), "received": st.received.to_json()}
        return out

    def inline(self) -> List[Tuple[str, Any]]:
        """(noun, Direction) of each way whose large messages went inline in
        the round trip, or, where it moved none that way, would."""
        st = self.status
        if st is None:
            return []
        return [(noun, d) for noun, d in (("requests", st.sent), ("responses", st.received)) if d.inline]


CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 * MiB), ("grpc.max_send_message_length", 256 * MiB),
                   ("grpc.use_local_subchannel_pool", 1)]


def _peer_pid(channel: Any) -> Optional[int]:
    client = getattr(getattr(channel, "_engine", None), "client", None)  # its handshake (_handshake.py)
    route = getattr(client, "route", None)
    peer = getattr(route, "peer", None)
    pid = getattr(peer, "pid", None)
    return pid if isinstance(pid, int) and pid > 0 else None


def probe_channel(target: str, config: Config, echo: Optional[Echo], size: int, timeout: float) -> Probe:
    import grpc

    import shmgrpc

    result = Probe(config.transport)
    channel = shmgrpc.insecure_channel(target, CHANNEL_OPTIONS, config=config)
    try:
        # A call of the handshake method (a request stream: it carries the
        # hello); a shmgrpc server answers with its welcome in the trailers,
        # which settles the channel's route as any first call would.
        try:
            channel.stream_unary(wire.HANDSHAKE_METHOD)(iter(()), timeout=timeout)
            result.code = "OK"
        except grpc.RpcError as err:
            result.code, result.details = _rpc_error(err)
        result.status = result.handshake = shmgrpc.channel_status(channel)
        result.peer_pid = _peer_pid(channel)
        if echo is not None and result.code == "OK":
            request = echo.request(size)
            before = dict(channel.stats())
            start = time.monotonic()
            try:
                response = echo.call(channel, request, timeout)
                result.echo_code = "OK"
                result.echo_ok, result.echo_note = echo.verify(request, response)
                if echo.kind == "method" and not echo.carried_back(request, response):
                    result.echo_dropped = echo.dropped(size, len(response))
            except grpc.RpcError as err:
                result.echo_code, result.echo_details = _rpc_error(err)
            result.millis = (time.monotonic() - start) * 1000
            after = dict(channel.stats())
            result.sent_via = _by(before, after, "offloaded")
            result.received_via = _by(before, after, "restored")
            result.fallbacks = _delta(before, after, "fallbacks")
            result.errors = _delta(before, after, "errors")
            result.status = shmgrpc.channel_status(channel)  # a lost peer shows here
        result.notes = dict(channel.stats()["notes"])
    finally:
        channel.close()
    return result


def find_echo(target: str, config: Config, method: Optional[str], timeout: float,
              field: Optional[int] = None) -> Tuple[Optional[Echo], str]:
    """The round trip to use: --method (with --field), else server
    reflection if the server has it. (echo or None, what was found)."""
    import grpc

    if field is not None and not method:
        raise ValueError("--field goes with --method: it names a field of that method's request")
    if field is not None and not 1 <= field < 19000:  # 19000-19999: reserved by protobuf; past them few use any
        raise ValueError(f"--field {field}: expected a field number from 1 to 18999")
    if method:
        if not method.startswith("/") or method.count("/") != 2:
            raise ValueError(f"--method {method!r}: expected /package.Service/Method")
        return Echo("method", method, stream=False, field=field), \
            f"--method {method}" + (f" --field {field}" if field else "")
    plain = grpc.insecure_channel(target, CHANNEL_OPTIONS)
    try:
        for service in REFLECTION_SERVICES:
            echo = Echo("reflection", f"/{service}/ServerReflectionInfo", stream=True)
            try:
                echo.call(plain, _reflection("ServerReflectionRequest")(list_services="").SerializeToString(), timeout)
                return echo, f"server reflection ({service})"
            except grpc.RpcError as err:
                code, details = _rpc_error(err)
                if code != "UNIMPLEMENTED":
                    return None, f"server reflection ({service}) answered {code}: {details}"
    finally:
        plain.close()
    return None, "the server has no reflection service"


def _fix_for(transport: str, reason: str, notes: Dict[str, str]) -> str:
    text = (reason + " " + " ".join(notes.values())).lower()
    if "unimplemented" in text or "no shmgrpc" in text:
        return ("install shmgrpc in the server: shmgrpc.server(...), or interceptors=[shmgrpc.ServerInterceptor"
                "(options=...)]; shmgrpc 0.1 servers (handshake version 1) do not interoperate with later ones")
    if transport == "memfd":
        if "uid" in text:
            return "run both as the same uid, or list the client's uid in SHMGRPC_SIDE_UIDS on the server"
        if "side socket" in text or "connection refused" in text or "no such file" in text:
            return ("the server's side socket is not reachable from here: share the network namespace (one pod; "
                    "docker run --network container:SERVER), or mount one directory in both and set "
                    "SHMGRPC_SIDE_DIR to it")
    if transport in ("shm", "cma") and ("co-locat" in text or "prove" in text or "id segment" in text):
        return ("both processes must see the same /dev/shm (docker: --ipc=shareable and --ipc=container:SERVER, "
                "or a shared tmpfs volume as SHMGRPC_SHM_DIR) and run as the same uid; across hosts nothing but "
                "plain gRPC works")
    if transport == "cma" and ("may not read" in text or "not permitted" in text):
        return cma_fix(text)
    if transport == "cma":
        return ("cma needs ptrace permission both ways and one pid namespace (docker --pid=container:SERVER, "
                "Kubernetes shareProcessNamespace: true): see the cma line of this machine's checks")
    if "shm_no_space" in text:
        return ("give /dev/shm room (docker run --shm-size=1g; Kubernetes: an emptyDir {medium: Memory, sizeLimit: "
                "1Gi} at /dev/shm), or set SHMGRPC_TRANSPORT=memfd, which needs no /dev/shm: see the shm line of "
                "this machine's checks")
    if "no_space" in text or "pool" in text:
        return "see the shm line of this machine's checks: the pool needs room"
    return "see this machine's checks above"


def _namespace_note(pid: Optional[int]) -> Tuple[str, Dict[str, Any]]:
    """How the server's process relates to ours."""
    if pid is None:
        return ("its pid is not visible here (another pid namespace, or known only by its side socket): "
                "cma cannot reach it", {"pid": None})
    ours, theirs = namespaces(), namespaces(pid)
    same = [ns for ns in NAMESPACES if theirs[ns] is not None and theirs[ns] == ours[ns]]
    other = [ns for ns in NAMESPACES if theirs[ns] is not None and theirs[ns] != ours[ns]]
    unknown = [ns for ns in NAMESPACES if theirs[ns] is None]
    uid_line = proc_status(pid).get("Uid", "").split()
    uid = int(uid_line[1]) if len(uid_line) > 1 else None
    parts = [f"pid {pid}"]
    if uid is not None:
        parts.append(f"uid {uid}" + ("" if uid == os.geteuid() else f" (we are uid {os.geteuid()})"))
    if same:
        parts.append("same " + ", ".join(same) + " namespace" + ("s" if len(same) > 1 else ""))
    if other:
        parts.append("other " + ", ".join(other) + " namespace" + ("s" if len(other) > 1 else ""))
    if unknown:
        parts.append(", ".join(unknown) + " namespace unreadable")
    return "; ".join(parts), {"pid": pid, "uid": uid, "same": same, "other": other}


def target_checks(target: str, config: Config, method: Optional[str], size: int, timeout: float,
                  local: Dict[str, Check], field: Optional[int] = None
                  ) -> Tuple[List[Check], Optional[Probe], Dict[str, Probe]]:
    """The handshake and a round trip on the channel the configuration
    makes, then each transport alone."""
    checks: List[Check] = []
    try:
        echo, found = find_echo(target, config, method, timeout, field)
    except ValueError as err:
        checks.append(Check("handshake", FAIL, str(err), "give --method /package.Service/Method [--field N]"))
        return checks, None, {}
    main = probe_channel(target, config, echo, size, timeout)
    st = main.handshake
    if main.code not in ("OK", "UNIMPLEMENTED") and st.transport == "inline":
        if main.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            checks.append(Check("handshake", FAIL, f"cannot reach {target}: {main.code}: {main.details}",
                                "check the address, that the server runs, and that this process may connect"))
        else:
            checks.append(Check("handshake", FAIL, f"{target} answered the handshake method "
                                                   f"{wire.HANDSHAKE_METHOD} with {main.code}: {main.details}",
                                "an interceptor of the server refuses it (authentication, allow lists?): let "
                                f"{wire.HANDSHAKE_METHOD} through"))
        return checks, main, {}
    if main.code == "UNIMPLEMENTED" or "no shmgrpc" in st.reason:
        why = (f"it answered {wire.HANDSHAKE_METHOD} with UNIMPLEMENTED" if main.code == "UNIMPLEMENTED"
               else st.reason)
        checks.append(Check("handshake", FAIL, f"{target} is a gRPC server without shmgrpc: {why}",
                            _fix_for("", why, main.notes)))
        return checks, main, {}
    who, data = _namespace_note(main.peer_pid)
    data["handshake_version"] = wire.VERSION
    if st.transport == "inline":
        checks.append(Check("handshake", FAIL, f"a shmgrpc server answered, but this channel "
                                               f"(SHMGRPC_TRANSPORT={config.transport}) stays plain: {st.reason}",
                            _fix_for(config.transport, st.reason, main.notes), data))
    else:
        checks.append(Check("handshake", OK, f"shmgrpc server ({who}); the channel (SHMGRPC_TRANSPORT="
                                             f"{config.transport}) settled on {st.transport}", data=data))
    if echo is None:
        checks.append(Check("round trip", INFO, f"{found}: no offloaded round trip, the handshake is the proof",
                            "to try one, give --method /package.Service/Method (a unary method that accepts "
                            "any request, such as an echo)"))
    else:
        checks.append(_echo_check("round trip", main, echo, found, size, config.transport))
    per: Dict[str, Probe] = {}
    for t in TRANSPORTS:
        per[t] = probe_channel(target, dataclasses.replace(config, transport=t), echo, size, timeout)
        row = _transport_check(t, per[t], echo, size)
        here = local.get(t)
        if echo is None and row.status == OK and here is not None and here.status == FAIL:
            # Only the handshake was tried: what fails here would fail the first large message.
            row = Check(t, FAIL, f"{row.detail}; but on this machine: {here.detail}", here.fix, row.data)
        checks.append(row)
    return checks, main, per


def _echo_check(name: str, p: Probe, echo: Echo, found: str, size: int, configured: str) -> Check:
    data = p.to_json()
    what = f"{found}: {format_size(size)}"
    if p.echo_code != "OK":
        shmgrpc_error = p.echo_details.startswith("shmgrpc:")
        if echo.kind == "method" and not shmgrpc_error and p.echo_code not in ("UNIMPLEMENTED", None) and p.sent_via:
            return Check(name, WARN, f"{what} out via {', '.join(p.sent_via)}, read by the server, whose "
                                     f"handler answered {p.echo_code}: {p.echo_details}",
                         "use a method that accepts any request (an echo) for a full round trip", data)
        return Check(name, FAIL, f"{what}: {p.echo_code}: {p.echo_details}",
                     "a shmgrpc error is a bug or a damaged segment: report it" if shmgrpc_error else
                     "check --method", data)
    if not p.echo_ok:
        return Check(name, FAIL, f"{what}: {p.echo_note}", "report it: a wrong answer is a bug", data)
    out = f"via {', '.join(p.sent_via)}" if p.sent_via else "inline"
    back = f"via {', '.join(p.received_via)}" if p.received_via else "inline"
    text = f"{what} out {out}, back {back}, {p.millis:.1f} ms; {p.echo_note}"
    if p.fallbacks:
        text += "; fallbacks: " + ", ".join(f"{k} {v}" for k, v in sorted(p.fallbacks.items()))
    st = p.status
    if not p.sent_via:
        why = st.sent.reason if st is not None and st.sent.inline else " ".join(p.fallbacks)
        return Check(name, FAIL, f"{text}; requests inline: {why}" if why else text,
                     _fix_for(configured, why, p.notes), data)
    if p.echo_dropped:
        # Not a threshold matter: the answer had nothing large in it to offload.
        return Check(name, WARN, f"{what} out {out}, {p.millis:.1f} ms; {p.echo_dropped}, so only the request "
                                 "went through shared memory and the way back was not tried",
                     _FIELD_FIX if not echo.field else f"check --field {echo.field}: {_FIELD_FIX}", data)
    if not p.received_via:
        settled = p.handshake.transport if p.handshake is not None else configured
        why = st.received.reason if st is not None and st.received.reason else p.notes.get(settled, "")
        return Check(name, FAIL, f"{text}; responses inline: {why or 'no reason known here'}",
                     _fix_for(settled, why, p.notes), data)
    return Check(name, OK, text, data=data)


_FIELD_FIX = ("give --field N, the number of a bytes field the method sends back (an echo of `bytes data = 1`: "
              "--field 1), for a round trip both ways; or a method that returns its request whole")


def _transport_check(t: str, p: Probe, echo: Optional[Echo], size: int) -> Check:
    hs, st = p.handshake, p.status
    data = p.to_json()
    notes = {k: v for k, v in p.notes.items() if k in (t, "not_colocated", "server", "disabled", "shm")}
    if hs is None or hs.transport != t:
        reason = hs.reason if hs is not None else f"{p.code}: {p.details}"
        extra = "; ".join(f"{k}: {v}" for k, v in notes.items() if v not in reason)
        return Check(t, FAIL, reason + (f" ({extra})" if extra else ""), _fix_for(t, reason, notes), data)
    if echo is None:
        inline = p.inline()
        if inline:  # what the handshake found says a way is closed
            why = "; ".join(d.words(noun) for noun, d in inline)
            return Check(t, FAIL, f"handshake settled on {t}, but {why}", _fix_for(t, why, notes), data)
        return Check(t, OK, f"handshake settled on {t}: {hs.reason}", data=data)
    if p.echo_code != "OK" or not p.echo_ok:
        ok_enough = echo.kind == "method" and p.echo_code not in ("UNIMPLEMENTED", None) and t in p.sent_via \
            and not p.echo_details.startswith("shmgrpc:")
        return Check(t, WARN if ok_enough else FAIL,
                     f"settled on {t}, round trip: {p.echo_code}: {p.echo_details or p.echo_note}",
                     "" if ok_enough else _fix_for(t, p.echo_details, notes), data)
    if t not in p.sent_via:
        why = st.sent.reason if st.sent.inline else (
            ", ".join(f"{k} {v}" for k, v in sorted(p.fallbacks.items())) or "no fallback reason counted")
        return Check(t, FAIL, f"settled on {t}, but the {format_size(size)} request went inline ({why})",
                     _fix_for(t, why, notes), data)
    if t not in p.received_via:
        if p.echo_dropped:
            if st.received.inline:  # not tried, but the route says it would go inline
                return Check(t, FAIL, f"request via {t}; {st.received.words('responses')}",
                             _fix_for(t, st.received.reason, notes), data)
            return Check(t, OK, f"request via {t}, {p.millis:.1f} ms; the answer had no payload to carry back "
                                "(see the round trip line)", data=data)
        why = st.received.reason or notes.get(t) or "no reason known here"
        return Check(t, FAIL, f"requests via {t} work, but the answer came back inline: {why}",
                     _fix_for(t, why, notes), data)
    return Check(t, OK, f"{format_size(size)} out and back via {t}, {p.millis:.1f} ms", data=data)


# --- the whole report ------------------------------------------------------------


@dataclasses.dataclass
class Report:
    config: Config
    machine: List[Check]
    target: Optional[str] = None
    target_checks: List[Check] = dataclasses.field(default_factory=list)
    transport: Optional[str] = None  # what the configuration chooses, if it works
    ok: bool = False
    summary: str = ""

    def to_json(self) -> Dict[str, Any]:
        import grpc

        c = self.config
        return {
            "version": __version__,
            "grpcio": getattr(grpc, "__version__", None),
            "python": platform.python_version(),
            "ok": self.ok,
            "transport": self.transport,
            "summary": self.summary,
            "config": {"transport": c.transport, "order": list(order_of(c)), "threshold": c.threshold,
                       "pool_size": c.pool_size, "segment_size": c.segment_size, "shm_dir": c.shm_dir,
                       "side_dir": c.side_dir},
            "namespaces": namespaces(),
            "uid": os.geteuid(),
            "machine": [check.to_json() for check in self.machine],
            "target": None if self.target is None else {
                "address": self.target, "checks": [check.to_json() for check in self.target_checks]},
        }


def run(config: Config, target: Optional[str] = None, method: Optional[str] = None, size: Optional[int] = None,
        timeout: float = 10.0, field: Optional[int] = None) -> Report:
    report = Report(config, machine_checks(config), target)
    order = order_of(config)
    by_name = {check.name: check for check in report.machine}
    if not order:
        report.summary = "SHMGRPC_TRANSPORT=off: offload is turned off; everything is plain gRPC"
        return report
    if by_name["platform"].status == FAIL:
        report.summary = by_name["platform"].detail
        return report
    if target is None:
        usable = [t for t in order if by_name[t].status in (OK, WARN)]
        if usable:
            report.ok, report.transport = True, usable[0]
            report.summary = f"large messages would travel via {usable[0]} (give a TARGET to try a server)"
        else:
            report.summary = f"no transport of SHMGRPC_TRANSPORT={config.transport} works here: " + \
                "; ".join(f"{t}: {by_name[t].detail}" for t in order)
        return report
    length = size if size is not None else max(config.threshold, config.cma_threshold)
    checks, main, per = target_checks(target, config, method, length, timeout, by_name, field)
    report.target_checks = checks
    named = {check.name: check for check in checks}
    hs = main.handshake if main is not None else None
    handshake = named.get("handshake")
    if handshake is None or handshake.status == FAIL or main is None or hs is None or hs.transport == "inline":
        report.summary = handshake.detail if handshake is not None else "no answer"
        return report
    chosen = hs.transport
    local = by_name.get(chosen)
    trip = named.get("round trip")
    row = named.get(chosen)

    def here(text: str) -> str:  # what this machine's check of the chosen transport found, if not said yet
        if local is None or local.status != FAIL or local.detail in text:
            return text
        return f"{text}; on this machine: {local.detail}"

    st = main.status
    ways = f"{st.sent.words('requests')}; {st.received.words('responses')}"
    if main.inline():  # a way that is closed, and why: the verdict the user needs first
        report.summary = here(f"large messages to {target}: {ways}")
        return report
    if trip is not None and trip.status == FAIL:
        report.summary = here(f"the channel settled on {chosen}, but the round trip failed: {trip.detail}")
        return report
    if row is not None and row.status == FAIL:
        report.summary = here(f"the channel settled on {chosen}, but {chosen} does not work: {row.detail}")
        return report
    echoed = trip is not None and trip.status in (OK, WARN)
    if not echoed and local is not None and local.status == FAIL:
        report.summary = here(f"the channel settled on {chosen} (handshake only)")
        return report
    report.ok, report.transport = True, chosen
    proof = "an offloaded round trip" if echoed else "the handshake; no round trip tried"
    if echoed and main.echo_dropped:
        proof = "an offloaded request; the answer had no payload to carry back: see --field"
    both = st.sent.via == st.received.via == chosen
    report.summary = f"large messages to {target} travel via {chosen}{'' if both else f' ({ways})'} (proved by {proof})"
    return report


def render(report: Report, verbose: bool = False) -> str:
    import grpc

    c = report.config
    lines = [
        f"shmgrpc {__version__} doctor: Python {platform.python_version()}, grpcio "
        f"{getattr(grpc, '__version__', '?')}, {platform.system()} {platform.release()}, uid {os.geteuid()}, "
        f"pid {os.getpid()}",
        f"config: SHMGRPC_TRANSPORT={c.transport} ({', '.join(order_of(c)) or 'none'}), threshold "
        f"{format_size(c.threshold)}, pool {format_size(c.pool_size)} in {format_size(c.segment_size)} segments, "
        f"shm dir {c.shm_dir}, side sockets {c.side_dir or 'abstract'}",
        "",
        "this machine:",
    ]
    lines += _rows(report.machine, verbose)
    ns = namespaces()
    lines.append("        namespaces: " + " ".join(v or f"{k}:?" for k, v in ns.items()))
    if report.target is not None:
        lines += ["", f"target {report.target}:"]
        lines += _rows(report.target_checks, verbose)
    lines += ["", ("OK: " if report.ok else "FAIL: ") + report.summary]
    return "\n".join(lines)


def _rows(checks: Sequence[Check], verbose: bool) -> List[str]:
    rows = []
    for check in checks:
        rows.append([check.status, check.name, check.detail])
        if check.fix and check.status in (FAIL, WARN, INFO):
            rows.append(["", "", f"{'hint' if check.status == INFO else 'fix'}: {check.fix}"])
    # The status column as wide as its longest word, whichever appear: both sections line up.
    return format_table(rows, align="<<<", indent="  ", minimum=[max(map(len, STATUSES))])


__all__ = ["Check", "Report", "machine_checks", "render", "run"]
