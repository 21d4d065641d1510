"""The demo BlobStore server: `python -m server_example --help`.

It always installs shmgrpc's server interceptor; co-located clients that use
shmgrpc's client interceptor get large messages through shared memory, every
other client is served by plain gRPC on the same port.
"""
