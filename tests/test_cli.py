"""The `shmgrpc` command (python -m shmgrpc) against real processes.

- ls tells a live server's segments from a SIGKILLed one's (the reaper's
  liveness rule), gc --dry-run removes nothing, gc removes only the dead;
- doctor passes against the demo server, and fails with the reason when the
  server has no shmgrpc, when /dev/shm is too small for a segment (a private
  2 MiB tmpfs in a mount namespace) and when cma is blocked (a seccomp filter
  in the doctor's process).

ls and gc work on a private directory under /dev/shm (SHMGRPC_SHM_DIR), so
that they never judge or remove what concurrent runs leave in /dev/shm.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from typing import Dict, List, Optional

import pytest

from protos import echo_test_pb2 as pb
from tests.conftest import (
    CALL_TIMEOUT,
    KiB,
    SHM_DIR,
    client_config,
    read_line,
    shm_names,
    spawn,
    stop_process,
    suite_env,
)
from tests.echo_server import pattern

DEMO_ECHO = "/shmgrpc.demo.v1.BlobStore/Echo"


def cli(*args: str, env: Optional[Dict[str, str]] = None, prefix: Optional[List[str]] = None,
        timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run `python -m shmgrpc ARGS` (or `python PREFIX... ARGS`) as a child."""
    command = [sys.executable, *(prefix or ["-m", "shmgrpc"]), *args]
    proc = spawn(command, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"shmgrpc {' '.join(args)} timed out\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def cli_json(*args: str, env: Optional[Dict[str, str]] = None, prefix: Optional[List[str]] = None,
             expect: int = 0) -> dict:
    done = cli(*args, "--json", env=env, prefix=prefix)
    assert done.returncode == expect, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return json.loads(done.stdout)


def checks(report: dict, part: str) -> Dict[str, dict]:
    """{name: check} of report["machine"] or of the target's checks."""
    rows = report["machine"] if part == "machine" else report["target"]["checks"]
    return {row["name"]: row for row in rows}


# --- ls and gc -------------------------------------------------------------------


@pytest.fixture
def shm_dir():
    directory = tempfile.mkdtemp(prefix="cli-test-", dir=SHM_DIR)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_ls_and_gc_tell_live_owners_from_dead_ones(fresh_server, make_client, shm_dir):
    env = suite_env("shm", shm_dir=shm_dir)
    live = fresh_server(env, tcp=False)
    doomed = fresh_server(env, tcp=False)
    size = 256 * KiB
    for server in (live, doomed):  # each server offloads a response: it owns a pool segment then
        client = make_client(server.unix_target, client_config("shm", shm_dir=shm_dir))
        reply = client.stub.Unary(pb.Payload(seq=1, body=pattern(size, 1), reply_size=size), timeout=CALL_TIMEOUT)
        assert reply.body == pattern(size, 1)
        assert client.stats()["by_transport"]["shm"]["restored"]["count"] == 1
    live_names, doomed_names = shm_names(live.pid, shm_dir), shm_names(doomed.pid, shm_dir)
    assert any(n.endswith("-id") for n in doomed_names) and any(not n.endswith("-id") for n in doomed_names)
    assert doomed.kill() == -signal.SIGKILL

    # ls: every name, owner and liveness right (SHMGRPC_SHM_DIR, as users set it).
    listing = cli_json("ls", env={"SHMGRPC_SHM_DIR": shm_dir})
    assert listing["shm_dir"] == shm_dir
    rows = {row["name"]: row for row in listing["segments"]}
    assert set(live_names) | set(doomed_names) <= set(rows)
    for name in live_names:
        assert rows[name]["alive"] is True and rows[name]["pid"] == live.pid
    for name in doomed_names:
        assert rows[name]["alive"] is False and rows[name]["pid"] == doomed.pid
        assert rows[name]["size"] > 0 and rows[name]["age_seconds"] >= 0
    ours = [row for row in rows.values() if row["pid"] == os.getpid()]
    assert ours and all(row["alive"] for row in ours)  # this process's client segments

    human = cli("ls", "--dir", shm_dir)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    for name in doomed_names:
        assert any(name in line and " dead " in line and str(doomed.pid) in line for line in lines), human.stdout
    for name in live_names:
        assert any(name in line and " alive " in line for line in lines), human.stdout
    assert "python -m shmgrpc gc" in human.stdout

    # gc --dry-run: says what, removes nothing.
    dry = cli_json("gc", "--dry-run", "--dir", shm_dir)
    assert dry["dry_run"] is True
    assert sorted(row["name"] for row in dry["removed"]) == doomed_names
    assert shm_names(doomed.pid, shm_dir) == doomed_names

    # gc: the dead owner's segments go, the live ones stay, and the live server still serves offloaded calls.
    done = cli("gc", "--dir", shm_dir)
    assert done.returncode == 0, done.stderr
    assert f"removed {len(doomed_names)} segments of 1 exited process" in done.stdout
    assert shm_names(doomed.pid, shm_dir) == []
    assert shm_names(live.pid, shm_dir) == live_names
    client = make_client(live.unix_target, client_config("shm", shm_dir=shm_dir))
    assert client.stub.Unary(pb.Payload(body=pattern(size, 2)), timeout=CALL_TIMEOUT).body == pattern(size, 2)
    assert client.stats()["by_transport"]["shm"]["offloaded"]["count"] == 1
    again = cli_json("gc", "--dir", shm_dir)
    assert again["removed"] == []


