"""Differential tests: a program that works without shmgrpc works the same with it.

Every scenario runs twice, server and client in separate processes:

  baseline   plain gRPC; shmgrpc is imported by neither process
  shmgrpc    the same program through shmgrpc's channel wrappers and
             shmgrpc.server / shmgrpc.aio.server, transport shm, cma, memfd
             or off, threshold THRESHOLD so that most messages are offloaded

and the observations must be equal (tests/diff_client.py and
tests/diff_server.py say what is observed): every call's status code,
details, response type and digest, initial and trailing metadata keys; what
the client interceptors were handed; what the server application was handed
(request types and digests, invocation metadata keys minus gRPC's own and
minus nothing else); what the server interceptors outside shmgrpc were
handed. Then shmgrpc's own counters must show that offload really happened
(client channel stats and the server process's shmgrpc.stats()), so a test
goes red if offload silently stops; under transport "off", and towards a
server without shmgrpc, nothing may be offloaded.

A shmgrpc channel has no handshake call: it learns its server's route from
the trailers of its first calls that carry the hello, which go inline. So
every channel a scenario uses (but the ones that observe first contact
itself) starts with one route-learning "warm-up" call, in both runs alike
(tests/diff_client.py, Run.warm_up_request), and the scenario's large
messages are offloaded from its first call on.

Processes are shared by the whole module: one server process per (server
kind, mode), hosting four gRPC servers (main, auth, small, big), and one
client process per (client kind, plain or shmgrpc) that runs scenarios on
request. Baselines are run once per (scenario, client kind, server kind) and
reused for every transport and variant.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Dict, List, Optional, Tuple

import grpc
import pytest

from tests._diff import (
    CLIENT_READY,
    CONTROL_SERVICE,
    RESULT,
    SERVER_READY,
    differences,
)
from tests.conftest import START_TIMEOUT, ByteCountingProxy, read_line, spawn, stop_process

THRESHOLD = "16KiB"
SCENARIO_TIMEOUT = 45.0  # seconds one scenario may take in the client process (~1 s when healthy)
CONTROL_TIMEOUT = 10.0
SERVER_KINDS = ("sync", "aio")
CLIENT_KINDS = ("sync", "aio")
TRANSPORTS = ("shm", "cma", "memfd")  # memfd: the first rung of "auto", what applications get by default
SERVER_MODES = ("plain", *TRANSPORTS, "off")  # "off": shmgrpc.server with SHMGRPC_TRANSPORT=off
COUNTERS = ("client_offloaded", "client_restored", "server_restored", "server_offloaded")
ALL = frozenset(COUNTERS)


# --- processes --------------------------------------------------------------------------


class ServerProc:
    """One tests.diff_server process and a plain control channel to it."""

    def __init__(self, kind: str, mode: str, root: str):
        self.kind, self.mode = kind, mode
        self.dir = tempfile.mkdtemp(prefix=f"{kind}-{mode}-", dir=root)
        self.log_path = os.path.join(self.dir, "stderr.log")
        self._log = open(self.log_path, "wb")
        env = {} if mode == "plain" else {"SHMGRPC_TRANSPORT": mode, "SHMGRPC_THRESHOLD": THRESHOLD, "SHMGRPC_CMA_THRESHOLD": THRESHOLD}
        spec = {"kind": kind, "mode": "plain" if mode == "plain" else "shmgrpc", "dir": self.dir,
                "parent": os.getpid()}
        self.proc = spawn([sys.executable, "-m", "tests.diff_server", json.dumps(spec)], env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log)
        self.addresses: Dict[str, str] = {}
        self._control: Optional[grpc.Channel] = None

    def wait_ready(self) -> None:
        line = read_line(self.proc, START_TIMEOUT)
        if not line.startswith(SERVER_READY):
            stop_process(self.proc, signal.SIGKILL)
            raise RuntimeError(f"diff server {self.kind}/{self.mode} did not start: {line!r}\n{self.log()}")
        ready = json.loads(line[len(SERVER_READY):])
        self.addresses = ready["addresses"]
        self._control = grpc.insecure_channel(self.addresses["control"])

    def log(self, tail: int = 6000) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-tail:]

    def _ask(self, method: str, request: bytes) -> dict:
        if self.proc.poll() is not None:
            pytest.fail(f"diff server {self.kind}/{self.mode} exited with {self.proc.returncode}\n{self.log()}")
        call = self._control.unary_unary(f"/{CONTROL_SERVICE}/{method}")
        return json.loads(call(request, timeout=CONTROL_TIMEOUT))

    def take(self, rid: str) -> List[dict]:
        return self._ask("Take", rid.encode())["events"]

    def stats(self) -> dict:
        return self._ask("Stats", b"")

    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
        stop_process(self.proc)
        self._log.close()


class LineReader:
    """Whole stdout lines of a child, with a timeout, read in chunks."""

    def __init__(self, proc: subprocess.Popen):
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def line(self, timeout: float) -> Optional[str]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


class ClientProc:
    """One tests.diff_client process; runs one scenario per command line."""

    def __init__(self, kind: str, mode: str, root: str):
        self.kind, self.mode = kind, mode
        self.root = root
        self._start()

    def _start(self) -> None:
        self.log_path = os.path.join(tempfile.mkdtemp(prefix=f"client-{self.kind}-{self.mode}-", dir=self.root),
                                     "stderr.log")
        self._log = open(self.log_path, "wb")
        spec = {"kind": self.kind, "mode": self.mode, "parent": os.getpid()}
        self.proc = spawn([sys.executable, "-m", "tests.diff_client", json.dumps(spec)], None,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self.reader = LineReader(self.proc)
        self.ready = False

    def wait_ready(self) -> None:
        line = self.reader.line(START_TIMEOUT)
        if line is None or not line.startswith(CLIENT_READY):
            self.stop()
            raise RuntimeError(f"diff client {self.kind}/{self.mode} did not start: {line!r}\n{self.log()}")
        ready = json.loads(line[len(CLIENT_READY):])
        assert ready["shmgrpc_imported"] == (self.mode == "shmgrpc"), ready
        self.ready = True

    def log(self, tail: int = 6000) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-tail:]

    def run(self, command: dict) -> dict:
        if self.proc.poll() is not None:  # an earlier scenario killed it: start a new one
            self._log.close()
            self._start()
        if not self.ready:
            self.wait_ready()
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()
        t0 = time.monotonic()
        while True:
            line = self.reader.line(max(0.1, SCENARIO_TIMEOUT - (time.monotonic() - t0)))
            if line is None:
                log = self.log()
                self.stop()
                pytest.fail(
                    f"client {self.kind}/{self.mode}: scenario {command['scenario']} gave no result within "
                    f"{SCENARIO_TIMEOUT:.0f}s (process stopped)\n{log}"
                )
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT):])
                break
        if "crash" in result:
            pytest.fail(f"client {self.kind}/{self.mode}: scenario {command['scenario']} crashed:\n{result['crash']}")
        return result

    def stop(self) -> None:
        """Close stdin and let it exit (its exit handlers unlink what shmgrpc
        made); SIGTERM and SIGKILL only if it does not."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        stop_process(self.proc)
        self._log.close()
        self.ready = False


