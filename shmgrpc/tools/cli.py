"""The `shmgrpc` command (also `python -m shmgrpc`).

    shmgrpc doctor [TARGET] [--method /pkg.Service/Method [--field N]]   which transports work, why not, the fix
    shmgrpc ls                                              shmgrpc segments on this host
    shmgrpc gc [--dry-run]                                  remove what dead processes left

Human-readable by default; --json for scripts. Exit status: doctor 0 only
when the transport the configuration chooses works and neither requests nor
responses to TARGET go inline (1 otherwise); ls and gc 0; 2 for a usage or
configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from .. import shmdir, wire
from .._version import __version__
from ..config import Config, format_size, parse_size
from ..errors import ConfigError
from ._table import format_table

_SIDE_RE = re.compile(r"^@shmgrpc-(\d{1,10})-([0-9a-f]{16})$")


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _config(args: argparse.Namespace) -> Config:
    overrides: Dict[str, Any] = {}
    if getattr(args, "transport", None):
        overrides["transport"] = args.transport
    if getattr(args, "dir", None):
        overrides["shm_dir"] = os.path.abspath(args.dir)
    return Config.from_env(**overrides)


# --- ls / gc ---------------------------------------------------------------------


def segments(shm_dir: str) -> List[Dict[str, Any]]:
    """Every shmgrpc segment name in `shm_dir`: owner pid and start time
    (from the name), alive or not (shmdir.owner_alive: the reaper's rule),
    uid, size, age (since its last change, on a tmpfs its creation)."""
    out: List[Dict[str, Any]] = []
    try:
        names = sorted(os.listdir(shm_dir))
    except OSError:
        return out
    now = time.time()
    for name in names:
        match = wire.NAME_RE.match(name)
        if match is None:
            continue
        try:
            st = os.lstat(os.path.join(shm_dir, name))
        except OSError:
            continue  # removed meanwhile
        pid, start, kind = int(match.group(1)), int(match.group(2)), match.group(4)
        out.append({
            "name": name,
            "kind": "id" if kind == "id" else "pool",
            "pid": pid,
            "start": start,
            "uid": st.st_uid,
            "alive": shmdir.owner_alive(shm_dir, name),
            "size": st.st_size,
            "age_seconds": round(now - st.st_mtime, 3),
        })
    return out


def side_sockets() -> List[Dict[str, Any]]:
    """Servers' side sockets (memfd) in the abstract namespace of this
    network namespace, from /proc/net/unix: they exist only while their
    server listens."""
    found: Dict[str, Dict[str, Any]] = {}
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) < 8:
            continue
        match = _SIDE_RE.match(parts[7])
        if match is not None:
            found.setdefault(parts[7], {"address": parts[7], "pid": int(match.group(1))})
    return sorted(found.values(), key=lambda s: s["address"])


def _table(rows: List[Dict[str, Any]]) -> List[str]:
    cells = [["PID", "OWNER", "UID", "SIZE", "AGE", "NAME"]]
    cells += [[str(r["pid"]), "alive" if r["alive"] else "dead", str(r["uid"]), format_size(r["size"]),
               _age(r["age_seconds"]), r["name"]] for r in rows]
    return format_table(cells, align="><>>><", indent="  ")


def cmd_ls(args: argparse.Namespace) -> int:
    config = _config(args)
    rows = segments(config.shm_dir)
    sockets = side_sockets()
    if args.json:
        print(json.dumps({"shm_dir": config.shm_dir, "segments": rows, "side_sockets": sockets}, indent=2))
        return 0
    total = sum(r["size"] for r in rows)
    owners = {r["pid"] for r in rows}
    print(f"{config.shm_dir}: {len(rows)} shmgrpc segment{'s' if len(rows) != 1 else ''} of {len(owners)} "
          f"process{'es' if len(owners) != 1 else ''}, {format_size(total)}")
    if rows:
        print("\n".join(_table(rows)))
    dead = [r for r in rows if not r["alive"]]
    if dead:
        ours = [r for r in dead if r["uid"] == os.geteuid()]
        print(f"{len(dead)} segment{'s' if len(dead) != 1 else ''} of exited processes "
              f"({format_size(sum(r['size'] for r in dead))}): `python -m shmgrpc gc` removes "
              f"{'them' if len(ours) == len(dead) else f'the {len(ours)} of uid {os.geteuid()}'}")
    if sockets:
        print("side sockets (memfd) in this network namespace: "
              + ", ".join(f"{s['address']} (pid {s['pid']})" for s in sockets))
    print("memfd segments have no names: the kernel frees them with their last process.")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    config = _config(args)
    before = {r["name"]: r for r in segments(config.shm_dir)}
    names = shmdir.reap(config.shm_dir, dry_run=args.dry_run)
    removed = [before.get(name) or {"name": name, "pid": None, "size": 0} for name in names]
    kept = [r for name, r in before.items() if name not in set(names)]
    if args.json:
        print(json.dumps({"shm_dir": config.shm_dir, "dry_run": args.dry_run, "removed": removed,
                          "kept": kept}, indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    owners = {r["pid"] for r in removed}
    print(f"{config.shm_dir}: {verb} {len(removed)} segment{'s' if len(removed) != 1 else ''} of "
          f"{len(owners)} exited process{'es' if len(owners) != 1 else ''} ({format_size(sum(r['size'] for r in removed))})")
    for r in removed:
        print(f"  {verb} {r['name']} (pid {r['pid']}, {format_size(r['size'])})")
    alive = [r for r in kept if r["alive"]]
    others = [r for r in kept if not r["alive"]]
    if alive:
        print(f"kept {len(alive)} segment{'s' if len(alive) != 1 else ''} of running processes")
    if others:
        print(f"left {len(others)} segment{'s' if len(others) != 1 else ''} of exited processes of other uids "
              "(only their uid, or root running as it, may remove them)")
    return 0


# --- doctor --------------------------------------------------------------------------


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor as _doctor

    if args.field is not None and not args.method:
        print("shmgrpc: --field goes with --method: it names a field of that method's request", file=sys.stderr)
        return 2
    config = _config(args)
    size = parse_size(args.size, "--size") if args.size else None
    # The library's log lines go into the report (-v), not onto stderr.
    logger = logging.getLogger("shmgrpc")
    keep = _Keep()
    old = (logger.level, logger.propagate)
    logger.addHandler(keep)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        report = _doctor.run(config, args.target, args.method, size, args.timeout, args.field)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(old[0])
        logger.propagate = old[1]
    logs = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in keep.records]
    if args.json:
        out = report.to_json()
        out["log"] = logs
        print(json.dumps(out, indent=2))
    else:
        print(_doctor.render(report, args.verbose))
        if args.verbose and logs:
            print("\nlog:")
            print("\n".join("  " + line for line in logs))
    return 0 if report.ok else 1


# --- main --------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shmgrpc",
        description="shmgrpc: check this machine and a server, list and clean up shared-memory segments.",
    )
    p.add_argument("--version", action="version", version=f"shmgrpc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("doctor", help="which transports work here (and with TARGET), why not, and the fix",
                       description="Check this machine and, given TARGET, a live server: which transports work, "
                                   "for each that does not the reason and the fix; then a real handshake and one "
                                   "offloaded round trip. Exit status 0 only when the transport the configuration "
                                   "(SHMGRPC_*) chooses works, and with TARGET neither requests nor responses "
                                   "would go inline.")
    d.add_argument("target", nargs="?", help="a server address as grpc takes it (unix:/path.sock, host:port)")
    d.add_argument("--method", help="a unary method of TARGET for the round trip (/package.Service/Method); it gets a "
                                    "request of unknown fields only, which any protobuf type parses (an echo is "
                                    "best). Without it: server reflection, if TARGET has it")
    d.add_argument("--field", type=int, metavar="N",
                   help="with --method: put the request's payload in field N, a bytes field the method sends "
                        "back (--field 1 for an echo of `bytes data = 1`), instead of an unknown field, which an "
                        "echo that copies only the fields it knows drops")
    d.add_argument("--size", help="bytes of the round trip's request (default: max(SHMGRPC_THRESHOLD, "
                                  "SHMGRPC_CMA_THRESHOLD): every transport carries it)")
    d.add_argument("--transport", choices=("auto", "memfd", "shm", "cma"),
                   help="check this SHMGRPC_TRANSPORT instead of the environment's")
    d.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    d.add_argument("--json", action="store_true", help="one JSON object")
    d.add_argument("-v", "--verbose", action="store_true", help="also shmgrpc's log lines")
    d.set_defaults(func=cmd_doctor)

    for name, func, text in (("ls", cmd_ls, "shmgrpc segments on this host: owner pid, alive or not, size, age"),
                             ("gc", cmd_gc, "remove segments of exited processes (never a live one's)")):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--dir", help="the shm directory (default: SHMGRPC_SHM_DIR, else /dev/shm)")
        c.add_argument("--json", action="store_true", help="JSON for scripts")
        if name == "gc":
            c.add_argument("--dry-run", action="store_true", help="only say what would be removed")
        c.set_defaults(func=func)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"shmgrpc: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