# --- doctor ----------------------------------------------------------------------


class Demo:
    """`python -m server_example --listen unix:PATH`, the demo server."""

    def __init__(self, env: Optional[Dict[str, str]] = None):
        self._dir = tempfile.TemporaryDirectory(prefix="demo-")
        self.target = f"unix:{os.path.join(self._dir.name, 'demo.sock')}"
        self.proc = spawn([sys.executable, "-m", "server_example", "--listen", self.target, "--exit-with-parent"],
                          env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = read_line(self.proc, 30.0)
        if not line.startswith("listening on"):
            stop_process(self.proc, signal.SIGKILL)
            raise RuntimeError(f"demo server did not start: {line!r}")
        self.pid = self.proc.pid

    def stop(self) -> None:
        assert stop_process(self.proc) == 0
        self._dir.cleanup()


@pytest.fixture(scope="module")
def demo():
    server = Demo()
    yield server
    server.stop()


def test_doctor_passes_against_the_demo_server(demo):
    report = cli_json("doctor", demo.target, "--method", DEMO_ECHO)
    assert report["ok"] is True and report["transport"] == "memfd", report["summary"]
    target = checks(report, "target")
    assert target["handshake"]["status"] == "ok"
    assert f"pid {demo.pid}" in target["handshake"]["detail"]
    trip = target["round trip"]
    assert trip["status"] == "ok", trip
    assert trip["data"]["sent_via"] == ["memfd"] and trip["data"]["received_via"] == ["memfd"]
    assert "the answer is the request, unchanged" in trip["detail"]
    status = trip["data"]["status"]  # the channel's status after the round trip: each way via memfd
    assert status["sent"]["via"] == status["received"]["via"] == "memfd", status
    assert status["sent"]["messages"] == status["received"]["messages"] == 1, status
    machine = checks(report, "machine")
    for transport in ("memfd", "shm", "cma"):  # each transport this machine permits works with the server
        if machine[transport]["status"] == "ok":
            assert target[transport]["status"] == "ok", target[transport]
            assert target[transport]["data"]["sent_via"] == [transport]

    # Without --method (and no reflection in the demo): the handshake is the proof.
    human = cli("doctor", demo.target)
    assert human.returncode == 0, human.stdout + human.stderr
    assert "the server has no reflection service" in human.stdout
    assert human.stdout.rstrip().splitlines()[-1].startswith(f"OK: large messages to {demo.target} travel via memfd")


REFLECTING_SERVER = """
import sys
from concurrent import futures
import shmgrpc
from grpc_reflection.v1alpha import reflection
server = shmgrpc.server(futures.ThreadPoolExecutor(4))
reflection.enable_server_reflection([reflection.SERVICE_NAME], server)
server.add_insecure_port(sys.argv[1])
server.start()
print("listening on", sys.argv[1], flush=True)
sys.stdin.read()  # serves until the test closes our stdin
server.stop(None).wait()
server.shmgrpc.close()
"""


def test_doctor_round_trip_through_server_reflection(tmp_path):
    """No --method: a server with reflection answers a ServerReflectionInfo
    query with the request in it, a round trip with no side effects."""
    pytest.importorskip("grpc_reflection", reason="grpcio-reflection is not installed (pip install -e '.[dev]')")
    target = f"unix:{tmp_path / 'reflecting.sock'}"
    proc = spawn([sys.executable, "-c", REFLECTING_SERVER, target], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    try:
        assert read_line(proc, 30.0).startswith("listening on")
        report = cli_json("doctor", target)
    finally:
        proc.stdin.close()  # it stops, closes and exits (SIGTERM only if it hangs)
        try:
            proc.wait(timeout=10)
        finally:
            stop_process(proc)
    assert proc.returncode == 0
    assert report["ok"] is True, report["summary"]
    trip = checks(report, "target")["round trip"]
    assert trip["status"] == "ok", trip
    assert "server reflection (grpc.reflection.v1alpha.ServerReflection)" in trip["detail"]
    assert "services: grpc.reflection.v1alpha.ServerReflection" in trip["detail"]
    assert trip["data"]["sent_via"] == [report["transport"]] == trip["data"]["received_via"]


QUICKSTART_ECHO = "/quickstart.v1.Echo/Echo"


def test_doctor_says_when_a_method_drops_its_payload(tmp_path):
    """The most common echo, `Blob(data=request.data)` (the Quickstart's
    server), drops the doctor's unknown-field request and answers 0 bytes:
    the doctor says so, not "below the threshold", and points to --field,
    with which the payload goes out and back through shared memory."""
    target = f"unix:{tmp_path / 'quickstart.sock'}"
    proc = spawn([sys.executable, "-m", "server_example.quickstart", target], stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    try:
        assert read_line(proc, 30.0).startswith("serving on")
        dropped = cli_json("doctor", target, "--method", QUICKSTART_ECHO)
        human = cli("doctor", target, "--method", QUICKSTART_ECHO)
        echoed = cli_json("doctor", target, "--method", QUICKSTART_ECHO, "--field", "1")
        alone = cli("doctor", "--field", "1")
    finally:
        stop_process(proc)
    trip = checks(dropped, "target")["round trip"]
    assert trip["status"] == "warn", trip
    assert "answered without the doctor's payload (a 0-byte answer" in trip["detail"]
    assert "copies only the fields it knows" in trip["detail"] and "--field" in trip["fix"]
    assert trip["data"]["sent_via"] == [dropped["transport"]] and trip["data"]["received_via"] == []
    for row in checks(dropped, "target").values():  # nothing blames the threshold
        assert "threshold" not in row["detail"] + row.get("fix", ""), row
    assert "see --field" in dropped["summary"]
    assert "fix: give --field N" in human.stdout and "0-byte answer" in human.stdout, human.stdout

    assert echoed["ok"] is True, echoed["summary"]
    trip = checks(echoed, "target")["round trip"]
    assert trip["status"] == "ok" and "the answer is the request, unchanged" in trip["detail"], trip
    assert trip["data"]["sent_via"] == [echoed["transport"]] == trip["data"]["received_via"]
    assert alone.returncode == 2 and "--field goes with --method" in alone.stderr


def test_doctor_fails_against_a_plain_server(servers):
    plain = servers.shared(flags=["--plain"])
    done = cli("doctor", plain.unix_target)
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stdout.rstrip().splitlines()[-1]
    assert last.startswith("FAIL: ") and "without shmgrpc" in last and "UNIMPLEMENTED" in last, done.stdout
    assert "fix: install shmgrpc in the server" in done.stdout


# Inside `unshare -m`: a private 2 MiB tmpfs on /dev/shm, the demo server and
# the doctor in it (both see the same small /dev/shm), SHMGRPC_TRANSPORT=shm.
SMALL_SHM = textwrap.dedent("""
    set -u
    mount -t tmpfs -o size=2m tmpfs /dev/shm || { echo "NOMOUNT"; exit 0; }
    sock=$(mktemp -d)/demo.sock
    "$PY" -m server_example --listen "unix:$sock" --exit-with-parent > "$sock.out" 2>&1 &
    server=$!
    for i in $(seq 300); do grep -q "listening on" "$sock.out" && break; sleep 0.1; done
    SHMGRPC_TRANSPORT=shm "$PY" -m shmgrpc doctor "unix:$sock" --method "$METHOD" --json
    echo "EXIT $?"
    kill $server; wait $server
""")


def test_doctor_fails_when_dev_shm_is_too_small():
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    proc = spawn(["unshare", "-m", "--propagation", "private", "sh", "-c", SMALL_SHM],
                 {"PY": sys.executable, "METHOD": DEMO_ECHO}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True)
    out, err = proc.communicate(timeout=90)
    if proc.returncode != 0 and "unshare" in err:
        pytest.skip(f"unshare -m is not permitted here: {err.strip()[:200]}")
    if out.startswith("NOMOUNT"):
        pytest.skip(f"mounting a tmpfs in a mount namespace is not permitted here: {err.strip()[:200]}")
    body, _, status = out.rpartition("EXIT ")
    assert status.strip() == "1", out + err
    report = json.loads(body)
    assert report["ok"] is False
    shm = checks(report, "machine")["shm"]
    assert shm["status"] == "fail"
    assert shm["data"]["total"] == 2 * 1024 * 1024
    assert "No space left on device" in shm["detail"] and "--shm-size" in shm["fix"]
    target = checks(report, "target")
    assert target["handshake"]["status"] == "ok"  # the handshake itself needs only a 4 KiB id segment
    assert target["round trip"]["status"] == "fail"
    assert target["round trip"]["data"]["fallbacks"] == {"shm_no_space": 1}
    assert target["shm"]["status"] == "fail" and "shm_no_space" in target["shm"]["detail"]
    assert target["memfd"]["status"] == "ok"  # memfd needs no /dev/shm: the way out
    assert "shm_no_space" in report["summary"] and "No space left on device" in report["summary"]
    # The summary names each way and why: requests by the doctor's own fallback, responses as it saw them.
    assert "requests inline (shm_no_space: /dev/shm has" in report["summary"], report["summary"]
    assert "responses inline (server pid" in report["summary"], report["summary"]
    assert report["summary"].count("No space left on device") == 1, report["summary"]  # said once


CMA_BLOCKED = """
import sys
from tests._seccomp import deny_process_vm
deny_process_vm()
from shmgrpc.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_doctor_fails_when_cma_is_blocked(demo):
    report = cli_json("doctor", demo.target, "--method", DEMO_ECHO, env={"SHMGRPC_TRANSPORT": "cma"},
                      prefix=["-c", CMA_BLOCKED], expect=1)
    assert report["ok"] is False
    cma = checks(report, "machine")["cma"]
    assert cma["status"] == "fail"
    assert "seccomp filter" in cma["detail"] and "EPERM" in cma["detail"] and "SYS_PTRACE" in cma["fix"]
    target = checks(report, "target")
    # The server may read us (requests go via cma); we may not read it: answers come inline.
    assert target["cma"]["status"] == "fail"
    assert target["cma"]["data"]["sent_via"] == ["cma"] and target["cma"]["data"]["received_via"] == []
    assert "EPERM" in target["cma"]["detail"]
    assert "seccomp filter" in report["summary"]
    machine = checks(report, "machine")
    for transport in ("memfd", "shm"):  # the other rungs are untouched by the filter
        if machine[transport]["status"] == "ok":
            assert target[transport]["status"] == "ok", target[transport]


def test_doctor_says_how_large_buffers_meet_fresh_memory():
    """The malloc line: the default (with the two levers named), keep, and
    glibc's transparent huge pages, as each process would be started."""
    default = checks(cli_json("doctor"), "machine")["malloc"]
    assert default["status"] == "info" and default["data"]["shmgrpc_malloc"] == "default"
    assert "SHMGRPC_MALLOC=keep" in default["fix"]
    keep = checks(cli_json("doctor", env={"SHMGRPC_MALLOC": "keep"}), "machine")["malloc"]
    assert keep["data"]["shmgrpc_malloc"] == "keep" and "RSS" in keep["detail"]
    thp = checks(cli_json("doctor", env={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}), "machine")["malloc"]
    if thp["data"]["transparent_hugepage"] in ("madvise", "always"):
        assert thp["data"]["glibc_hugetlb"] is True and "2 MiB" in thp["detail"], thp


def test_one_table_printer():
    """format_table, behind ls, doctor, the bench, loopstall and the demo's
    table: columns as wide as their widest cell (or the minimum), aligned
    per column (right past `align`), no trailing spaces."""
    from shmgrpc.tools import format_table

    rows = [["PID", "OWNER", "NAME"], ["7", "alive", "a"], ["12345", "dead", "shmgrpc-12345-x"]]
    assert format_table(rows, align="><<", indent="  ") == [
        "    PID  OWNER  NAME", "      7  alive  a", "  12345  dead   shmgrpc-12345-x"]
    assert format_table([["ok", "a", "text"], ["", "", "fix: more"]], align="<<<", minimum=[4]) == [
        "ok    a  text", "         fix: more"]
    assert format_table([["x", "1.5"], ["long", "10"]]) == ["   x  1.5", "long   10"]
