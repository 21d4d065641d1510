"""The status tells the truth (issue 18, item 4): what large messages
actually did, each way, in channel_status, server.shmgrpc.status() and
stats()["peers"]; one WARNING naming what to change when a configured
transport cannot be honoured; `shmgrpc doctor` failing when either way to
its target goes inline.

Real processes and kernels: a private mount namespace whose /dev/shm is an
8 MiB tmpfs (every large message inline: shm_no_space), and a server that
a client may not read with cma (the server is non-dumpable and the client
lacks CAP_SYS_PTRACE: requests go via cma, responses inline). Each case
once with sync gRPC and once with grpc.aio on both sides.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

import pytest

from shmgrpc import ChannelStatus, Config
from shmgrpc.transports import _vm as cma
from shmgrpc._status import RECENT, Recent, carrier, fallback_words, inline_notes, summarize
from tests.conftest import MiB, run_json, spawn, suite_env

APIS = ("sync", "aio")


def run_role(role: str, spec: dict, prefix: List[str] = (), env: Optional[Dict[str, str]] = None,
             timeout: float = 90.0) -> dict:
    """tests/_status_procs.py ROLE in a child (behind `prefix`: unshare,
    setpriv); its JSON result."""
    return run_json([*prefix, sys.executable, "-m", "tests._status_procs", role, json.dumps(spec)], env,
                    timeout, what=role)


def warnings(records: List[dict]) -> List[str]:
    return [r["message"] for r in records if r["level"] == "WARNING"]


def stderr_warnings(text: str) -> List[str]:
    """shmgrpc's WARNING lines in a server's stderr (its logging.basicConfig format)."""
    return [line for line in text.splitlines() if line.startswith("WARNING:shmgrpc")]


def peer_of(server_stats: dict, pid: int) -> dict:
    """The server's stats()["peers"] entry of client `pid`."""
    entries = [p for p in server_stats["interceptor"]["peers"] if p["pid"] == pid]
    assert len(entries) == 1, server_stats["interceptor"]["peers"]
    return entries[0]


# --- an 8 MiB /dev/shm, SHMGRPC_TRANSPORT=shm -------------------------------------------


