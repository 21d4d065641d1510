"""Types as a user's checker sees them (issue 20).

- `mypy -p shmgrpc` is clean under the project's own configuration
  (pyproject.toml, [tool.mypy]).
- A README-style program passes `mypy --strict`: sync and aio channels built
  with shmgrpc and handed to the typed stubs of protos/quickstart.proto (made
  by `make` with mypy-protobuf), calls through them, servers handed to
  add_EchoServicer_to_server, Config, stats(), channel_status(), errors. It
  uses shmgrpc's objects where grpc's are expected (grpc.Channel,
  grpc.aio.Channel, grpc.Server, grpc.aio.Server).
- The same program with four wrong lines fails, each line reported: the
  types are real, not Any.

shmgrpc is found on mypy_path and its own modules are followed silently, as
mypy treats an installed package with py.typed (test_package.py checks the
wheel itself that way). The project's config is not used for the program: a
user's checker knows nothing of it. Runs in ~15-25 s on 2 cores (cold cache).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[dev]')")

STUBS = [ROOT / "protos" / "quickstart_pb2.pyi", ROOT / "protos" / "quickstart_pb2_grpc.pyi"]

USER_PROGRAM = '''
"""A user's program on shmgrpc's public API, as the README shows it."""

from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Dict, List, Tuple

import grpc
import grpc.aio

import shmgrpc
import shmgrpc.aio
from protos import quickstart_pb2, quickstart_pb2_grpc

OPTIONS: List[Tuple[str, int]] = [("grpc.max_receive_message_length", 64 << 20),
                                  ("grpc.max_send_message_length", 64 << 20)]
TARGET = "unix:/tmp/shmgrpc-typing.sock"


class Echo(quickstart_pb2_grpc.EchoServicer):
    def Echo(self, request: quickstart_pb2.Blob, context: grpc.ServicerContext) -> quickstart_pb2.Blob:
        return quickstart_pb2.Blob(data=request.data)


class AioEcho(quickstart_pb2_grpc.EchoServicer):
    async def Echo(self, request: quickstart_pb2.Blob,
                   context: grpc.aio.ServicerContext[quickstart_pb2.Blob, quickstart_pb2.Blob]) -> quickstart_pb2.Blob:
        return quickstart_pb2.Blob(data=request.data)


def echo_stub(channel: grpc.Channel) -> quickstart_pb2_grpc.EchoStub:
    """Takes any grpc.Channel: a shmgrpc channel is one."""
    return quickstart_pb2_grpc.EchoStub(channel)


def serve(target: str) -> shmgrpc.Server:
    server = shmgrpc.server(futures.ThreadPoolExecutor(4), options=OPTIONS)
    quickstart_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    port: int = server.add_insecure_port(target)
    server.start()
    as_grpc: grpc.Server = server
    snap: shmgrpc.StatsSnapshot = server.shmgrpc.stats()
    restored: int = snap["restored"]["count"]
    print(port, as_grpc, restored, server.shmgrpc.transport)
    return server


def client(target: str) -> Tuple[bytes, str]:
    config: shmgrpc.Config = shmgrpc.Config.from_env(threshold=256 * 1024)
    with shmgrpc.insecure_channel(target, OPTIONS, config=config) as channel:
        reply = echo_stub(channel).Echo(quickstart_pb2.Blob(data=b"x" * (8 << 20)), timeout=30)
        status: shmgrpc.ChannelStatus = shmgrpc.channel_status(channel)
        rungs: Tuple[str, ...] = status.transports
        snap = channel.stats()
        fallbacks: Dict[str, int] = snap["fallbacks"]
        in_use: int = snap["pool"]["bytes_in_use"]
        print(rungs, status.settled, status.reason, fallbacks, in_use, channel.transport)
        data: bytes = reply.data
    wrapped = shmgrpc.intercept_channel(grpc.insecure_channel(target), options=OPTIONS)
    try:
        quickstart_pb2_grpc.EchoStub(wrapped).Echo(quickstart_pb2.Blob(), timeout=5)
    except shmgrpc.ShmGrpcError as err:
        code: grpc.StatusCode = err.status_code
        print(code)
    except grpc.RpcError as err:
        print(err)
    finally:
        wrapped.close()
    return data, status.transport


async def aio_serve(target: str) -> shmgrpc.aio.Server:
    server = shmgrpc.aio.server(options=OPTIONS)
    quickstart_pb2_grpc.add_EchoServicer_to_server(AioEcho(), server)
    server.add_insecure_port(target)
    await server.start()
    as_grpc: grpc.aio.Server = server
    print(as_grpc, server.shmgrpc.stats()["offloaded"]["bytes"])
    return server


async def aio_client(target: str) -> bytes:
    async with shmgrpc.aio.insecure_channel(target, OPTIONS) as channel:
        as_grpc: grpc.aio.Channel = channel
        stub = quickstart_pb2_grpc.EchoStub(as_grpc)
        reply = await stub.Echo(quickstart_pb2.Blob(data=b"y" * (8 << 20)), timeout=30)
        print(shmgrpc.channel_status(channel).reason, channel.stats()["notes"])
        return reply.data


async def aio_main() -> int:
    server = await aio_serve(TARGET)
    try:
        return len(await aio_client(TARGET))
    finally:
        await server.stop(None)
        server.shmgrpc.close()


def main() -> int:
    server = serve(TARGET)
    try:
        data, transport = client(TARGET)
    except shmgrpc.ConfigError as err:
        print(err)
        return 2
    finally:
        server.stop(None)
        server.shmgrpc.close()
    total: int = shmgrpc.stats()["offloaded"]["count"]
    print(len(data), transport, total, shmgrpc.__version__)
    return asyncio.run(aio_main())
'''

# Each line a wrong use of something the program above uses rightly; mypy
# must report every one, with this code, and nothing else.
WRONG = {
    "    as_aio: grpc.aio.Channel = shmgrpc.insecure_channel(target)": "assignment",
    "    as_sync: grpc.Server = shmgrpc.aio.server()": "assignment",
    '    count: str = shmgrpc.stats()["offloaded"]["count"]': "assignment",
    "    data: int = echo_stub(shmgrpc.insecure_channel(target)).Echo(quickstart_pb2.Blob()).data": "assignment",
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mypy-cache")


def mypy(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--show-error-codes", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=180)


def check_program(source: str, tmp_path: Path, cache: Path) -> subprocess.CompletedProcess:
    missing = [str(p.relative_to(ROOT)) for p in STUBS if not p.is_file()]
    assert not missing, f"{missing} not generated: `make` makes them (mypy-protobuf, a dev dependency)"
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\n"
        "strict = True\n"
        f"mypy_path = {ROOT}\n"
        f"cache_dir = {cache / 'strict'}\n"
        "[mypy-shmgrpc.*]\n"
        "follow_imports = silent\n"
    )
    program = tmp_path / "user_program.py"
    program.write_text(source)
    return mypy("--config-file", str(config), str(program), cwd=tmp_path)


def test_package_is_clean(cache):
    done = mypy("--cache-dir", str(cache / "package"), "-p", "shmgrpc", cwd=ROOT)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_user_program_passes_strict(tmp_path, cache):
    done = check_program(USER_PROGRAM, tmp_path, cache)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_wrong_uses_are_reported(tmp_path, cache):
    """The negative control: the check above can fail."""
    source = USER_PROGRAM + "\n\ndef wrong(target: str) -> None:\n" + "\n".join(WRONG) + "\n"
    done = check_program(source, tmp_path, cache)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = source.splitlines()
    reported = {}
    for match in re.finditer(r"^user_program\.py:(\d+): error: .*\[([a-z-]+)\]$", done.stdout, re.MULTILINE):
        reported[lines[int(match.group(1)) - 1]] = match.group(2)
    assert reported == WRONG, done.stdout
