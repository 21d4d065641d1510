"""The README's Quickstart server: python -m server_example.quickstart unix:///tmp/quickstart.sock"""

import signal
import sys
from concurrent import futures

import shmgrpc
from protos import quickstart_pb2, quickstart_pb2_grpc

# Messages above gRPC's default 4 MiB need its size options, given to shmgrpc too.
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class Echo(quickstart_pb2_grpc.EchoServicer):
    def Echo(self, request, context):
        return quickstart_pb2.Blob(data=request.data)


def main(target: str) -> None:
    server = shmgrpc.server(futures.ThreadPoolExecutor(4), options=OPTIONS)
    quickstart_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    server.add_insecure_port(target)
    server.start()
    print("serving on", target, flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop cleanly: shared memory is let go
        signal.signal(sig, lambda *_: server.stop(5))
    server.wait_for_termination()
    stats = server.shmgrpc.stats()
    print(f"server: {stats['restored']['count']} requests restored, "
          f"{stats['offloaded']['count']} responses offloaded", flush=True)
    server.shmgrpc.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "unix:///tmp/quickstart.sock")