# --- the harness ------------------------------------------------------------------------


def counter(stats: Optional[dict], *path: str) -> Optional[int]:
    value = stats
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, int) else None


def server_counts(stats: Optional[dict], transport: str) -> Dict[str, Optional[int]]:
    return {
        "offloaded": counter(stats, "by_transport", transport, "offloaded", "count"),
        "restored": counter(stats, "by_transport", transport, "restored", "count"),
        "offloaded_total": counter(stats, "offloaded", "count"),
        "restored_total": counter(stats, "restored", "count"),
    }


def _delta(after: Dict[str, Optional[int]], before: Dict[str, Optional[int]]) -> Dict[str, Optional[int]]:
    return {k: (after[k] - before[k]) if after[k] is not None and before[k] is not None else None for k in after}


class Harness:
    def __init__(self, root: str):
        self.root = root
        self.servers: Dict[Tuple[str, str], ServerProc] = {}
        self.clients: Dict[Tuple[str, str], ClientProc] = {}
        self.baselines: Dict[str, dict] = {}
        self.runs: Dict[str, dict] = {}
        self.nowhere = f"unix:{os.path.join(root, 'nobody-listens-here.sock')}"
        self.proxies: Dict[str, ByteCountingProxy] = {}  # by server mode+kind: to its main site over TCP
        try:  # start everything at once: the starts overlap
            for kind in SERVER_KINDS:
                for mode in SERVER_MODES:
                    if mode == "off" and kind == "aio":
                        continue
                    self.servers[kind, mode] = ServerProc(kind, mode, root)
            for kind in CLIENT_KINDS:
                for mode in ("plain", "shmgrpc"):
                    self.clients[kind, mode] = ClientProc(kind, mode, root)
            for server in self.servers.values():
                server.wait_ready()
            for client in self.clients.values():
                client.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        for client in self.clients.values():
            if client.proc.returncode is None:
                client.stop()
        for server in self.servers.values():
            server.stop()

    def _targets(self, server: ServerProc, plain: ServerProc) -> Dict[str, str]:
        targets = dict(server.addresses)
        targets.pop("control", None)
        targets.pop("main_tcp", None)
        targets["plain_main"] = plain.addresses["main"]
        targets["nowhere"] = self.nowhere
        return targets

    def _execute(self, scenario: str, client: str, server: str, mode: str, transport: str, variant: str,
                 params: Optional[dict]) -> dict:
        """One run. mode: "plain" (baseline), "shmgrpc" (server of `transport`)
        or "shmgrpc-client" (a shmgrpc client of `transport`, the plain server)."""
        plain_server = self.servers[server, "plain"]
        target_server = self.servers[server, transport] if mode == "shmgrpc" else plain_server
        driver = self.clients[client, "plain" if mode == "plain" else "shmgrpc"]
        watched = [s for s in {id(target_server): target_server, id(plain_server): plain_server}.values()]
        rid = uuid.uuid4().hex
        targets = self._targets(target_server, plain_server)
        proxy = None
        if (params or {}).get("target") == "proxy":
            key = f"{target_server.kind}-{target_server.mode}"
            if key not in self.proxies:
                port = int(target_server.addresses["main_tcp"].rsplit(":", 1)[1])
                self.proxies[key] = ByteCountingProxy(port, max_connections=16, lifetime=600.0)
            proxy = self.proxies[key]
            targets["proxy"] = proxy.address
        wire_before = proxy.total if proxy is not None else None
        before = {s.mode: s.stats() for s in watched}
        result = driver.run(
            {
                "scenario": scenario,
                "rid": rid,
                "targets": targets,
                "transport": transport,
                "threshold": THRESHOLD,
                "variant": variant,
                "params": params or {},
            }
        )
        after = {s.mode: s.stats() for s in watched}
        wire_bytes = None
        if proxy is not None:
            time.sleep(0.05)  # the proxy's pumps count what they forwarded a moment after the client saw it
            wire_bytes = proxy.total - wire_before
        grouped: Dict[str, Dict[str, list]] = {}
        for s in watched:
            for ev in s.take(rid):
                group = grouped.setdefault(ev["rid"][len(rid):] or "-", {"app": [], "interceptors": []})
                # which server saw it: read (and removed) by split_shmgrpc_traffic, never compared
                ev["event"][SERVER_TAG] = "plain" if s.mode == "plain" else "shmgrpc"
                group[ev["category"]].append(ev["event"])
        server_proof = {}
        for name in before:
            stats_before, stats_after = before[name].get("stats"), after[name].get("stats")
            t = transport if transport in TRANSPORTS else "shm"
            server_proof[name] = {
                "counts": _delta(server_counts(stats_after, t), server_counts(stats_before, t)),
                "errors": (stats_after or {}).get("errors"),
                "errors_before": (stats_before or {}).get("errors"),
                "shmgrpc_imported": after[name]["shmgrpc_imported"],
            }
        return {
            "observed": {"client": result["observed"], "server": dict(sorted(grouped.items()))},
            "proof": {"client": result["proof"], "server": server_proof,
                      "client_imported_shmgrpc": result["shmgrpc_imported"], "wire_bytes": wire_bytes},
            "timing": result.get("timing", {}),
            "target_server": target_server.mode,
            "rid": rid,
        }

    def baseline(self, scenario: str, client: str, server: str, params: Optional[dict] = None) -> dict:
        key = json.dumps([scenario, client, server, params], sort_keys=True)
        if key not in self.baselines:
            base = self._execute(scenario, client, server, "plain", "off", "helper", params)
            assert base["proof"]["client_imported_shmgrpc"] is False, "the baseline client imported shmgrpc"
            for name, proof in base["proof"]["server"].items():
                assert proof["shmgrpc_imported"] is False, "the baseline server imported shmgrpc"
            self.baselines[key] = base
        return self.baselines[key]

    def run(self, scenario: str, client: str, server: str, transport: str, variant: str = "helper",
            params: Optional[dict] = None, against: str = "shmgrpc") -> dict:
        key = json.dumps([scenario, client, server, transport, variant, params, against], sort_keys=True)
        if key not in self.runs:
            mode = "shmgrpc" if against == "shmgrpc" else "shmgrpc-client"
            self.runs[key] = self._execute(scenario, client, server, mode, transport, variant, params)
        return self.runs[key]


