"""The blob store behind the demo service: no gRPC here, only bytes and keys,
so the sync and the asyncio servicer share every rule."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from typing import Dict, Iterator, Mapping, Tuple

import grpc

from protos import blobstore_pb2

DEFAULT_CHUNK_SIZE = 1024 * 1024  # Download's chunk size when the request says 0


class RequestError(ValueError):
    """A request the store refuses; `code` is the gRPC status to answer with."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RequestError, KeyError):
    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


@dataclasses.dataclass(frozen=True)
class Stored:
    data: bytes
    labels: Mapping[str, str]
    sha256: str


class Store:
    """Blobs by key, in memory. Safe to call from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _blobs and _bytes together
        self._blobs: Dict[str, Stored] = {}
        self._bytes = 0

    def put(self, key: str, data: bytes, labels: Mapping[str, str]) -> blobstore_pb2.PutReply:
        if not key:
            raise RequestError("a blob needs a non-empty key")
        # Hash outside the lock: it is the slow part, and hashlib releases the GIL.
        stored = Stored(data=data, labels=dict(labels), sha256=hashlib.sha256(data).hexdigest())
        with self._lock:
            old = self._blobs.get(key)
            self._blobs[key] = stored
            self._bytes += len(data) - (len(old.data) if old else 0)
        return blobstore_pb2.PutReply(key=key, size=len(data), sha256=stored.sha256)

    def get(self, key: str) -> Stored:
        with self._lock:
            stored = self._blobs.get(key)
        if stored is None:
            raise NotFound(f"no blob with key {key!r}")
        return stored

    def counts(self) -> Tuple[int, int]:
        """(number of blobs, bytes of blob data)."""
        with self._lock:
            return len(self._blobs), self._bytes


class Assembler:
    """Collects Upload's chunks: in order, contiguous, all for one key."""

    def __init__(self) -> None:
        self.key = ""
        self._parts = []
        self._size = 0

    def add(self, chunk: blobstore_pb2.BlobChunk) -> None:
        if not self.key:
            self.key = chunk.key
        elif chunk.key and chunk.key != self.key:
            raise RequestError(f"chunk for key {chunk.key!r} in an upload of {self.key!r}")
        if chunk.offset != self._size:
            raise RequestError(
                f"chunk at offset {chunk.offset}, expected {self._size}: chunks must arrive in order"
            )
        self._parts.append(chunk.data)
        self._size += len(chunk.data)

    def data(self) -> bytes:
        return b"".join(self._parts)


def chunks(key: str, data: bytes, chunk_size: int) -> Iterator[blobstore_pb2.BlobChunk]:
    """Download's stream: `data` cut into pieces of `chunk_size` (0: default)."""
    size = chunk_size or DEFAULT_CHUNK_SIZE
    view = memoryview(data)
    for offset in range(0, len(data), size):
        yield blobstore_pb2.BlobChunk(key=key, offset=offset, data=bytes(view[offset : offset + size]))