@pytest.mark.parametrize("api", APIS)
def test_small_dev_shm_status_says_inline_and_why(api):
    """Client and server share an 8 MiB /dev/shm: no 16 MiB pool segment
    fits, every large message goes inline with shm_no_space. The status
    said transport='shm', reason='co-located server pid N' (an INFO line
    only); now each way says inline and why, and each process logs one
    WARNING naming what to change."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    calls = 3
    spec = {"size": "8m", "api": api, "message": 1 * MiB, "calls": calls, "env": suite_env("shm")}
    out = run_role("small_shm", spec, prefix=["unshare", "-m", "--propagation", "private"])
    if "skip" in out:
        pytest.skip(out["skip"])
    st, server_pid = out["status"], out["server_pid"]
    assert out["stats"]["fallbacks"] == {"shm_no_space": calls}, out["stats"]  # what really happened...

    # ...and the status says it: inline, each way, with the reason.
    assert st["transport"] == "inline", st
    sent, received = st["sent"], st["received"]
    assert sent["via"] == "inline" and sent["fallback"] == "shm_no_space" and sent["messages"] == calls, sent
    assert sent["recent"] == {"shm_no_space": calls}
    assert re.search(r"^shm_no_space: /dev/shm has [\d.]+ [KM]iB free of 8 MiB, no room for a new pool segment$",
                     sent["reason"]), sent
    assert received["via"] == "inline" and received["messages"] == calls, received
    assert f"server pid {server_pid} sent them inline" in received["reason"], received
    assert f"requests inline: {sent['reason']}" in st["reason"] and "responses inline: " in st["reason"], st
    assert st["str"].startswith("inline: requests inline (shm_no_space: /dev/shm has"), st["str"]

    # One WARNING in each process, saying what to change.
    for said in (warnings(out["log"]), stderr_warnings(out["server_stderr"])):
        assert len(said) == 1, said
        assert "SHMGRPC_TRANSPORT=shm cannot be honoured" in said[0] and "shm_no_space" not in said[0]
        assert "Mount a larger /dev/shm" in said[0] and "SHMGRPC_TRANSPORT=memfd" in said[0], said[0]

    # The server says the same of this client's route: responses inline (its
    # own shm_no_space), requests inline (sent so by the client).
    peer = peer_of(out["server"], out["pid"])
    assert peer["transport"] == "inline" and peer["peer"] == f"client pid {out['pid']}", peer
    assert peer["sent"]["via"] == "inline" and peer["sent"]["fallback"] == "shm_no_space", peer
    assert peer["received"]["via"] == "inline" and peer["received"]["messages"] == calls, peer
    assert any(line.startswith(f"client pid {out['pid']}: inline: requests inline") for line in
               out["server"]["peer_status"]), out["server"]["peer_status"]


# --- cma, and a server this client may not read -------------------------------------------


def no_ptrace_prefix() -> List[str]:
    """What makes a child of ours lack CAP_SYS_PTRACE: root loses it from its
    bounding set (setpriv), a non-root process never had it."""
    if os.geteuid() != 0:
        if cma.ptrace_scope() not in (None, 0):
            pytest.skip("Yama ptrace_scope forbids siblings to read each other here: no cma at all")
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    return ["setpriv", "--bounding-set", "-sys_ptrace"]


def doctor(target: str, prefix: List[str]) -> subprocess.CompletedProcess:
    proc = spawn([*prefix, sys.executable, "-m", "shmgrpc", "doctor", target, "--json"],
                 {"SHMGRPC_TRANSPORT": "cma", "SHMGRPC_CMA_THRESHOLD": "64KiB", "SHMGRPC_THRESHOLD": "64KiB"},
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=90)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.skipif(not cma.available(), reason="process_vm_readv needs Linux")
@pytest.mark.parametrize("api", APIS)
def test_cma_server_this_client_may_not_read(fresh_server, api):
    """SHMGRPC_TRANSPORT=cma, a non-dumpable server, a client without
    CAP_SYS_PTRACE: the server reads the client's requests, the client may
    not read the server's responses. The status said cma (the WARNING "sending
    inline"), and `shmgrpc doctor` said OK with exit 0; now the status says
    requests via cma, responses inline and why, each process warns once
    about its own way, and the doctor exits 1 naming the way and the cause.
    Without the restriction the same doctor against the same server exits 0."""
    prefix = no_ptrace_prefix()
    server = fresh_server(suite_env("cma"), ["--non-dumpable", *(["--aio"] if api == "aio" else [])], tcp=False)
    calls = 3
    out = run_role("client", {"target": server.unix_target, "api": api, "size": 1 * MiB, "calls": calls},
                   prefix=prefix, env=suite_env("cma"))
    st = out["status"]
    assert out["stats"]["by_transport"]["cma"]["offloaded"]["count"] == calls, out["stats"]  # what happened
    assert out["stats"]["by_transport"]["cma"]["restored"]["count"] == 0

    assert st["transport"] == "cma", st  # requests are carried...
    assert st["sent"]["via"] == "cma" and st["sent"]["messages"] == calls and not st["sent"]["fallback"], st
    received = st["received"]  # ...responses are not, and why
    assert received["via"] == "inline" and received["messages"] == calls, received
    assert received["fallback"] == "peer_cannot_read", received
    assert f"this process may not read server pid {server.pid}" in received["reason"], received
    assert "EPERM" in received["reason"], received
    assert st["str"].startswith(f"cma: requests via cma; responses inline (cma: this process may not read "
                                f"server pid {server.pid}"), st["str"]
    assert "responses inline: " in st["reason"], st

    said = warnings(out["log"])
    assert len(said) == 1, said
    assert said[0].startswith("SHMGRPC_TRANSPORT=cma cannot be honoured for responses: this process may not read "
                              f"server pid {server.pid}"), said[0]
    assert "sending inline" not in said[0] and "CAP_SYS_PTRACE" in said[0], said[0]

    peer = peer_of(out["server"], out["pid"])  # the server's view of the same route
    assert peer["received"]["via"] == "cma" and peer["received"]["messages"] == calls, peer
    assert peer["sent"]["via"] == "inline" and peer["sent"]["fallback"] == "peer_cannot_read", peer
    assert "does not accept it from this process" in peer["sent"]["reason"], peer
    server_said = stderr_warnings(server.log())
    assert len(server_said) == 1 and "cannot be honoured for responses to client pid" in server_said[0], server_said

    if api == "aio":
        return  # the doctor is one program: run once, against the sync server
    # No --method and no reflection: only the handshake. It now knows the way
    # back is closed, says which and why, and exits 1.
    denied = doctor(server.unix_target, prefix)
    assert denied.returncode == 1, denied.stdout + denied.stderr
    report = json.loads(denied.stdout)
    assert report["ok"] is False
    summary = report["summary"]
    assert "requests expected via cma" in summary and "responses would go inline" in summary, summary
    assert f"may not read server pid {server.pid}" in summary and "EPERM" in summary, summary
    row = {c["name"]: c for c in report["target"]["checks"]}["cma"]
    assert row["status"] == "fail" and "responses would go inline" in row["detail"], row
    assert "CAP_SYS_PTRACE" in row["fix"], row

    healthy = doctor(server.unix_target, [])  # as root, it may read the server: both ways via cma
    if os.geteuid() == 0:
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        report = json.loads(healthy.stdout)
        assert report["ok"] is True and report["transport"] == "cma", report["summary"]
        assert report["summary"].startswith("large messages to ") and " travel via cma (proved by" in \
            report["summary"], report["summary"]


# --- the words and the window, alone -----------------------------------------------------


def test_every_fallback_reason_has_words():
    """Each reason the source counts in stats()["fallbacks"] is explained in
    the status with its own words (never echoed bare)."""
    from tests.test_demo import fallback_reasons_in_source

    config = Config()
    for reason in sorted(fallback_reasons_in_source()):
        words = fallback_words(reason, config, {})
        assert words.startswith(reason + ": ") and len(words) > len(reason) + 20, (reason, words)


def test_a_blip_shows_beside_the_transport_that_carries_the_rest():
    """The last RECENT outcomes, oldest first; the latest decides `via`, an
    inline one among them still shows (fallback, the mix, the reason's note)."""
    recent = Recent()
    for i in range(RECENT + 8):
        recent.add("pool_full" if i % 10 == 0 else "memfd")  # 0, 10, 20, 30, 40: the last three remembered
    assert recent.window() == ["pool_full" if i % 10 == 0 else "memfd" for i in range(8, RECENT + 8)]
    sent = summarize(recent, ("memfd", ""), lambda outcome: (outcome, f"{outcome}: words"))
    assert (sent.via, sent.fallback, sent.messages, sent.recent) == ("memfd", "pool_full", RECENT + 8,
                                                                     (("memfd", 29), ("pool_full", 3)))
    assert sent.words("requests") == "requests via memfd [last 32: memfd 29, pool_full 3]"
    received = summarize(Recent(), ("memfd", ""), lambda outcome: (outcome, ""))
    assert (received.via, received.messages) == ("memfd", 0)  # none yet: what the route expects
    status = ChannelStatus(carrier(sent, received), ("memfd",), "co-located server pid 1", True, sent, received)
    assert inline_notes(sent, received) == "; 3 of the last 32 requests inline (pool_full)"
    assert str(status) == ("memfd: requests via memfd [last 32: memfd 29, pool_full 3]; responses expected via "
                           "memfd (none yet); co-located server pid 1")
    recent.add("shm_no_space")  # the latest went inline: so does the way
    sent = summarize(recent, ("memfd", ""), lambda outcome: (outcome, f"{outcome}: words"))
    assert (sent.via, sent.reason, sent.fallback) == ("inline", "shm_no_space: words", "shm_no_space")
    assert carrier(sent, received) == "inline"