@pytest.fixture(scope="module")
def harness():
    root = tempfile.mkdtemp(prefix="shmgrpc-diff-")
    h = Harness(root)
    try:
        yield h
    finally:
        h.stop()
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames:
                os.unlink(os.path.join(dirpath, name))
            for name in dirnames:
                os.rmdir(os.path.join(dirpath, name))
        os.rmdir(root)


# --- judging ----------------------------------------------------------------------------


def client_counts(proof: dict, transport: str, label: Optional[str] = None) -> Dict[str, Optional[int]]:
    """Offloaded / restored counts of the run's shmgrpc channels (one of them if `label`)."""
    out = {"offloaded": 0, "restored": 0, "offloaded_total": 0, "restored_total": 0}
    channels = [c for c in proof["channels"] if label is None or c["label"] == label]
    if not channels:
        return {k: None for k in out}
    for channel in channels:
        stats = channel.get("stats")
        counts = server_counts(stats, transport if transport in TRANSPORTS else "shm")
        for k in out:
            out[k] = None if out[k] is None or counts[k] is None else out[k] + counts[k]
    return out


def offload_problems(run: dict, transport: str, expect: frozenset, label: Optional[str] = None,
                     per_channel: Optional[Dict[str, frozenset]] = None) -> List[str]:
    """What is wrong with shmgrpc's account of the run: an expected counter
    that did not move, anything offloaded where nothing may be, a stats()
    that is missing or malformed. `per_channel`: label -> {"offloaded",
    "restored"} that must be > 0 on that one channel."""
    problems = []
    if run["target_server"] != "plain" and transport != "off":
        for name, wanted in (per_channel or {}).items():
            counts = client_counts(run["proof"]["client"], transport, name)
            for what in sorted(wanted):
                value = counts[what]
                if value is None or value <= 0:
                    problems.append(f"channel {name!r}: {what} by {transport} = {value}, expected > 0")
            for channel in run["proof"]["client"]["channels"]:
                status = channel.get("status") or {}
                if channel["label"] == name and (status.get("transport") != transport or not status.get("settled")):
                    problems.append(f"channel {name!r}: channel_status {status or channel.get('status_error')}, "
                                    f"expected transport {transport!r}, settled")
    mine = client_counts(run["proof"]["client"], transport, label)
    server = None
    if run["target_server"] != "plain":
        server = run["proof"]["server"].get(run["target_server"], {}).get("counts")
    channels = json.dumps(run["proof"]["client"]["channels"], default=str)[:3000]

    def need(name, value, ok, what):
        if value is None:
            problems.append(f"{name}: no such counter in stats() ({what})")
        elif not ok(value):
            problems.append(f"{name} = {value}, expected {what}")

    if run["target_server"] == "plain" or transport == "off":
        need("client offloaded (all transports)", mine["offloaded_total"], lambda v: v == 0, "0")
        need("client restored (all transports)", mine["restored_total"], lambda v: v == 0, "0")
        if server is not None:
            need("server offloaded (all transports)", server["offloaded_total"], lambda v: v == 0, "0")
            need("server restored (all transports)", server["restored_total"], lambda v: v == 0, "0")
    else:
        if "client_offloaded" in expect:
            need(f"client offloaded by {transport}", mine["offloaded"], lambda v: v > 0, "> 0")
        if "client_restored" in expect:
            need(f"client restored from {transport}", mine["restored"], lambda v: v > 0, "> 0")
        if "server_restored" in expect:
            need(f"server restored from {transport}", server["restored"], lambda v: v > 0, "> 0")
        if "server_offloaded" in expect:
            need(f"server offloaded by {transport}", server["offloaded"], lambda v: v > 0, "> 0")
    if problems:
        problems.append(f"client channels: {channels}")
        problems.append(f"server: {json.dumps(run['proof']['server'], default=str)[:2000]}")
    return problems


