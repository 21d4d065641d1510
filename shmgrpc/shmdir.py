"""Files in the shm directory: names, creation, opening a peer's, liveness,
and the reaper.

Both kinds of named file live here: an engine's id segment (session.py) and
the shm transport's pool segments (transports/). Whoever creates a file
removes it; a file whose owner is gone is removed by the next shmgrpc start
(reap), never one whose owner lives, in whatever pid namespace it runs.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import secrets
import stat
from typing import Iterator, List, Optional, Tuple

from . import wire
from .errors import DataLossError, HandleError

log = logging.getLogger(__name__)


# --- processes ----------------------------------------------------------------


def process_start(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot, or None if it is gone.

    pid + start time names a process uniquely: a recycled pid has another start.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ")".
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def alive(pid: int, start: int) -> bool:
    return process_start(pid) == start


def new_base_name() -> str:
    """shmgrpc-<pid>-<start>-<64 random bits>: unguessable, and says who owns it."""
    pid = os.getpid()
    start = process_start(pid) or 0
    return f"{wire.NAME_PREFIX}{pid}-{start}-{secrets.token_hex(8)}"


# --- files --------------------------------------------------------------------


class NoSpace(Exception):
    """The shm directory cannot hold another segment (ENOSPC, EMFILE, ...)."""


def create_mapping(shm_dir: str, name: str, size: int, keep_fd: bool = False):
    """Create name (O_EXCL, 0600), reserve `size` bytes, map it shared.
    Returns the mapping, or (mapping, fd) with `keep_fd`."""
    path = os.path.join(shm_dir, name)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        raise NoSpace(f"cannot create {path}: {err.strerror}") from err
    try:
        os.fchmod(fd, 0o600)  # whatever the umask did, never more than the owner
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            raise NoSpace(f"cannot reserve {size} bytes in {shm_dir}: {err.strerror}") from err
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # The owner's mark of life: a shared lock held while the descriptor is
        # open, i.e. until the owner closes it or exits. The reaper removes a
        # file only if it can take an exclusive lock, whatever pid namespace
        # the owner runs in (see reap()).
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BaseException:
        remove(path)  # a constructor that fails half-way undoes what it made
        os.close(fd)
        raise
    if keep_fd:
        return mm, fd
    os.close(fd)
    return mm


def owner_alive(shm_dir: str, name: str) -> bool:
    """Is the owner of segment `name` still running?

    Cheap first: the pid and start time in the name, if that process is
    visible here. A process in another pid namespace (the other container of
    a pod, sharing /dev/shm) is not, so then the lock decides: every owner
    holds a shared flock on each of its files for as long as it lives, and
    an exclusive lock can be taken only once it is gone."""
    match = wire.NAME_RE.match(name)
    if match is None:
        return True  # not ours to judge
    if alive(int(match.group(1)), int(match.group(2))):
        return True
    try:
        fd = os.open(os.path.join(shm_dir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return True  # gone already, or not a file we may open: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True  # somebody holds it: alive
    finally:
        os.close(fd)  # also drops our lock
    return False


def intact(fd: int, size: int) -> bool:
    """Does the file behind `fd` still hold `size` bytes?

    Any process of our uid can ftruncate a segment. Touching a mapping past
    the end of its file is SIGBUS, which kills the process: so every access
    to a segment's mapping is preceded by this check (one fstat). A
    truncation racing with the access itself is not caught; sealed memfd
    segments are what closes that window."""
    try:
        return os.fstat(fd).st_size >= size
    except OSError:
        return False


def open_peer_file(shm_dir: str, name: str, writable: bool) -> Tuple[int, os.stat_result]:
    """Open a peer's segment and check it is ours to trust: a regular file of
    our own uid that nobody else can open. Returns (fd, stat)."""
    if not wire.NAME_RE.match(name):
        raise HandleError(f"{name!r} is not a shmgrpc segment name")
    path = os.path.join(shm_dir, name)
    # O_NONBLOCK: a FIFO (or device) planted under a segment's name must not
    # block this thread in open(); O_NOFOLLOW: a symlink must not redirect us.
    # fstat below then refuses anything but a regular file of ours.
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise DataLossError(f"segment {name} does not exist (its owner exited or freed it)") from None
    except OSError as err:
        raise HandleError(f"cannot open segment {name}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
    except OSError as err:
        os.close(fd)
        raise HandleError(f"cannot stat segment {name}: {err.strerror}") from None
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not to us (uid {os.geteuid()})"
    elif st.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}; shmgrpc segments are 0600"
    if problem:
        os.close(fd)
        raise HandleError(f"segment {name} {problem}; refusing it")
    return fd, st


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def own_files(directory: str, pattern: "re.Pattern[str]") -> Iterator[Tuple[str, str, os.stat_result]]:
    """(name, path, lstat) of the files in `directory` whose names match
    `pattern` and that belong to our uid: what a reaper may judge."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    uid = os.geteuid()
    for name in names:
        if not pattern.match(name):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid == uid:
            yield name, path, st


def reap(shm_dir: str, dry_run: bool = False) -> List[str]:
    """Remove segments whose owner process is gone (killed, crashed); never a
    live owner's, in whatever pid namespace it runs (owner_alive). Only files
    of our own uid, only names of our prefix. Returns the names removed (with
    `dry_run`: the names it would remove, removing nothing)."""
    removed: List[str] = []
    for name, path, _ in own_files(shm_dir, wire.NAME_RE):
        try:
            if owner_alive(shm_dir, name):
                continue
            if not dry_run:
                os.unlink(path)
            removed.append(name)
        except OSError:
            continue
    if removed and not dry_run:
        log.info("removed %d segment(s) left by exited processes", len(removed))
    return removed
