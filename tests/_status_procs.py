"""Child processes of tests/test_status.py.

    python -m tests._status_procs ROLE SPEC_JSON

Each role prints one JSON object as its last stdout line; the test asserts
on it. Nothing here is a test.

    client     a sync or aio shmgrpc channel (spec "api") to spec "target"
               with SHMGRPC_* from the environment: one call to learn the
               route, then spec "calls" unary echoes of spec "size" bytes.
               Prints its ChannelStatus (fields, per-direction data, str),
               what logger "shmgrpc" said at INFO and above, and the
               server's Stats (through a plain channel).
    small_shm  run inside `unshare -m`: a tmpfs of spec "size" on /dev/shm,
               an echo server (sync or aio, spec "api") and the client role
               in this very process, both SHMGRPC_TRANSPORT=shm. Prints the
               client's output and the server's stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional


def _status_json(st: Any) -> Dict[str, Any]:
    return {"transport": st.transport, "transports": list(st.transports), "reason": st.reason,
            "settled": st.settled, "sent": st.sent.to_json(), "received": st.received.to_json(), "str": str(st)}


def client(spec: dict) -> dict:
    import grpc

    import shmgrpc
    import shmgrpc.aio
    from protos import echo_test_pb2 as pb
    from protos import echo_test_pb2_grpc as pb_grpc
    from tests.echo_server import GRPC_OPTIONS, pattern

    records: List[Dict[str, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append({"level": record.levelname, "name": record.name, "message": record.getMessage()})

    logger = logging.getLogger("shmgrpc")
    logger.addHandler(Keep(logging.INFO))
    logger.setLevel(logging.INFO)
    options = GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
    target, size, calls = spec["target"], spec["size"], spec["calls"]
    out: Dict[str, Any] = {"pid": os.getpid()}

    def check(reply: Any, seq: int) -> None:
        assert reply.body == pattern(size, seq) and reply.seq == seq, f"call {seq}: wrong answer"

    if spec["api"] == "aio":

        async def run() -> None:
            async with shmgrpc.aio.insecure_channel(target, options) as channel:
                stub = pb_grpc.EchoStub(channel)
                for seq in range(calls + 1):  # the first learns the route: inline
                    check(await stub.Unary(pb.Payload(seq=seq, body=pattern(size, seq)), timeout=60), seq)
                out["status"] = _status_json(shmgrpc.channel_status(channel))
                out["stats"] = channel.stats()

        asyncio.run(run())
    else:
        with shmgrpc.insecure_channel(target, options) as channel:
            stub = pb_grpc.EchoStub(channel)
            for seq in range(calls + 1):
                check(stub.Unary(pb.Payload(seq=seq, body=pattern(size, seq)), timeout=60), seq)
            out["status"] = _status_json(shmgrpc.channel_status(channel))
            out["stats"] = channel.stats()
    plain = grpc.insecure_channel(target, options=GRPC_OPTIONS)
    try:
        out["server"] = json.loads(pb_grpc.EchoStub(plain).Stats(pb.Control(), timeout=60).note)
    finally:
        plain.close()
    out["log"] = records
    return out


def small_shm(spec: dict) -> dict:
    from tests.echo_server import READY

    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spec['size']},mode=1777", "tmpfs", "/dev/shm"],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        return {"skip": f"cannot mount a tmpfs on /dev/shm here: {mounted.stderr.strip()}"}
    work = tempfile.mkdtemp(prefix="status-")
    sock = os.path.join(work, "echo.sock")
    os.environ.update(spec["env"])
    with open(os.path.join(work, "server.err"), "w+b") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.echo_server", "--listen", f"unix:{sock}", "--parent", str(os.getpid()),
             *(["--aio"] if spec["api"] == "aio" else [])],
            stdout=subprocess.PIPE, stderr=err,
        )
        try:
            line = server.stdout.readline().decode()
            assert line.startswith(READY), line
            out = client({"target": f"unix:{sock}", "api": spec["api"], "size": spec["message"],
                          "calls": spec["calls"]})
            out["server_pid"] = json.loads(line[len(READY):])["pid"]
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            err.seek(0)
            out_err = err.read().decode("utf-8", "replace")
    out["server_stderr"] = out_err
    return out


ROLES = {"client": client, "small_shm": small_shm}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    role, spec = argv[0], json.loads(argv[1])
    print(json.dumps(ROLES[role](spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