# What the general comparison sets aside. There is no handshake call: a
# channel learns its server's route from the trailers of its first calls that
# carry the hello (shmgrpc-hello, call metadata), and the hello travels only
# on calls that may carry a handle (a unary request at or above the
# threshold, any call of a method that has answered the channel at or above
# it, every request-streaming call). Interceptors placed outside shmgrpc on
# the server, and client interceptors placed inside the wrapper, cannot help
# seeing that key on those calls: it is set aside from interceptor events
# only. A server *without* shmgrpc hands it to its application too, on the
# calls a channel makes before it learns the server is plain: its first
# call that carries the hello and ends OK (every channel's warm-up call, see
# tests/diff_client.py Run.warm_up_request); that too is set aside, and
# check() fails if it shows anywhere else. test_interceptors_see_only_the_hello
# pins down that nothing else is set aside. The application's view on a
# shmgrpc server (its invocation_metadata(), every call's initial and
# trailing metadata) is compared with nothing set aside.
SHMGRPC_METHOD_PREFIX = "/shmgrpc.v1.Handshake/"  # not /shmgrpc.testing.v1.Echo: the test service
SHMGRPC_KEY_PREFIX = "shmgrpc-"
HELLO_KEY = "shmgrpc-hello"
SERVER_TAG = "_server"  # set on every server event by Harness._execute: "plain" or "shmgrpc"
WARM_UP_GROUP = "/warm-up"  # tests/diff_client.py WARM_UP_SUFFIX: the channels' route-learning calls
NO_EXTRAS = {"handshake_calls": [], "interceptor_keys": [], "plain_app_keys": []}


def split_shmgrpc_traffic(observed: dict) -> Tuple[dict, dict]:
    """(observations without what shmgrpc cannot help showing, that).

    extras: "handshake_calls", events of a call to shmgrpc's handshake
    method (there must be none: there is no handshake call any more);
    "interceptor_keys", shmgrpc-* keys an interceptor saw; "plain_app_keys",
    shmgrpc-* keys the application of a server without shmgrpc saw."""
    observed = json.loads(json.dumps(observed))
    extras = json.loads(json.dumps(NO_EXTRAS))

    def strip(events: List[dict], where: str, group: str, app: bool) -> List[dict]:
        kept = []
        for ev in events:
            server = ev.pop(SERVER_TAG, None)
            if str(ev.get("method", "")).startswith(SHMGRPC_METHOD_PREFIX):
                extras["handshake_calls"].append({"where": where, **ev})
                continue
            if app and server != "plain":
                kept.append(ev)  # a shmgrpc server's application: compared as it is
                continue
            keys = ev.get("metadata") or []
            ours = [k for k in keys if k.startswith(SHMGRPC_KEY_PREFIX)]
            if ours:
                extras["plain_app_keys" if app else "interceptor_keys"].append(
                    {"where": where, "group": group, "server": server, "name": ev.get("name"),
                     "method": ev.get("method"), "keys": ours})
                ev["metadata"] = [k for k in keys if not k.startswith(SHMGRPC_KEY_PREFIX)]
            kept.append(ev)
        return kept

    for group_name, group in observed["server"].items():
        group["interceptors"] = strip(group["interceptors"], f"server {group_name}", group_name, app=False)
        group["app"] = strip(group["app"], f"server {group_name}", group_name, app=True)
    observed["client"]["client_interceptors"] = strip(observed["client"]["client_interceptors"], "client", "",
                                                      app=False)
    return observed, extras


