"""shmgrpc.cma against real processes and the real kernel: no mocks.

A "holder" child keeps known bytes at known addresses and reports them as
JSON; the test process reads (or writes) them with process_vm_readv/writev.
Permission failures are produced for real too: a seccomp filter
(tests/_seccomp.py) and, as root, a child that drops to nobody.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from shmgrpc.transports import _vm as cma
from shmgrpc.errors import CmaBadAddress, CmaPeerGone, HandleError

pytestmark = pytest.mark.skipif(not cma.available(), reason="process_vm_readv needs Linux")

ROOT = Path(__file__).resolve().parent.parent
PAGE = mmap.PAGESIZE
NOBODY = 65534  # the conventional uid/gid of "nobody"; owns no process here
CHILD_TIMEOUT = 30  # seconds; generous, a healthy child answers in well under one


def content(seed: int, size: int) -> bytes:
    """The bytes a holder puts in a region: the same in parent and child, and
    never periodic, so a read from a wrong offset cannot match by luck."""
    return random.Random(seed).randbytes(size)


# The holder. argv[1] is {name: [kind, size, seed]}:
#   "heap":  `size` bytes of content(seed, size) in a ctypes array;
#   "holed": 4 anonymous pages of content(seed, 4 * PAGE), of which page 2 is
#            then unmapped. Page 3 stays mapped so the hole is exactly one page
#            and no later mmap (all bigger than a page) can land in it.
# It prints {"pid", "regions": {name: [address, size]}}, then answers
# "dump NAME" with the region's bytes in hex, and exits at end of input.
HOLDER = """
import ctypes, json, mmap, os, random, sys
content = lambda seed, size: random.Random(seed).randbytes(size)
PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
keep, regions = [], {}
for name, (kind, size, seed) in json.loads(sys.argv[1]).items():
    if kind == "heap":
        buf = (ctypes.c_char * size).from_buffer_copy(content(seed, size))
        keep.append(buf)
        regions[name] = [ctypes.addressof(buf), size]
    else:
        base = libc.mmap(None, 4 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        assert base not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        ctypes.memmove(base, content(seed, 4 * PAGE), 4 * PAGE)
        assert libc.munmap(base + 2 * PAGE, PAGE) == 0, ctypes.get_errno()
        regions[name] = [base, 4 * PAGE]
print(json.dumps({"pid": os.getpid(), "regions": regions}), flush=True)
for line in sys.stdin:
    address, size = regions[line.split()[1]]
    print(ctypes.string_at(address, size).hex(), flush=True)
"""

# Shared by the reader children: one read attempt, reported as JSON-able data.
ATTEMPT = """
import errno, json, os, sys, threading
from shmgrpc.transports import _vm as cma

def attempt(pid, address, want, write=False):
    buf = bytearray(len(want))
    try:
        if write:
            cma.write_from(pid, [(address, len(want))], want)
        else:
            cma.read_into(pid, [(address, len(want))], buf)
    except OSError as err:
        return [type(err).__name__, err.errno, str(err)]
    return ["ok", write or buf == want]

target = json.loads(sys.argv[1])
expected = bytes.fromhex(target["hex"])
mine = bytes(range(256)) * 16
"""

# Reads itself and its sibling (the holder), installs the filter, reads again
# from the main thread and from a thread that started before the filter.
SECCOMP_READER = ATTEMPT + """
from tests._seccomp import deny_process_vm

def both():
    return {"self": attempt(os.getpid(), cma.address_of(mine), mine),
            "sibling": attempt(target["pid"], target["address"], expected)}

report = {"before": both()}
gate, seen = threading.Event(), []
early = threading.Thread(target=lambda: (gate.wait(), seen.append(both())))
early.start()
deny_process_vm(int(sys.argv[2]))
gate.set()
early.join()
report["after"] = both()
report["early_thread"] = seen[0]
report["write"] = attempt(os.getpid(), cma.address_of(mine), mine, write=True)
report["probe"] = cma.probe(target["pid"], target["address"], expected)
# Yama is not on every test host; point cma at a stand-in file to see that
# its value lands in both the exception and the probe reason.
with open(sys.argv[3], "w") as f:
    f.write("2\\n")
cma._YAMA_PTRACE_SCOPE = sys.argv[3]
report["with_yama"] = [attempt(target["pid"], target["address"], expected),
                       cma.probe(target["pid"], target["address"], expected)]
print(json.dumps(report))
"""

# As root, reads the holder (a root process), drops to nobody, reads again.
DROPPING_READER = ATTEMPT + """
report = {"before": attempt(target["pid"], target["address"], expected)}
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[2]))
report["uid"] = os.getuid()
report["after"] = attempt(target["pid"], target["address"], expected)
report["probe"] = cma.probe(target["pid"], target["address"], expected)
print(json.dumps(report))
"""


class Holder:
    def __init__(self, spec: dict, procs: list):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(self.proc)
        ready = json.loads(self.proc.stdout.readline() or "null")
        assert ready, f"holder exited early with {self.proc.wait(CHILD_TIMEOUT)}"
        self.pid = ready["pid"]
        self.regions = {name: tuple(region) for name, region in ready["regions"].items()}

    def dump(self, name: str) -> bytes:
        self.proc.stdin.write(f"dump {name}\n")
        self.proc.stdin.flush()
        return bytes.fromhex(self.proc.stdout.readline())

    def exit(self) -> None:
        self.proc.stdin.close()
        self.proc.stdout.close()


def run_child(script: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _reap(procs: list) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(CHILD_TIMEOUT)
        for pipe in (proc.stdin, proc.stdout):
            if pipe and not pipe.closed:
                pipe.close()


@pytest.fixture
def procs():
    """Every child started through this list is killed and reaped afterwards."""
    started: list = []
    yield started
    _reap(started)


SPEC = {
    "pages": ["heap", 5 * PAGE + 123, 1],
    "scatter": ["heap", 3000 * 64, 2],
    "holed": ["holed", 0, 3],
    "inbox": ["heap", 3 * PAGE + 5, 4],
}


@pytest.fixture(scope="module")
def holder():
    started: list = []
    try:
        yield Holder(SPEC, started)
    finally:
        _reap(started)


def scatter_ranges(holder: Holder, count: int = 3000, size: int = 17):
    """`count` ranges of `size` bytes, one per 64-byte slot at a random offset
    inside it, in shuffled order; and the bytes they should read."""
    base, _ = holder.regions["scatter"]
    data = content(SPEC["scatter"][2], 3000 * 64)
    rng = random.Random(99)
    offsets = [slot * 64 + rng.randrange(64 - size) for slot in range(count)]
    rng.shuffle(offsets)
    return [(base + off, size) for off in offsets], b"".join(data[off : off + size] for off in offsets)


def test_reads_a_region_spanning_pages(holder):
    address, size = holder.regions["pages"]
    dest = bytearray(size)
    cma.read_into(holder.pid, [(address, size)], dest)
    assert dest == content(1, size)


def test_reads_more_iovecs_than_iov_max(holder):
    ranges, expected = scatter_ranges(holder)
    assert len(ranges) > cma._IOV_MAX  # so the read needs several calls
    dest = bytearray(len(expected))
    cma.read_into(holder.pid, ranges, dest)
    assert dest == expected


def test_splits_calls_inside_a_range(holder, monkeypatch):
    # Tiny per-call limits make every call stop mid-range, as a partial
    # transfer does; the next one must resume on the exact byte.
    monkeypatch.setattr(cma, "_MAX_RW_COUNT", 2 * PAGE + 3)
    monkeypatch.setattr(cma, "_IOV_MAX", 7)
    address, size = holder.regions["pages"]
    ranges, expected = scatter_ranges(holder, count=200)
    ranges = [(address, size)] + ranges + [(address + 1, size - 2)]
    expected = content(1, size) + expected + content(1, size)[1:-1]
    dest = mmap.mmap(-1, len(expected))
    cma.read_into(holder.pid, ranges, dest)
    assert dest[:] == expected


def test_bad_last_iovec_raises_and_leaves_nothing_behind(holder):
    base, _ = holder.regions["holed"]
    hole = base + 2 * PAGE
    data = content(3, 4 * PAGE)
    good = [(base + 5, 100), (base + PAGE + 7, 300), (base + 3 * PAGE, 50)]
    expected = data[5:105] + data[PAGE + 7 : PAGE + 307] + data[3 * PAGE : 3 * PAGE + 50]
    dest = bytearray(len(expected) + 64)

    with pytest.raises(CmaBadAddress) as info:
        cma.read_into(holder.pid, good + [(hole, 64)], dest)
    err = info.value
    assert err.errno == errno.EFAULT
    assert isinstance(err, HandleError) and isinstance(err, OSError)
    assert f"process_vm_readv(pid {holder.pid}, 0x{hole:x}+64): EFAULT" in str(err)
    assert dest[: len(expected)] == expected  # the kernel's partial count was taken, then resumed

    dest = bytearray(len(expected))
    cma.read_into(holder.pid, good, dest)
    assert dest == expected


def test_partial_transfer_stops_inside_an_iovec(holder):
    # One iovec over pages 0-1 and into the hole: the kernel copies the two
    # good pages and returns a short count (it does split an iovec, whatever
    # the man page says); the retry then fails on the hole's first byte.
    base, _ = holder.regions["holed"]
    dest = bytearray(2 * PAGE - 10 + 40)
    with pytest.raises(CmaBadAddress) as info:
        cma.read_into(holder.pid, [(base + 10, len(dest))], dest)
    assert f"0x{base + 2 * PAGE:x}+40" in str(info.value)
    assert dest[: 2 * PAGE - 10] == content(3, 4 * PAGE)[10 : 2 * PAGE]
    # probe() goes through the same loop: 8 good bytes, then the hole
    assert cma.probe(holder.pid, base + 2 * PAGE - 8, bytes(16)) == "process_vm_readv: bad address"


def test_peer_gone_zombie_then_reaped(procs):
    peer = Holder({"data": ["heap", 4096, 5]}, procs)
    address, size = peer.regions["data"]
    dest = bytearray(size)
    cma.read_into(peer.pid, [(address, size)], dest)
    assert dest == content(5, size)

    peer.exit()
    # Exited but not reaped: the task still exists, its memory does not.
    os.waitid(os.P_PID, peer.pid, os.WEXITED | os.WNOWAIT)
    with pytest.raises(CmaPeerGone) as info:
        cma.read_into(peer.pid, [(address, size)], dest)
    assert info.value.errno == errno.ESRCH

    assert peer.proc.wait(CHILD_TIMEOUT) == 0
    with pytest.raises(CmaPeerGone) as info:
        cma.read_into(peer.pid, [(address, size)], dest)
    assert info.value.errno == errno.ESRCH
    assert isinstance(info.value, ProcessLookupError)
    assert f"(pid {peer.pid}, 0x{address:x}+{size}): ESRCH" in str(info.value)
    assert cma.probe(peer.pid, address, b"x") == "peer gone"


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS], ids=["EPERM", "ENOSYS"])
def test_seccomp_denied(holder, tmp_path, err):
    address, size = holder.regions["pages"]
    target = {"pid": holder.pid, "address": address, "hex": content(1, size).hex()}
    report = run_child(SECCOMP_READER, json.dumps(target), str(err), str(tmp_path / "ptrace_scope"))

    assert report["before"]["self"] == ["ok", True]
    if os.geteuid() == 0 or cma.ptrace_scope() in (None, 0):  # else Yama forbids siblings anyway
        assert report["before"]["sibling"] == ["ok", True]

    name = errno.errorcode[err]
    cls = "CmaNotPermitted" if err == errno.EPERM else "CmaError"
    for outcome in [*report["after"].values(), *report["early_thread"].values(), report["write"]]:
        assert outcome[:2] == [cls, err]
    sibling = report["after"]["sibling"][2]
    assert sibling.startswith(f"process_vm_readv(pid {holder.pid}, 0x{address:x}+{size}): {name}")
    assert report["write"][2].startswith("process_vm_writev(")

    scoped_error, scoped_probe = report["with_yama"]
    if err == errno.EPERM:
        assert report["probe"].startswith("not permitted: EPERM")
        assert scoped_error[2].endswith("(kernel.yama.ptrace_scope=2)")
        assert scoped_probe == "not permitted: EPERM (kernel.yama.ptrace_scope=2)"
    else:
        assert report["probe"].startswith("process_vm_readv failed: ") and "ENOSYS" in report["probe"]
        assert "ptrace_scope" not in scoped_error[2]


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_other_uid_not_permitted(holder):
    address, size = holder.regions["pages"]
    target = {"pid": holder.pid, "address": address, "hex": content(1, size).hex()}
    report = run_child(DROPPING_READER, json.dumps(target), str(NOBODY))

    assert report["before"] == ["ok", True]
    assert report["uid"] == NOBODY
    cls, code, message = report["after"]
    assert (cls, code) == ("CmaNotPermitted", errno.EPERM)
    assert message.startswith(f"process_vm_readv(pid {holder.pid}, 0x{address:x}+{size}): EPERM")
    assert report["probe"].startswith("not permitted: EPERM")


def test_write_from_lands_in_the_child(holder):
    address, size = holder.regions["inbox"]
    assert holder.dump("inbox") == content(4, size)
    new = content(40, size)
    # bytes (read-only) as the source, split at odd places across pages
    cut1, cut2 = PAGE - 3, 2 * PAGE + 11
    ranges = [(address, cut1), (address + cut1, cut2 - cut1), (address + cut2, size - cut2)]
    cma.write_from(holder.pid, ranges, new)
    assert holder.dump("inbox") == new

    # and out of order from a memoryview slice: the source's head lands in
    # the region's tail and vice versa
    head = size // 2
    source = memoryview(bytearray(b"\0" * 7 + new + b"\0" * 7))[7:-7]
    cma.write_from(holder.pid, [(address + size - head, head), (address, size - head)], source)
    assert holder.dump("inbox") == new[head:] + new[:head]


def test_address_of_any_buffer():
    def check(buf, expected: bytes):
        address = cma.address_of(buf)
        assert ctypes.string_at(address, len(expected)) == expected
        dest = bytearray(len(expected))
        cma.read_into(os.getpid(), [(address, len(expected))], dest)
        assert dest == expected
        return address

    data = content(7, 3 * PAGE)
    as_bytes = bytes(data)
    check(as_bytes, data)
    array = bytearray(data)
    check(array, data)
    view = memoryview(as_bytes)  # read-only
    assert view.readonly
    assert check(view[100:900], data[100:900]) == cma.address_of(as_bytes) + 100
    assert check(memoryview(array)[PAGE + 1 :], data[PAGE + 1 :]) == cma.address_of(array) + PAGE + 1
    mapped = mmap.mmap(-1, len(data))
    mapped[:] = data
    try:
        assert check(mapped, data) % PAGE == 0
    finally:
        mapped.close()  # possible: address_of holds no export afterwards

    with pytest.raises(TypeError, match="C-contiguous"):
        cma.address_of(view[::2])
    with pytest.raises(TypeError):
        cma.address_of("text")


def test_length_mismatch_is_value_error(holder):
    address, size = holder.regions["pages"]
    for length in (size - 1, size + 1):
        dest = bytearray(b"\xaa" * length)
        with pytest.raises(ValueError, match=f"{size} bytes but the local buffer has {length}"):
            cma.read_into(holder.pid, [(address, size)], dest)
        assert dest == b"\xaa" * length  # nothing was copied
    with pytest.raises(ValueError):
        cma.write_from(holder.pid, [(address, 10), (address + 20, 10)], b"x" * 21)
    with pytest.raises(TypeError, match="writable"):
        cma.read_into(holder.pid, [(address, size)], bytes(size))


def test_probe_and_ptrace_scope(holder):
    address, size = holder.regions["pages"]
    data = content(1, size)
    assert cma.probe(holder.pid, address, data[:64]) is None
    assert cma.probe(holder.pid, address + 1, data[:64]) == "content mismatch"
    assert cma.probe(holder.pid, -1, b"x") == "process_vm_readv: bad address"
    assert cma.ptrace_scope() in (None, 0, 1, 2, 3)

