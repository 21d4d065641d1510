"""The demo BlobStore server: `python -m server_example --help`.

It is always built with shmgrpc.server() (shmgrpc.aio.server() with --aio);
co-located clients whose channel shmgrpc wraps get large messages through
shared memory, every other client is served by plain gRPC on the same port.
"""