def extras_problems(extras: dict) -> List[str]:
    """What shmgrpc showed of itself that it may not show, in a shmgrpc run."""
    problems = [f"a handshake call (there is none any more): {h}" for h in extras["handshake_calls"]]
    problems += [f"an interceptor saw shmgrpc keys other than the hello: {e}" for e in extras["interceptor_keys"]
                 if e["keys"] != [HELLO_KEY]]
    for e in extras["plain_app_keys"]:
        if e["keys"] != [HELLO_KEY] or e["group"] != WARM_UP_GROUP:
            problems.append("the application of a server without shmgrpc saw shmgrpc keys on a call other than "
                            f"its channel's first (the warm-up): {e}")
    return problems


def check(harness: Harness, scenario: str, client: str, server: str, transport: str, variant: str = "helper",
          params: Optional[dict] = None, against: str = "shmgrpc", expect: frozenset = ALL,
          label: Optional[str] = None, per_channel: Optional[Dict[str, frozenset]] = None) -> Tuple[dict, dict]:
    """Run `scenario` plain and through shmgrpc; fail with every differing
    observation and every problem with the offload proof."""
    base = harness.baseline(scenario, client, server, params)
    run = harness.run(scenario, client, server, transport, variant, params, against)
    base_view, base_extras = split_shmgrpc_traffic(base["observed"])
    assert base_extras == NO_EXTRAS, base_extras
    run_view, run_extras = split_shmgrpc_traffic(run["observed"])
    diffs = differences(base_view, run_view)
    problems = extras_problems(run_extras) + offload_problems(run, transport, expect, label, per_channel)
    if diffs or problems:
        what = f"{scenario} {client}->{server} transport={transport} variant={variant}"
        if against != "shmgrpc":
            what += " (server without shmgrpc)"
        lines = [f"{what}: {len(diffs)} observation(s) differ from plain gRPC (rid {run['rid']})"]
        if diffs:
            lines.append(f"first: {diffs[0]}")
            lines += [f"  {d}" for d in diffs[1:25]]
            if len(diffs) > 25:
                lines.append(f"  ... and {len(diffs) - 25} more")
        if problems:
            lines.append("offload proof:")
            lines += [f"  {p}" for p in problems]
        pytest.fail("\n".join(lines), pytrace=False)
    return base, run


def calls(run: dict) -> Dict[str, dict]:
    return {c["label"]: c for c in run["observed"]["client"]["calls"]}


def app_requests(run: dict, group: str = "-") -> List[dict]:
    return [r for ev in run["observed"]["server"].get(group, {}).get("app", []) for r in ev["requests"]]


PAIRS = [("sync", "sync"), ("sync", "aio"), ("aio", "sync"), ("aio", "aio")]
SAME = [("sync", "sync"), ("aio", "aio")]


def pair_id(pair) -> str:
    return f"{pair[0]}-{pair[1]}"


# --- 15, 14, 10: every RPC shape, every sync / aio pair ------------------------------------------


BOTH_WAYS = frozenset({"offloaded", "restored"})
SHAPES = {shape: BOTH_WAYS for shape in ("uu", "us", "su", "ss")}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_shapes(harness, pair, transport):
    base, run = check(harness, "shapes", *pair, transport, per_channel=SHAPES)
    assert all(c["code"] == "OK" for c in base["observed"]["client"]["calls"]), base["observed"]["client"]["calls"]


def test_shapes_transport_off(harness):
    """SHMGRPC_TRANSPORT=off on both sides: a pass-through, nothing offloaded."""
    check(harness, "shapes", "sync", "sync", "off")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("pair", SAME, ids=pair_id)
def test_bytes_on_the_wire(harness, pair, transport):
    """Independent of shmgrpc's counters: through a byte-counting TCP proxy,
    the shmgrpc run moves a small fraction of the bytes the plain run moves.

    Each of the scenario's four channels first makes its route-learning
    warm-up call (a THRESHOLD request, a THRESHOLD answer): it crosses the
    socket inline in both runs, about 4 * 2 * 16 KiB = 128 KiB, since a
    channel's first call that carries the hello goes inline. Everything else
    large (the plain run moves about 3 MB) is offloaded, so the shmgrpc run
    moves the warm-ups, the small messages, headers and frames: well under a
    tenth of the plain run, and under 256 KiB. Without offload it would move
    as much as the plain run."""
    base, run = check(harness, "shapes", *pair, transport, params={"target": "proxy"}, per_channel=SHAPES)
    plain_bytes, shm_bytes = base["proof"]["wire_bytes"], run["proof"]["wire_bytes"]
    assert plain_bytes > 2_000_000, plain_bytes
    what = f"{shm_bytes} bytes crossed the socket with shmgrpc, {plain_bytes} without"
    assert shm_bytes < plain_bytes / 10, what
    assert shm_bytes < 256 * 1024, what


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_server_interceptors_see_the_real_requests(harness, pair):
    """(10) An interceptor passed to shmgrpc.server(interceptors=...) is
    outside shmgrpc: the request objects it is handed, unary and streaming,
    are the application's (Payload, full body), never a handle or a marker."""
    base, run = check(harness, "shapes", *pair, "shm")
    for group in run["observed"]["server"].values():
        for ev in group["interceptors"]:
            if ev["name"] != "log" or not ev["method"].startswith("/shmgrpc.testing.v1.Echo/"):
                continue
            assert ev["requests"], ev
            for request in ev["requests"]:
                assert request.get("proto") == "shmgrpc.testing.v1.Payload", ev
    logged = [r for g in run["observed"]["server"].values() for ev in g["interceptors"] for r in ev["requests"]]
    assert max(r.get("body_len", 0) for r in logged) >= 300 * 1024


