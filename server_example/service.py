"""BlobStore servicers, sync and asyncio side by side; the rules are in store.py.

Nothing here knows about shmgrpc: the server it installed itself in restores
large requests before these methods see them and offloads large replies after
they return.
"""

from __future__ import annotations

import asyncio
import os
from typing import Callable

from protos import blobstore_pb2, blobstore_pb2_grpc

from . import memory
from .store import Assembler, RequestError, Store, chunks


def status_reply(store: Store, request: blobstore_pb2.StatusRequest, offload: Callable[[], str]):
    blobs, size = store.counts()
    # Read the peak first: the reply reports the peak up to now, then the reset
    # starts the next measurement.
    hwm = memory.peak_rss() or 0
    reset = memory.reset_peak() if request.reset_peak else False
    return blobstore_pb2.StatusReply(
        pid=os.getpid(),
        blobs=blobs,
        bytes=size,
        offload=offload(),
        vm_hwm=hwm,
        vm_rss=memory.current_rss() or 0,
        peak_reset=reset,
    )


class BlobStoreServicer(blobstore_pb2_grpc.BlobStoreServicer):
    def __init__(self, store: Store, offload: Callable[[], str]) -> None:
        self._store = store
        self._offload = offload

    def Put(self, request, context):
        try:
            return self._store.put(request.key, request.data, request.labels)
        except RequestError as error:
            context.abort(error.code, str(error))

    def Get(self, request, context):
        try:
            stored = self._store.get(request.key)
        except RequestError as error:
            context.abort(error.code, str(error))
        return blobstore_pb2.Blob(key=request.key, data=stored.data, labels=stored.labels)

    def Echo(self, request, context):
        return request

    def Upload(self, request_iterator, context):
        assembler = Assembler()
        try:
            for chunk in request_iterator:
                assembler.add(chunk)
            return self._store.put(assembler.key, assembler.data(), {})
        except RequestError as error:
            context.abort(error.code, str(error))

    def Download(self, request, context):
        # A plain function returning a generator, so an unknown key aborts
        # before the stream starts rather than on the first next().
        try:
            stored = self._store.get(request.key)
        except RequestError as error:
            context.abort(error.code, str(error))
        return chunks(request.key, stored.data, request.chunk_size)

    def Status(self, request, context):
        return status_reply(self._store, request, self._offload)


class AioBlobStoreServicer(blobstore_pb2_grpc.BlobStoreServicer):
    """The same service for grpc.aio; slow CPU work (hashing, joining chunks)
    runs in a thread so one large Put does not stall every other call."""

    def __init__(self, store: Store, offload: Callable[[], str]) -> None:
        self._store = store
        self._offload = offload

    async def Put(self, request, context):
        try:
            return await asyncio.to_thread(self._store.put, request.key, request.data, request.labels)
        except RequestError as error:
            await context.abort(error.code, str(error))

    async def Get(self, request, context):
        try:
            stored = self._store.get(request.key)
        except RequestError as error:
            await context.abort(error.code, str(error))
        return blobstore_pb2.Blob(key=request.key, data=stored.data, labels=stored.labels)

    async def Echo(self, request, context):
        return request

    async def Upload(self, request_iterator, context):
        assembler = Assembler()
        try:
            async for chunk in request_iterator:
                assembler.add(chunk)
            data = await asyncio.to_thread(assembler.data)
            return await asyncio.to_thread(self._store.put, assembler.key, data, {})
        except RequestError as error:
            await context.abort(error.code, str(error))

    async def Download(self, request, context):
        try:
            stored = self._store.get(request.key)
        except RequestError as error:
            await context.abort(error.code, str(error))
        for chunk in chunks(request.key, stored.data, request.chunk_size):
            yield chunk

    async def Status(self, request, context):
        return status_reply(self._store, request, self._offload)
