"""The oldest Python shmgrpc supports (pyproject's requires-python, 3.9).

Where an interpreter of that version can be found (on PATH, or installed by
pyenv), a fresh virtualenv gets grpcio and protobuf from the package index and
runs shmgrpc from this checkout: the package imports, and a sync and a
grpc.aio channel offload 1 MiB echoes to a server in the same process (shm:
memfd needs two processes), every byte compared. Elsewhere the test is
skipped and says why.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import run_json

OLDEST = (3, 9)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import asyncio, json, sys
from concurrent import futures
sys.path.insert(0, sys.argv[1])
import grpc
from google.protobuf.wrappers_pb2 import BytesValue
import shmgrpc, shmgrpc.aio

OPTIONS = [("grpc.max_receive_message_length", -1)]
METHOD = "/shmgrpc.testing.Oldest/Echo"
BODY = bytes(range(256)) * 4096
SER = dict(request_serializer=BytesValue.SerializeToString, response_deserializer=BytesValue.FromString)
echo = grpc.unary_unary_rpc_method_handler(
    lambda request, context: request,
    request_deserializer=BytesValue.FromString, response_serializer=BytesValue.SerializeToString)
server = shmgrpc.server(futures.ThreadPoolExecutor(2), options=OPTIONS)
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("shmgrpc.testing.Oldest", {"Echo": echo}),))
target = "unix:" + sys.argv[2]
server.add_insecure_port(target)
server.start()

def offloaded(stats):
    return sum(t["offloaded"]["count"] for t in stats["by_transport"].values())

channel = shmgrpc.insecure_channel(target, options=OPTIONS)
call = channel.unary_unary(METHOD, **SER)
ok = all(call(BytesValue(value=BODY)).value == BODY for _ in range(3))
sync_offloaded = offloaded(channel.stats())
channel.close()

async def aio():
    async with shmgrpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        call = channel.unary_unary(METHOD, **SER)
        good = True
        for _ in range(3):
            good = good and (await call(BytesValue(value=BODY))).value == BODY
        return good, offloaded(channel.stats())

aio_ok, aio_offloaded = asyncio.run(aio())
server.stop(None)
server.shmgrpc.close()
print(json.dumps({"version": list(sys.version_info[:2]), "ok": ok and aio_ok,
                  "sync_offloaded": sync_offloaded, "aio_offloaded": aio_offloaded}))
"""


def _works(python: str) -> bool:
    try:
        out = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == str(OLDEST)


def oldest_python():
    """An interpreter of the OLDEST version, or None."""
    name = "python%d.%d" % OLDEST
    candidates = [shutil.which(name)]
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(glob.glob(os.path.join(root, "versions", "%d.%d*" % OLDEST, "bin", name)))
    return next((c for c in candidates if c and _works(c)), None)


def test_the_oldest_supported_python_imports_and_offloads(tmp_path):
    if sys.version_info[:2] == OLDEST:
        pytest.skip("the suite itself runs on the oldest supported Python")
    python = oldest_python()
    if python is None:
        pytest.skip("no Python %d.%d here (on PATH or from pyenv)" % OLDEST)
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", "grpcio", "protobuf"],
                         capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        pytest.skip(f"grpcio/protobuf for Python %d.%d not installable here: {pip.stderr[-500:]}" % OLDEST)
    result = run_json([str(venv / "bin" / "python"), "-c", SCRIPT, ROOT, str(tmp_path / "oldest.sock")],
                      timeout=120, what="the oldest Python's echo")
    assert result["version"] == list(OLDEST)
    assert result["ok"], result
    # The first large message of a channel goes inline (it learns the route).
    assert result["sync_offloaded"] >= 2 and result["aio_offloaded"] >= 2, result
