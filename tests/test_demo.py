"""`make demo` (python -m client_example --demo) says what its counts mean:
the server's offloaded and restored, why they differ, and each fallback
reason that appears, in the library's words (those of channel_status()),
whichever reason the library can count."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from shmgrpc import Config
from client_example.explain import explain
from shmgrpc._status import fallback_words
from tests.conftest import ROOT, spawn


def fallback_reasons_in_source() -> set:
    """The reason strings shmgrpc counts in stats()["fallbacks"], as the
    source spells them (the engine, the pool and the cma pin table)."""
    found = set()
    pattern = re.compile(r'(?:add\("fallback", |reason = |return None, (?:None, )?|None, None, )f?"([a-z_{}]+)"')
    for path in (ROOT / "shmgrpc").rglob("*.py"):
        for reason in pattern.findall(path.read_text()):
            # f"{kind}_no_space": the pool's two kinds of segment
            found.update({reason.replace("{kind}", kind) for kind in ("memfd", "shm")})
    return found


def test_every_fallback_reason_is_explained():
    found = fallback_reasons_in_source()
    assert {"below_cma_threshold", "pool_full", "peer_not_colocated", "shm_no_space"} <= found, found
    lines = explain("fallbacks: none; errors: none", found).splitlines()
    for reason in found:
        assert f"      {fallback_words(reason, Config.from_env(), {})}" in lines, reason


def test_demo_explains_its_counts():
    # 256 KiB: above the threshold, below the cma transport's own threshold,
    # so the cma row falls back (below_cma_threshold) when cma works here.
    proc = spawn([sys.executable, "-m", "client_example", "--demo", "--sizes", "64KiB,256KiB,1MiB", "--repeat", "1"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the demo timed out\nstdout:\n{out}\nstderr:\n{err}")
    assert proc.returncode == 0, out + err
    lines = out.splitlines()
    server = next(line for line in lines if line.startswith("server shmgrpc: offloaded "))
    after = lines[lines.index(server) + 1:]
    assert after[0] == "  what the server's counts mean:", out
    for word in ("offloaded", "restored", "inline", "by transport"):
        assert any(line.startswith(f"    {word}: ") for line in after), (word, out)
    assert any(line.startswith("    the two differ because ") for line in after), out
    # Every reason the run shows (the server's line, the tables' notes) is explained, in its own words.
    shown = set(re.findall(r"(\w+) \d+", server.split("fallbacks: ", 1)[1].split(";", 1)[0]))
    for note in (line for line in lines if " fell back to inline: " in line):
        shown.update(re.findall(r"(\w+) x\d+", note))
    if re.search(r"^shmgrpc cma .* cma$", out, re.MULTILINE):  # cma works here: its 256 KiB row fell back
        assert "below_cma_threshold" in shown, out
    for reason in shown:  # the demo runs with no SHMGRPC_* (child_env): the default settings
        assert f"      {fallback_words(reason, Config(), {})}" in lines, (reason, out)
