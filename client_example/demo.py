"""`make demo`: start the example server, run the benchmark against it, stop
it, and check that no shared memory was left behind."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence, Set

import shmgrpc
from server_example.serve import READY_PREFIX

from .arrays import run_arrays
from .benchmark import run_benchmark
from .errors import Failure

SHM_PREFIX = "shmgrpc-"  # every name shmgrpc gives a segment starts with this
_NAME_RE = re.compile(r"^shmgrpc-(\d+)-")  # ...followed by the creating process's pid
_READY_TIMEOUT = 60.0  # seconds for the server to print its ready line
_STOP_TIMEOUT = 20.0  # seconds after SIGTERM before we SIGKILL it (and fail)
_PROJECT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def run_demo(sizes: Sequence[int], repeat: int, wanted: Sequence[str], max_message_mib: int) -> None:
    """Raises Failure if anything went wrong; the server never outlives this."""
    shm_dir = shmgrpc.Config.from_env().shm_dir
    before = _shm_entries(shm_dir)
    started = time.monotonic()
    # Not named shmgrpc-*: TMPDIR may be /dev/shm, where that would look like a leak.
    with tempfile.TemporaryDirectory(prefix="blobstore-demo-") as tmp:
        listen = [f"unix://{os.path.join(tmp, 'blobstore.sock')}", "127.0.0.1:0"]  # port 0: any free one
        args = ["--listen", listen[0], "--listen", listen[1], "--max-message-mib", str(max_message_mib)]
        with ServerProcess(args) as server:
            unix = next(address for address in server.addresses if address.startswith("unix"))
            tcp = next(address for address in server.addresses if not address.startswith("unix"))
            run_benchmark(unix, tcp, sizes, repeat, wanted, max_message_mib)
            run_arrays(unix, [s for s in sizes if s >= MiB], repeat, max_message_mib)
            status = server.stop()
        if status != 0:
            raise Failure(f"the server exited with status {status} after SIGTERM; expected 0")
        print(
            f"server stopped cleanly (SIGTERM, exit status 0); demo took {time.monotonic() - started:.0f} s"
        )
    _check_shm(shm_dir, before, ours={os.getpid(), server.pid})


def _check_shm(shm_dir: str, before: Set[str], ours: Set[int]) -> None:
    """Fail if a shmgrpc-* entry appeared during the demo and is still there.

    Other shmgrpc processes (a test run, a benchmark) may create entries
    meanwhile. Names carry their creator's pid ("shmgrpc-<pid>-..."), so an
    entry of a pid that is neither us nor our server is reported, not failed;
    a name we cannot attribute counts as ours.
    """
    new = sorted(_shm_entries(shm_dir) - before)
    others = {name: pid for name, pid in ((name, _creator(name)) for name in new) if pid and pid not in ours}
    left = [name for name in new if name not in others]
    if left:
        raise Failure(f"left behind in {shm_dir}: {', '.join(left)}")
    print(f"shared memory: no new {SHM_PREFIX}* entries of ours left in {shm_dir}", end="")
    if others:
        pids = ", ".join(str(pid) for pid in sorted(set(others.values())))
        print(f" ({len(others)} new ones made meanwhile by other processes, pids {pids}, ignored)", end="")
    print()


def _shm_entries(shm_dir: str) -> Set[str]:
    try:
        return {name for name in os.listdir(shm_dir) if name.startswith(SHM_PREFIX)}
    except FileNotFoundError:
        return set()


def _creator(name: str) -> Optional[int]:
    match = _NAME_RE.match(name)
    return int(match.group(1)) if match else None


class ServerProcess:
    """`python -m server_example ...` as a child, from its ready line to its exit.

    It runs in a session of its own, so Ctrl-C reaches only us and we stop it
    in order (our channels first). --exit-with-parent covers what no finally
    block can: if we are SIGKILLed, the kernel sends it SIGTERM.
    """

    def __init__(self, args: List[str]) -> None:
        self._args = [sys.executable, "-m", "server_example", "--exit-with-parent", *args]
        self._process: Optional[subprocess.Popen] = None
        self._ready: "queue.Queue[str]" = queue.Queue()
        self.addresses: List[str] = []
        self.pid: Optional[int] = None

    def __enter__(self) -> "ServerProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT), env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            self._args, cwd=_PROJECT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        self.pid = self._process.pid
        try:
            threading.Thread(target=self._read_stdout, name="server-stdout", daemon=True).start()
            line = self._await_ready()
        except BaseException:
            self.stop()
            raise
        print(f"server: {line}", flush=True)
        # "listening on ADDRESS [ADDRESS ...] (details)"
        self.addresses = line[len(READY_PREFIX) :].split(" (", 1)[0].split()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _read_stdout(self) -> None:
        """Hand over the ready line; pass anything else through, so the
        server can never block on a full pipe."""
        for line in self._process.stdout:
            line = line.rstrip("\n")
            if line.startswith(READY_PREFIX):
                self._ready.put(line)
            else:
                print(f"[server] {line}", file=sys.stderr, flush=True)

    def _await_ready(self) -> str:
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                return self._ready.get(timeout=0.1)
            except queue.Empty:
                if self._process.poll() is not None:
                    raise Failure(
                        f"the server exited with status {self._process.returncode} before "
                        f"it was ready: {' '.join(self._args[1:])}"
                    ) from None
        raise Failure(f"the server printed no {READY_PREFIX!r} line within {_READY_TIMEOUT:.0f} s")

    def stop(self) -> Optional[int]:
        """SIGTERM, wait, SIGKILL if it hangs; its exit status. Safe to repeat."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise Failure(f"the server ignored SIGTERM for {_STOP_TIMEOUT:.0f} s; killed it") from None
            except BaseException:  # e.g. a second Ctrl-C: still leave nothing behind
                process.kill()
                process.wait()
                raise
        return process.returncode
