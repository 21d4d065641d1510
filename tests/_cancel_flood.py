"""A measurement, not a test: what the revocation quarantine costs a client
whose large requests end unread (DESIGN 4c).

    python -m tests._cancel_flood [--quarantine 1,0.1,0] [--rounds 2] [--api sync,aio]

A shmgrpc server (memfd, one worker thread) reads a request every 30 ms;
the client sends 8 MiB requests from six threads (or six grpc.aio tasks)
with a 20 ms deadline for four seconds, so nearly every call ends before
its request is read, and each such request's slot is revoked. The client
process sets transports._pool.QUARANTINE_SECONDS before its first call.
Per run: the calls made, how many requests went inline and why, and the
peak of the client's pool in use. Quarantines and APIs interleave per round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc

OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
SIZE = 8 << 20
DEADLINE = 0.02
SENDERS = 6
SECONDS = 4.0
METHOD = "/flood.Flood/Echo"


def serve(sock: str) -> None:
    import shmgrpc

    def echo(request, context):
        time.sleep(0.03)
        return b"ok"

    handler = grpc.method_handlers_generic_handler("flood.Flood", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = shmgrpc.server(futures.ThreadPoolExecutor(1), options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("unix:" + sock)
    server.start()
    print("READY", flush=True)
    sys.stdin.read()
    server.stop(None)


def client(sock: str, quarantine: float, api: str) -> dict:
    import shmgrpc
    import shmgrpc.aio
    from shmgrpc.transports import _pool

    _pool.QUARANTINE_SECONDS = quarantine
    payload = os.urandom(SIZE)
    codes: dict = {}
    peak = [0]

    def count(code: str) -> None:
        codes[code] = codes.get(code, 0) + 1

    if api == "sync":
        channel = shmgrpc.insecure_channel("unix:" + sock, options=OPTIONS)
        call = channel.unary_unary(METHOD)
        call(b"x" * (256 << 10), timeout=10)  # the route
        stop = time.monotonic() + SECONDS

        def send() -> None:
            while time.monotonic() < stop:
                try:
                    call(payload, timeout=DEADLINE)
                    count("OK")
                except grpc.RpcError as err:
                    count(err.code().name)

        threads = [threading.Thread(target=send) for _ in range(SENDERS)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak[0] = max(peak[0], channel.stats()["pool"]["bytes_in_use"])
            time.sleep(0.01)
        stats = channel.stats()
        channel.close()
    else:
        async def run() -> dict:
            channel = shmgrpc.aio.insecure_channel("unix:" + sock, options=OPTIONS)
            call = channel.unary_unary(METHOD)
            await call(b"x" * (256 << 10), timeout=10)
            stop = time.monotonic() + SECONDS

            async def send() -> None:
                while time.monotonic() < stop:
                    try:
                        await call(payload, timeout=DEADLINE)
                        count("OK")
                    except grpc.RpcError as err:
                        count(err.code().name)

            async def watch() -> None:
                while time.monotonic() < stop:
                    peak[0] = max(peak[0], channel.stats()["pool"]["bytes_in_use"])
                    await asyncio.sleep(0.01)

            await asyncio.gather(watch(), *(send() for _ in range(SENDERS)))
            stats = channel.stats()
            await channel.close()
            return stats

        stats = asyncio.run(run())
    return {"calls": sum(codes.values()), "codes": codes, "offloaded": stats["offloaded"]["count"],
            "inline": stats["inline"]["count"], "fallbacks": stats["fallbacks"], "peak_mib": peak[0] >> 20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quarantine", default="1,0.1,0", help="seconds, comma-separated (default 1,0.1,0)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--api", default="sync,aio", help="the client's API: sync, aio or both (default)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if args.client:
        print(json.dumps(client(args.client[0], float(args.client[1]), args.client[2])))
        return 0

    from shmgrpc.tools._table import format_table

    env = dict(os.environ, SHMGRPC_TRANSPORT="memfd")
    me = [sys.executable, "-m", "tests._cancel_flood"]
    rows = [["api", "quarantine s", "calls", "offloaded", "inline", "why inline", "peak in use MiB"]]
    with tempfile.TemporaryDirectory(prefix="shmgrpc-flood-") as tmp:
        sock = os.path.join(tmp, "s.sock")
        server = subprocess.Popen([*me, "--serve", sock], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env)
        try:
            assert server.stdout.readline().startswith("READY"), "the flood server did not start"
            for _ in range(args.rounds):
                for api in args.api.split(","):
                    for q in args.quarantine.split(","):
                        out = subprocess.run([*me, "--client", sock, q, api], capture_output=True, text=True,
                                             env=env, check=True)
                        r = json.loads(out.stdout.splitlines()[-1])
                        why = ", ".join(f"{k} {v}" for k, v in r["fallbacks"].items()) or "-"
                        rows.append([api, q, str(r["calls"]), str(r["offloaded"]), str(r["inline"]), why,
                                     str(r["peak_mib"])])
                        print(f"{api} quarantine {q}: {r}", file=sys.stderr, flush=True)
        finally:
            server.stdin.close()
            server.wait(10)
    print("\n".join(format_table(rows, align="<>>>><")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
