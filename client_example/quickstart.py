"""The README's Quickstart client: python -m client_example.quickstart unix:///tmp/quickstart.sock"""

import sys

import shmgrpc
from protos import quickstart_pb2, quickstart_pb2_grpc

# The server's size options, given to shmgrpc too (gRPC's default limit is 4 MiB).
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def main(target: str) -> None:
    with shmgrpc.insecure_channel(target, OPTIONS) as channel:
        stub = quickstart_pb2_grpc.EchoStub(channel)
        data = b"x" * (8 << 20)  # 8 MiB, well above the 128 KiB threshold
        # The channel's first large call goes inline and brings back the
        # server's route in its trailers; the next ones are offloaded.
        for _ in range(2):
            reply = stub.Echo(quickstart_pb2.Blob(data=data), timeout=30)
            assert reply.data == data
        print(shmgrpc.channel_status(channel))
        stats = channel.stats()
        print(f"client: {stats['offloaded']['count']} requests offloaded, "
              f"{stats['restored']['count']} responses restored")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "unix:///tmp/quickstart.sock")
