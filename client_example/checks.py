"""Put/Get, Upload/Download and Status once each: the rest of the service,
checked for correctness (not timed)."""

from __future__ import annotations

import hashlib
import os
from typing import Tuple

import grpc

from protos import blobstore_pb2

from .channels import Mode
from .errors import Failure, rpc_failure
from .table import format_size

MiB = 1024 * 1024
BLOB_SIZE = 3 * MiB + 12345  # not a multiple of either chunk size: the last chunk is short
UPLOAD_CHUNK = 1 * MiB
DOWNLOAD_CHUNK = 512 * 1024
TIMEOUT = 60.0


def run_checks(mode: Mode) -> Tuple[str, str]:
    """Lines describing what was checked, and the server's shmgrpc summary
    (the last of them); raises Failure on any mismatch."""
    try:
        put_get = _put_get(mode)
        upload_download = _upload_download(mode)
        status = mode.stub.Status(blobstore_pb2.StatusRequest(), timeout=TIMEOUT)
    except grpc.RpcError as error:
        raise rpc_failure(f"checks over {mode.name}", error) from None
    if status.blobs < 2 or status.pid <= 0:
        raise Failure(f"Status reports pid {status.pid} and {status.blobs} blobs after two stores")
    return (
        f"checks over {mode.name}: {put_get}, {upload_download}, "
        f"Status ok (server pid {status.pid}, {status.blobs} blobs, {format_size(status.bytes)})\n"
        f"server shmgrpc: {status.offload}"
    ), status.offload


def _put_get(mode: Mode) -> str:
    data = os.urandom(BLOB_SIZE)
    digest = hashlib.sha256(data).hexdigest()
    labels = {"kind": "check", "size": str(len(data))}
    reply = mode.stub.Put(blobstore_pb2.Blob(key="check/put", data=data, labels=labels), timeout=TIMEOUT)
    if (reply.key, reply.size, reply.sha256) != ("check/put", len(data), digest):
        raise Failure(
            f"Put replied {reply.key!r}, {reply.size} bytes, sha256 {reply.sha256[:16]}; expected "
            f"'check/put', {len(data)} bytes, sha256 {digest[:16]}"
        )
    blob = mode.stub.Get(blobstore_pb2.GetRequest(key="check/put"), timeout=TIMEOUT)
    if blob.data != data or dict(blob.labels) != labels:
        raise Failure(
            f"Get returned {len(blob.data)} bytes, sha256 {hashlib.sha256(blob.data).hexdigest()[:16]}, "
            f"labels {dict(blob.labels)}; Put stored {len(data)} bytes, sha256 {digest[:16]}, labels {labels}"
        )
    try:
        mode.stub.Get(blobstore_pb2.GetRequest(key="check/missing"), timeout=TIMEOUT)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
    else:
        raise Failure("Get of a key never stored succeeded; expected NOT_FOUND")
    return f"Put/Get {format_size(len(data))} ok"


def _upload_download(mode: Mode) -> str:
    data = os.urandom(BLOB_SIZE)
    digest = hashlib.sha256(data).hexdigest()
    chunks = [
        blobstore_pb2.BlobChunk(key="check/upload", offset=offset, data=data[offset : offset + UPLOAD_CHUNK])
        for offset in range(0, len(data), UPLOAD_CHUNK)
    ]
    reply = mode.stub.Upload(iter(chunks), timeout=TIMEOUT)
    if (reply.size, reply.sha256) != (len(data), digest):
        raise Failure(
            f"Upload stored {reply.size} bytes, sha256 {reply.sha256[:16]}; "
            f"sent {len(data)} bytes, sha256 {digest[:16]}"
        )
    received = []
    offset = 0
    for chunk in mode.stub.Download(
        blobstore_pb2.GetRequest(key="check/upload", chunk_size=DOWNLOAD_CHUNK), timeout=TIMEOUT
    ):
        if chunk.offset != offset or len(chunk.data) > DOWNLOAD_CHUNK:
            raise Failure(
                f"Download sent {len(chunk.data)} bytes at offset {chunk.offset}; "
                f"expected at most {DOWNLOAD_CHUNK} at offset {offset}"
            )
        received.append(chunk.data)
        offset += len(chunk.data)
    if b"".join(received) != data:
        raise Failure(f"Download returned {offset} bytes that differ from the {len(data)} uploaded")
    return f"Upload/Download {format_size(len(data))} ok " f"({len(chunks)} chunks up, {len(received)} down)"