# --- 1: a client interceptor inside and outside shmgrpc that rebuilds the request ---------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "pair,variant", [(("sync", "sync"), "inside"), (("sync", "sync"), "outside"), (("aio", "aio"), "inside"),
                     (("aio", "aio"), "helper")],
    ids=["sync-inside", "sync-outside", "aio-inside", "aio-helper"],
)
def test_stamping_interceptor(harness, pair, variant, transport):
    base, run = check(harness, "stamp", *pair, transport, variant)
    requests = app_requests(run)
    assert requests and all(r["note"] == "stamped" for r in requests), requests
    assert max(r["body_len"] for r in requests) == 300 * 1024


# --- 2, 3: custom serializers, non-protobuf responses ---------------------------------------------


CODECS = {codec: BOTH_WAYS for codec in ("json", "raw", "dict", "proto-det", "box", "to-dict", "to-bytes", "json-bidi")}
CODEC_CASES = [(("sync", "sync"), t) for t in (*TRANSPORTS, "off")] + [(("aio", "aio"), t) for t in TRANSPORTS] + [
    (("sync", "aio"), "shm"), (("aio", "sync"), "cma")]


@pytest.mark.parametrize("pair,transport", CODEC_CASES, ids=[f"{pair_id(p)}-{t}" for p, t in CODEC_CASES])
def test_custom_serializers(harness, pair, transport):
    base, run = check(harness, "codecs", *pair, transport, per_channel=CODECS)
    got = calls(run)
    assert got["json1"]["response"]["type"] == "builtins.dict"
    assert got["to-dict2"]["response"]["type"] == "builtins.dict"
    assert got["box1"]["response"]["type"].endswith(".Box")
    assert got["raw1"]["response"]["type"] == "builtins.bytes"
    assert got["to-bytes2"]["response"]["type"] == "builtins.bytes"


# --- 4: raw bytes that begin like a handle ------------------------------------------------------


@pytest.mark.parametrize("pair,transport", CODEC_CASES, ids=[f"{pair_id(p)}-{t}" for p, t in CODEC_CASES])
def test_handle_prefixes_in_raw_bytes(harness, pair, transport):
    base, run = check(harness, "prefix", *pair, transport)
    for label, call in calls(base).items():
        assert call["code"] == "OK", call


# --- 5: gRPC's own retries and a retrying client interceptor ---------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("pair", SAME, ids=pair_id)
def test_grpc_retry_policy(harness, pair, transport):
    base, run = check(harness, "retry_service_config", *pair, transport)
    assert all(c["code"] == "OK" for c in base["observed"]["client"]["calls"]), base["observed"]["client"]["calls"]
    attempts = [ev["attempt"] for ev in run["observed"]["server"]["-"]["app"]]
    assert attempts == [1, 2, 1, 2, 1, 2], attempts


RETRY_CASES = [(("sync", "sync"), v, t) for v in ("inside", "outside") for t in TRANSPORTS] + [
    (("aio", "aio"), v, t) for v in ("inside", "helper") for t in ("shm", "memfd")]


@pytest.mark.parametrize("pair,variant,transport", RETRY_CASES,
                         ids=[f"{pair_id(p)}-{v}-{t}" for p, v, t in RETRY_CASES])
def test_retrying_client_interceptor(harness, pair, variant, transport):
    base, run = check(harness, "retry_interceptor", *pair, transport, variant)
    assert all(c["code"] == "OK" for c in base["observed"]["client"]["calls"]), base["observed"]["client"]["calls"]


# --- 6: wait_for_ready against nobody -----------------------------------------------------------


WAIT_CASES = [("sync", t) for t in TRANSPORTS] + [("aio", "shm"), ("aio", "cma")]  # each run takes its 1 s


@pytest.mark.parametrize("kind,transport", WAIT_CASES, ids=[f"{k}-{t}" for k, t in WAIT_CASES])
def test_wait_for_ready_deadline(harness, kind, transport):
    base, run = check(harness, "wait_for_ready", kind, "sync", transport, expect=frozenset())
    for c in base["observed"]["client"]["calls"]:
        assert c["code"] == "DEADLINE_EXCEEDED", c
    for which, r in (("plain", base), ("shmgrpc", run)):
        for label in ("uu", "su"):
            elapsed = r["timing"][label]
            assert 0.8 <= elapsed <= 1.6, f"{which} {label}: timeout=1 took {elapsed:.2f}s"


