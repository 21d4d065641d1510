"""The README against the code it describes: the Quickstart's files are
shown verbatim and run as written (server and client as real processes, the
commands the README gives), and the configuration table lists exactly the
variables shmgrpc.config reads."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from shmgrpc.config import ENV
from tests.conftest import ROOT, read_line, spawn, stop_process

README = (ROOT / "README.md").read_text()
QUICKSTART_FILES = ("server_example/quickstart.py", "client_example/quickstart.py")


def section(title: str) -> str:
    """The README's '## title' section, up to the next '## '."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def shown_files() -> Dict[str, str]:
    """{path: code} of each "`path`:" line followed by a python block."""
    blocks = re.findall(r"^`([\w/]+\.py)`:\n\n```python\n(.*?)^```$", section("Quickstart"),
                        re.MULTILINE | re.DOTALL)
    return dict(blocks)


def test_quickstart_shows_its_files_verbatim():
    shown = shown_files()
    assert sorted(shown) == sorted(QUICKSTART_FILES)
    for path in QUICKSTART_FILES:
        assert shown[path] == (ROOT / path).read_text(), f"README's copy of {path} differs from the file"
    proto = re.search(r"```proto\n(.*?)```", section("Quickstart"), re.DOTALL)
    assert proto and proto.group(1) in (ROOT / "protos" / "quickstart.proto").read_text()


def commands() -> List[List[str]]:
    """The '$ python -m ...' lines of the Quickstart, as argument lists."""
    lines = re.findall(r"^\$ (python -m .+)$", section("Quickstart"), re.MULTILINE)
    return [shlex.split(line) for line in lines]


def test_quickstart_runs_as_written():
    assert (ROOT / "protos" / "quickstart_pb2.py").exists(), "make protos/quickstart_pb2.py first (make test does)"
    (server_cmd, client_cmd) = commands()
    assert server_cmd[:3] == ["python", "-m", "server_example.quickstart"]
    assert client_cmd[:3] == ["python", "-m", "client_example.quickstart"] and client_cmd[3] == server_cmd[3]
    with tempfile.TemporaryDirectory(prefix="quickstart-") as tmp:
        target = f"unix://{Path(tmp) / 'quickstart.sock'}"  # the README's address, moved to a private directory
        server = spawn([sys.executable, *server_cmd[1:3], target], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
        try:
            assert read_line(server, 30.0).strip() == f"serving on {target}"
            client = spawn([sys.executable, *client_cmd[1:3], target], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
            out, err = client.communicate(timeout=60)
        except BaseException:
            stop_process(server, signal.SIGKILL)
            raise
        server.send_signal(signal.SIGTERM)  # as Ctrl-C would: it stops, prints its counts and exits
        try:
            rest, errors = server.communicate(timeout=30)
        finally:
            code = stop_process(server, signal.SIGKILL)
    assert client.returncode == 0, out + err
    status, counts = out.splitlines()
    # str(ChannelStatus): what carried the large messages, each way (the 8 MiB went through shared memory).
    shown = re.match(r"(\w+): requests via (\w+); responses via (\w+); co-located server pid \d+$", status)
    assert shown and shown.group(1) != "inline" and len(set(shown.groups())) == 1, status
    assert counts == "client: 1 requests offloaded, 1 responses restored"
    assert code == 0, errors
    assert rest.splitlines() == ["server: 1 requests restored, 1 responses offloaded"], rest + errors


def test_configuration_table_lists_every_variable():
    rows = re.findall(r"^\| `(SHMGRPC_[A-Z_]+)` \|", section("Configuration"), re.MULTILINE)
    assert len(rows) == len(set(rows)), "a variable has two rows"
    assert set(rows) == set(ENV), (sorted(set(ENV) - set(rows)), sorted(set(rows) - set(ENV)))