# --- 7: message-size limits -------------------------------------------------------------------------


LIMIT_CASES = [(("sync", "sync"), t) for t in TRANSPORTS] + [(("aio", "aio"), "shm")]


@pytest.mark.parametrize("pair,transport", LIMIT_CASES, ids=[f"{pair_id(p)}-{t}" for p, t in LIMIT_CASES])
def test_server_receive_limit(harness, pair, transport):
    base, run = check(harness, "limit_server_recv", *pair, transport,
                      expect=frozenset({"client_offloaded", "server_restored"}))
    assert calls(base)["2MiB"]["code"] == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("pair,transport", LIMIT_CASES, ids=[f"{pair_id(p)}-{t}" for p, t in LIMIT_CASES])
def test_client_receive_limit(harness, pair, transport):
    base, run = check(harness, "limit_client_recv", *pair, transport,
                      expect=frozenset({"server_offloaded", "client_restored"}))
    assert calls(base)["reply-8MiB"]["code"] == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("pair,transport", LIMIT_CASES, ids=[f"{pair_id(p)}-{t}" for p, t in LIMIT_CASES])
def test_raised_limits(harness, pair, transport):
    base, run = check(harness, "limit_raised", *pair, transport)
    assert calls(base)["16MiB"]["code"] == "OK"


# --- 8: one config, two channels, one server without shmgrpc ------------------------------------------


@pytest.mark.parametrize("pair,transport", LIMIT_CASES, ids=[f"{pair_id(p)}-{t}" for p, t in LIMIT_CASES])
def test_one_config_two_channels(harness, pair, transport):
    base, run = check(harness, "shared_config", *pair, transport, label="shmgrpc-server")
    plain_side = client_counts(run["proof"]["client"], transport, "plain-server")
    assert plain_side["offloaded_total"] == 0, f"offloaded towards the plain server: {plain_side}"
    assert [r["body_len"] for r in app_requests(run, "/b")] == [300 * 1024, 300 * 1024, 300 * 1024, 100 * 1024]


# --- 9: a shmgrpc client, a server without shmgrpc ----------------------------------------------------


PLAIN_SERVER_CASES = [(s, p, t) for s in ("shapes", "codecs", "prefix", "errors") for p, t in
                      ((("sync", "sync"), "shm"), (("aio", "aio"), "memfd"), (("sync", "aio"), "cma"))]


@pytest.mark.parametrize("scenario,pair,transport", PLAIN_SERVER_CASES,
                         ids=[f"{s}-{pair_id(p)}-{t}" for s, p, t in PLAIN_SERVER_CASES])
def test_server_without_shmgrpc(harness, scenario, pair, transport):
    check(harness, scenario, *pair, transport, against="plain")


# --- 11: an authenticating server interceptor ---------------------------------------------------------


AUTH_CASES = [(("sync", "sync"), v, t) for v in ("inside", "outside") for t in TRANSPORTS] + [
    (("aio", "aio"), v, t) for v in ("helper",) for t in TRANSPORTS] + [(("aio", "aio"), "inside", "shm")]


@pytest.mark.parametrize("pair,variant,transport", AUTH_CASES,
                         ids=[f"{pair_id(p)}-{v}-{t}" for p, v, t in AUTH_CASES])
def test_auth_interceptor(harness, pair, variant, transport):
    base, run = check(harness, "auth", *pair, transport, variant)
    got = calls(base)
    assert got["md-uu"]["code"] == "OK" and got["icpt-uu"]["code"] == "OK"
    assert got["none-uu"]["code"] == "UNAUTHENTICATED" and got["none-ss"]["code"] == "UNAUTHENTICATED"
    assert got["first-none"]["code"] == "UNAUTHENTICATED" and got["then-md-again"]["code"] == "OK"
    # "unauthenticated first" has no warm-up: its first call, refused by the
    # auth interceptor before any welcome, teaches it nothing; its next call
    # (inline) learns the route, and the one after is offloaded.
    for label in ("per-call metadata", "interceptor", "unauthenticated first"):
        mine = client_counts(run["proof"]["client"], transport, label)
        assert mine["offloaded"], f"{label}: nothing offloaded on the authenticated channel: {mine}"


# --- 12: no shmgrpc metadata reaches the application ---------------------------------------------------


@pytest.mark.parametrize("scenario", ["shapes", "auth", "codecs"])
@pytest.mark.parametrize("pair", SAME, ids=pair_id)
def test_application_sees_no_shmgrpc_metadata(harness, pair, scenario):
    run = harness.run(scenario, *pair, "shm")
    seen = [(ev["method"], key) for g in run["observed"]["server"].values() for ev in g["app"]
            for key in ev["metadata"] if key.startswith("shmgrpc-")]
    assert not seen, f"the server application's invocation_metadata() has shmgrpc keys: {seen}"
    client_side = [(c["label"], key) for c in run["observed"]["client"]["calls"]
                   for key in [*(c.get("initial") or []), *(c.get("trailing") or [])]
                   if isinstance(key, str) and key.startswith("shmgrpc-")]
    assert not client_side, f"the client application's call metadata has shmgrpc keys: {client_side}"


# --- 13: failed calls look like gRPC's ------------------------------------------------------------------


ERROR_CASES = [(p, t) for p in SAME for t in TRANSPORTS] + [(("sync", "aio"), "shm"), (("aio", "sync"), "memfd")]


@pytest.mark.parametrize("pair,transport", ERROR_CASES, ids=[f"{pair_id(p)}-{t}" for p, t in ERROR_CASES])
def test_failed_calls(harness, pair, transport):
    base, run = check(harness, "errors", *pair, transport)
    checks = run["observed"]["client"]["checks"]
    if pair[0] == "sync":
        assert checks["future"]["exception"]["rpc_error"] and checks["future"]["exception"]["call"]
        assert checks["future"]["exception"]["debug_error_string"] == "str"
        assert checks["server_stream"]["raised"]["rpc_error"] and checks["server_stream"]["raised"]["call"]
    else:
        assert checks["unary"]["raised"]["aio_rpc_error"]
        assert checks["server_stream"]["raised"]["aio_rpc_error"]


# --- what interceptors see of shmgrpc itself ---------------------------------------------------------


EXTRAS_CASES = [("shapes", ("sync", "sync"), "shm", "helper"), ("shapes", ("aio", "aio"), "cma", "helper"),
                ("retry_interceptor", ("sync", "sync"), "shm", "inside"),
                ("retry_interceptor", ("aio", "aio"), "shm", "inside"),
                ("auth", ("sync", "sync"), "shm", "outside"), ("auth", ("aio", "aio"), "cma", "helper")]


# request-streaming methods: every call carries the hello
REQUEST_STREAMING = ("/shmgrpc.testing.v1.Echo/ClientStream", "/shmgrpc.testing.v1.Echo/BidiStream")
UNARY_REQUEST = ("/shmgrpc.testing.v1.Echo/Unary", "/diff.Flaky/Unary")
THRESHOLD_BYTES = 16 * 1024  # THRESHOLD


@pytest.mark.parametrize("scenario,pair,transport,variant", EXTRAS_CASES,
                         ids=[f"{s}-{pair_id(p)}-{t}-{v}" for s, p, t, v in EXTRAS_CASES])
def test_interceptors_see_only_the_hello(harness, scenario, pair, transport, variant):
    """All that the general comparison sets aside here: the hello key, on the
    calls that carry it. There is no handshake call (no call to
    /shmgrpc.v1.Handshake/ anywhere), no welcome, no other shmgrpc-* key
    reaches an interceptor, and no shmgrpc key at all reaches the
    application. The outermost server interceptor sees the hello exactly on
    the calls that may carry a handle: every request-streaming call and
    every unary request at or above the threshold carry it, and a smaller
    unary request carries it only if its method has answered at or above
    the threshold (here: Echo/Unary, whose answer to each channel's warm-up
    call is large). Client interceptors outside the wrapper see nothing of
    shmgrpc's."""
    base = harness.baseline(scenario, *pair)
    run = harness.run(scenario, *pair, transport, variant)
    _, extras = split_shmgrpc_traffic(run["observed"])
    assert extras["handshake_calls"] == [], extras["handshake_calls"]
    assert extras["plain_app_keys"] == [], extras["plain_app_keys"]  # no server without shmgrpc here
    for entry in extras["interceptor_keys"]:
        assert entry["keys"] == [HELLO_KEY], entry
    client_side = [e for e in extras["interceptor_keys"] if e["where"] == "client"]
    if pair[0] == "sync" and variant != "inside":  # grpc.intercept_channel around the wrapper: outside it
        assert client_side == [], client_side
    if variant == "inside":  # under the wrapper: the hello is call metadata by then
        assert client_side, "client interceptors inside the wrapper saw no hello"

    answered_large = {ev["method"] for g in run["observed"]["server"].values() for ev in g["interceptors"]
                      if ev["name"] == "log" and any(r.get("size", 0) >= THRESHOLD_BYTES for r in ev["responses"])}
    carried = 0
    for group_name, group in run["observed"]["server"].items():
        for ev in group["interceptors"]:
            if ev["name"] != "log":
                continue
            hello = HELLO_KEY in ev["metadata"]
            carried += hello
            where = f"{group_name} {ev['method']} requests {[r.get('size') for r in ev['requests']]}"
            if ev["method"] in REQUEST_STREAMING:
                assert hello, f"a request-streaming call without the hello: {where}"
            elif ev["method"] in UNARY_REQUEST and ev["requests"]:
                large = ev["requests"][0].get("size", 0) >= THRESHOLD_BYTES
                if large:
                    assert hello, f"a unary request at or above the threshold without the hello: {where}"
                elif hello:
                    assert ev["method"] in answered_large, f"a small request to a method that never answered " \
                                                           f"large carries the hello: {where}"
    assert carried, "no server interceptor saw the hello"
    # The baseline's interceptors saw the same calls: nothing was added.
    base_methods = sorted(ev["method"] for g in base["observed"]["server"].values() for ev in g["interceptors"])
    run_view, _ = split_shmgrpc_traffic(run["observed"])
    run_methods = sorted(ev["method"] for g in run_view["server"].values() for ev in g["interceptors"])
    assert base_methods == run_methods
