"""The differential suite's server process.

    python -m tests.diff_server '{"kind": "sync"|"aio", "mode": "plain"|"shmgrpc",
                                  "dir": DIR, "parent": PID}'

One process hosts four gRPC servers ("sites"), each on its own unix socket in
DIR, all serving the same handlers:

    main   interceptors [log], default options (also on 127.0.0.1, for the
           test's byte-counting proxy)
    auth   interceptors [auth, log]: auth rejects calls without
           `authorization: Bearer x` (UNAUTHENTICATED), in the style of
           grpc's own header-validator example
    small  interceptors [log], grpc.max_receive_message_length 1 MiB
    big    interceptors [log], max send and receive 64 MiB

and one plain gRPC server of the same kind ("control", never shmgrpc) that
the test asks what the others saw (Take) and for shmgrpc's counters (Stats).

mode "plain": grpc.server / grpc.aio.server; shmgrpc is never imported.
mode "shmgrpc": shmgrpc.server / shmgrpc.aio.server with the same arguments,
configured from the SHMGRPC_* environment (the test sets transport and
threshold there); the user's interceptors end up outside shmgrpc's.

Handlers:
    Echo (generated stubs, protos/echo_test.proto)
        Unary         echo, body replaced by blob(reply_size) when set;
                      note "fail": INVALID_ARGUMENT
        ServerStream  `seq` answers; note "fail-after-1": one answer, then INVALID_ARGUMENT
        ClientStream  summary (count, total body bytes, a fingerprint per message)
        BidiStream    echo each; a message with note "fail": INVALID_ARGUMENT
    diff.Codec (generic handler, the application's own serializers)
        Json / JsonBidi   dict <-> JSON bytes
        Raw / RawBidi     no serializers at all: bytes in, the same bytes out
        Dict              tests._diff.dict_encode / dict_decode
    diff.Flaky/Unary  Payload; the first attempt of each (call id, seq) fails
                      with UNAVAILABLE, later attempts echo

Everything a handler or interceptor is handed is described (type, digest,
metadata keys) and filed under the call's x-diff-rid metadata value.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Any, Callable, Dict, Iterable, List, Optional

import grpc

from protos import echo_test_pb2 as pb
from protos import echo_test_pb2_grpc as pb_grpc
from tests._diff import (
    AUTH_KEY,
    AUTH_VALUE,
    CODEC_SERVICE,
    CONTROL_SERVICE,
    ECHO_SERVICE,
    FLAKY_SERVICE,
    MiB,
    RID_KEY,
    SERVER_READY,
    blob,
    describe,
    dict_decode,
    dict_encode,
    json_decode,
    json_encode,
    metadata_keys,
    metadata_value,
    text,
)

SITES = {
    "main": {"interceptors": ["log"], "options": None},
    "auth": {"interceptors": ["auth", "log"], "options": None},
    "small": {"interceptors": ["log"], "options": [("grpc.max_receive_message_length", 1 * MiB)]},
    "big": {
        "interceptors": ["log"],
        "options": [("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)],
    },
}
TAKE_WAIT = 3.0  # seconds Take waits for the calls it reports on to finish


# --- what was seen, by call id ----------------------------------------------------


class Recorder:
    """Events by rid. Every mutation holds the lock, so Take can serialize
    an event while its call is still running."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: List[tuple] = []  # (rid, category, event)
        self.active: Dict[str, int] = collections.Counter()
        self.unattributed: Dict[str, int] = collections.Counter()  # method -> calls without a rid

    def event(self, category: str, metadata, **fields) -> Optional[dict]:
        rid = metadata_value(metadata, RID_KEY)
        if rid is None:
            with self.lock:
                self.unattributed[f"{category} {fields.get('method')}"] += 1
            return None
        ev = {"metadata": metadata_keys(metadata), **fields}
        with self.lock:
            self.events.append((rid, category, ev))
        return {"rid": rid, "ev": ev}

    def append(self, handle: Optional[dict], key: str, value: Any) -> None:
        if handle is not None:
            with self.lock:
                handle["ev"][key].append(value)

    def set(self, handle: Optional[dict], key: str, value: Any) -> None:
        if handle is not None:
            with self.lock:
                handle["ev"][key] = value

    def begin(self, handle: Optional[dict]) -> None:
        if handle is not None:
            with self.lock:
                self.active[handle["rid"]] += 1

    def end(self, handle: Optional[dict]) -> None:
        if handle is not None:
            with self.lock:
                self.active[handle["rid"]] -= 1

    def busy(self, prefix: str) -> bool:
        return any(n > 0 for rid, n in self.active.items() if rid.startswith(prefix))

    def take(self, prefix: str) -> bytes:
        """Events whose rid starts with `prefix`, removed; JSON."""
        with self.lock:
            taken = [e for e in self.events if e[0].startswith(prefix)]
            self.events = [e for e in self.events if not e[0].startswith(prefix)]
            for rid in [r for r in self.active if r.startswith(prefix)]:
                del self.active[rid]
            body = json.dumps(
                {"events": [{"rid": r, "category": c, "event": e} for r, c, e in taken]}, default=str
            )
        return body.encode()


REC = Recorder()


# --- the handlers' logic, whatever the server kind ------------------------------------


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


def reply_for(request: pb.Payload, seq: Optional[int] = None) -> pb.Payload:
    response = pb.Payload()
    response.CopyFrom(request)
    response.body_len_seen = len(request.body)
    if seq is not None:
        response.seq = seq
    if request.reply_size:
        response.body = blob(request.reply_size, 1000 + response.seq)
        response.digest = hashlib.sha256(response.body).digest()
    return response


def summary(seen: List[pb.Payload]) -> pb.Payload:
    response = pb.Payload(seq=len(seen), body_len_seen=sum(len(m.body) for m in seen))
    for message in seen:
        response.items.add(
            data=hashlib.sha256(message.SerializeToString(deterministic=True)).digest(),
            numbers=[message.seq, len(message.body)],
        )
    if seen and seen[0].reply_size:
        response.body = blob(seen[0].reply_size, 2000)
    return response


class Logic:
    """One method: its shape, its codec, and what it answers.
    on_request / on_end return iterables of responses (generators may raise
    Abort after yielding some)."""

    request_streaming = False
    response_streaming = False
    request_deserializer: Optional[Callable] = None
    response_serializer: Optional[Callable] = None

    def __init__(self, name: str):
        self.name = name

    def on_request(self, call: dict, request) -> Iterable:
        return [self.answer(call, request)]

    def on_end(self, call: dict) -> Iterable:
        return []

    def answer(self, call, request):  # unary-response methods
        raise NotImplementedError


class EchoUnary(Logic):
    def answer(self, call, request):
        if request.note == "fail":
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"diff: asked to fail (seq {request.seq})")
        return reply_for(request)


class EchoServerStream(Logic):
    response_streaming = True

    def on_request(self, call, request):
        for i in range(request.seq):
            if request.note == "fail-after-1" and i == 1:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "diff: failing after one answer")
            yield reply_for(request, seq=i)


class EchoClientStream(Logic):
    request_streaming = True

    def on_request(self, call, request):
        call.setdefault("seen", []).append(request)
        return []

    def on_end(self, call):
        return [summary(call.get("seen", []))]


class EchoBidi(Logic):
    request_streaming = True
    response_streaming = True

    def on_request(self, call, request):
        if request.note == "fail":
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"diff: asked to fail (seq {request.seq})")
        return [reply_for(request)]


class JsonEcho(Logic):
    request_deserializer = staticmethod(json_decode)
    response_serializer = staticmethod(json_encode)

    def answer(self, call, request):
        reply = request.get("reply") or 0
        return {
            "tag": request.get("tag"),
            "len": len(request.get("blob", "")),
            "echo": text(reply, 3) if reply else request.get("blob", ""),
            "type": type(request).__name__,
        }


class JsonBidi(JsonEcho):
    request_streaming = True
    response_streaming = True


class RawEcho(Logic):
    def answer(self, call, request):
        if not isinstance(request, (bytes, bytearray)):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"diff: raw method got {type(request).__name__}")
        return bytes(request)


class RawBidi(RawEcho):
    request_streaming = True
    response_streaming = True


class DictEcho(Logic):
    request_deserializer = staticmethod(dict_decode)
    response_serializer = staticmethod(dict_encode)

    def answer(self, call, request):
        reply = int(request.get("reply", b"0") or b"0")
        body = request.get("blob", b"")
        return {"tag": request.get("tag", b""), "len": str(len(body)).encode(),
                "echo": blob(reply, 4) if reply else body}


class Flaky(Logic):
    request_deserializer = staticmethod(pb.Payload.FromString)
    response_serializer = staticmethod(pb.Payload.SerializeToString)
    attempts: Dict[tuple, int] = collections.Counter()
    lock = threading.Lock()

    def answer(self, call, request):
        key = (call["rid"], request.seq)
        with self.lock:
            self.attempts[key] += 1
            attempt = self.attempts[key]
        REC.set(call["handle"], "attempt", attempt)
        if attempt == 1:
            raise Abort(grpc.StatusCode.UNAVAILABLE, f"diff: flaky, first attempt of seq {request.seq} fails")
        return reply_for(request)


ECHO = {
    "Unary": EchoUnary("Unary"),
    "ServerStream": EchoServerStream("ServerStream"),
    "ClientStream": EchoClientStream("ClientStream"),
    "BidiStream": EchoBidi("BidiStream"),
}
CODEC = {
    "Json": JsonEcho("Json"),
    "JsonBidi": JsonBidi("JsonBidi"),
    "Raw": RawEcho("Raw"),
    "RawBidi": RawBidi("RawBidi"),
    "Dict": DictEcho("Dict"),
}
FLAKY = {"Unary": Flaky("Unary")}


def _start_call(site: str, service: str, logic: Logic, context) -> dict:
    metadata = context.invocation_metadata()
    handle = REC.event(
        "app",
        metadata,
        site=site,
        method=f"/{service}/{logic.name}",
        auth=metadata_value(metadata, AUTH_KEY),
        requests=[],
        attempt=None,
        outcome="running",
    )
    REC.begin(handle)
    return {"handle": handle, "rid": metadata_value(metadata, RID_KEY)}


def _see(call: dict, request) -> None:
    REC.append(call["handle"], "requests", describe(request))


_FACTORY = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


# --- sync adapters --------------------------------------------------------------------


def sync_behavior(site: str, service: str, logic: Logic) -> Callable:
    def responses(requests, context):
        call = _start_call(site, service, logic, context)
        try:
            for request in requests:
                _see(call, request)
                yield from logic.on_request(call, request)
            yield from logic.on_end(call)
            REC.set(call["handle"], "outcome", "ok")
        except Abort as err:
            REC.set(call["handle"], "outcome", f"abort {err.code.name}: {err.details}")
            context.abort(err.code, err.details)
        finally:
            REC.end(call["handle"])

    if logic.request_streaming and logic.response_streaming:
        return lambda request_iterator, context: responses(request_iterator, context)
    if logic.request_streaming:
        return lambda request_iterator, context: _one(responses(request_iterator, context))
    if logic.response_streaming:
        return lambda request, context: responses([request], context)
    return lambda request, context: _one(responses([request], context))


def _one(responses):
    out = list(responses)
    if len(out) != 1:
        raise RuntimeError(f"diff_server: a unary-response method produced {len(out)} responses")
    return out[0]


def sync_handler(site: str, service: str, logic: Logic):
    return _FACTORY[(logic.request_streaming, logic.response_streaming)](
        sync_behavior(site, service, logic),
        request_deserializer=logic.request_deserializer,
        response_serializer=logic.response_serializer,
    )


# --- aio adapters ---------------------------------------------------------------------


def aio_behavior(site: str, service: str, logic: Logic) -> Callable:
    async def responses(requests, context):
        call = _start_call(site, service, logic, context)
        abort = None
        try:
            if logic.request_streaming:
                async for request in requests:
                    _see(call, request)
                    for response in logic.on_request(call, request):
                        yield response
            else:
                _see(call, requests)
                for response in logic.on_request(call, requests):
                    yield response
            for response in logic.on_end(call):
                yield response
            REC.set(call["handle"], "outcome", "ok")
        except Abort as err:
            REC.set(call["handle"], "outcome", f"abort {err.code.name}: {err.details}")
            abort = err
        finally:
            REC.end(call["handle"])
        if abort is not None:
            await context.abort(abort.code, abort.details)

    async def collect(requests, context):
        out = [response async for response in responses(requests, context)]
        if len(out) != 1:
            raise RuntimeError(f"diff_server: a unary-response method produced {len(out)} responses")
        return out[0]

    if logic.response_streaming:

        async def stream(request_or_iterator, context):
            async for response in responses(request_or_iterator, context):
                yield response

        return stream

    async def unary(request_or_iterator, context):
        return await collect(request_or_iterator, context)

    return unary


def aio_handler(site: str, service: str, logic: Logic):
    return _FACTORY[(logic.request_streaming, logic.response_streaming)](
        aio_behavior(site, service, logic),
        request_deserializer=logic.request_deserializer,
        response_serializer=logic.response_serializer,
    )


# --- interceptors (the user's, placed outside shmgrpc) ----------------------------------


def validate(method: str, request) -> Optional[tuple]:
    """What a validating interceptor checks: Echo requests are Payloads whose
    digest, when set, is the SHA-256 of their body."""
    if not method.startswith(f"/{ECHO_SERVICE}/"):
        return None
    if not isinstance(request, pb.Payload):
        return grpc.StatusCode.INVALID_ARGUMENT, f"validator: expected a Payload, got {type(request).__name__}"
    if request.digest and hashlib.sha256(request.body).digest() != request.digest:
        return grpc.StatusCode.FAILED_PRECONDITION, f"validator: body of seq {request.seq} does not match its digest"
    return None


def _log_event(site: str, details) -> Optional[dict]:
    return REC.event(
        "interceptors",
        details.invocation_metadata,
        site=site,
        name="log",
        method=details.method,
        requests=[],
        responses=[],
    )


class SyncLog(grpc.ServerInterceptor):
    """Logs and validates every request and response object it is handed, by
    wrapping the behavior of the handler its continuation returns."""

    def __init__(self, site: str):
        self.site = site

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        handle = _log_event(self.site, handler_call_details)
        method = handler_call_details.method

        def see(request, context):
            REC.append(handle, "requests", describe(request))
            problem = validate(method, request)
            if problem is not None:
                context.abort(*problem)
            return request

        def see_all(requests, context):
            for request in requests:
                yield see(request, context)

        def answered(response):
            REC.append(handle, "responses", describe(response))
            return response

        def tracked(fn):
            def run(arg, context):
                REC.begin(handle)
                try:
                    return fn(arg, context)
                finally:
                    REC.end(handle)

            return run

        def tracked_stream(fn):
            def run(arg, context):
                REC.begin(handle)
                try:
                    yield from fn(arg, context)
                finally:
                    REC.end(handle)

            return run

        if handler.request_streaming and handler.response_streaming:
            inner = handler.stream_stream

            def behavior(requests, context):
                for response in inner(see_all(requests, context), context):
                    yield answered(response)

            behavior = tracked_stream(behavior)
        elif handler.request_streaming:
            inner = handler.stream_unary
            behavior = tracked(lambda requests, context: answered(inner(see_all(requests, context), context)))
        elif handler.response_streaming:
            inner = handler.unary_stream

            def behavior(request, context):
                for response in inner(see(request, context), context):
                    yield answered(response)

            behavior = tracked_stream(behavior)
        else:
            inner = handler.unary_unary
            behavior = tracked(lambda request, context: answered(inner(see(request, context), context)))
        return _FACTORY[(bool(handler.request_streaming), bool(handler.response_streaming))](
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _deny_sync(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "diff: missing bearer token")


class SyncAuth(grpc.ServerInterceptor):
    """grpc's header-validator example: a unary terminator for every call
    without the header."""

    def __init__(self, site: str):
        self.site = site
        self._deny = grpc.unary_unary_rpc_method_handler(_deny_sync)

    def intercept_service(self, continuation, handler_call_details):
        metadata = handler_call_details.invocation_metadata
        allowed = metadata_value(metadata, AUTH_KEY) == AUTH_VALUE
        REC.event("interceptors", metadata, site=self.site, name="auth", method=handler_call_details.method,
                  allowed=allowed)
        return continuation(handler_call_details) if allowed else self._deny


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


class AioLog(grpc.aio.ServerInterceptor):
    """SyncLog for grpc.aio: async behaviors around the continuation's handler."""

    def __init__(self, site: str):
        self.site = site

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        handle = _log_event(self.site, handler_call_details)
        method = handler_call_details.method

        async def see(request, context):
            REC.append(handle, "requests", describe(request))
            problem = validate(method, request)
            if problem is not None:
                await context.abort(*problem)
            return request

        async def see_all(requests, context):
            if hasattr(requests, "__aiter__"):
                async for request in requests:
                    yield await see(request, context)
            else:
                for request in requests:
                    yield await see(request, context)

        def answered(response):
            REC.append(handle, "responses", describe(response))
            return response

        async def stream_out(result):
            if hasattr(result, "__aiter__"):
                async for response in result:
                    yield answered(response)
            elif inspect.isawaitable(result):  # a handler that writes with context.write()
                await result
            else:
                for response in result:
                    yield answered(response)

        if handler.request_streaming and handler.response_streaming:
            inner = handler.stream_stream

            async def behavior(requests, context):
                REC.begin(handle)
                try:
                    async for response in stream_out(inner(see_all(requests, context), context)):
                        yield response
                finally:
                    REC.end(handle)

        elif handler.request_streaming:
            inner = handler.stream_unary

            async def behavior(requests, context):
                REC.begin(handle)
                try:
                    return answered(await _maybe_await(inner(see_all(requests, context), context)))
                finally:
                    REC.end(handle)

        elif handler.response_streaming:
            inner = handler.unary_stream

            async def behavior(request, context):
                REC.begin(handle)
                try:
                    async for response in stream_out(inner(await see(request, context), context)):
                        yield response
                finally:
                    REC.end(handle)

        else:
            inner = handler.unary_unary

            async def behavior(request, context):
                REC.begin(handle)
                try:
                    return answered(await _maybe_await(inner(await see(request, context), context)))
                finally:
                    REC.end(handle)

        return _FACTORY[(bool(handler.request_streaming), bool(handler.response_streaming))](
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def _deny_aio(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "diff: missing bearer token")


class AioAuth(grpc.aio.ServerInterceptor):
    def __init__(self, site: str):
        self.site = site
        self._deny = grpc.unary_unary_rpc_method_handler(_deny_aio)

    async def intercept_service(self, continuation, handler_call_details):
        metadata = handler_call_details.invocation_metadata
        allowed = metadata_value(metadata, AUTH_KEY) == AUTH_VALUE
        REC.event("interceptors", metadata, site=self.site, name="auth", method=handler_call_details.method,
                  allowed=allowed)
        return await continuation(handler_call_details) if allowed else self._deny


INTERCEPTORS = {"sync": {"log": SyncLog, "auth": SyncAuth}, "aio": {"log": AioLog, "auth": AioAuth}}


def add_handlers(server, site: str, kind: str) -> None:
    make = sync_handler if kind == "sync" else aio_handler
    servicer = pb_grpc.EchoServicer()
    for name, logic in ECHO.items():  # instance attributes: plain functions, called as servicer.Unary(request, context)
        setattr(servicer, name, make(site, ECHO_SERVICE, logic)._asdict()[_behavior_field(logic)])
    pb_grpc.add_EchoServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                CODEC_SERVICE, {name: make(site, CODEC_SERVICE, logic) for name, logic in CODEC.items()}
            ),
            grpc.method_handlers_generic_handler(
                FLAKY_SERVICE, {name: make(site, FLAKY_SERVICE, logic) for name, logic in FLAKY.items()}
            ),
        )
    )


def _behavior_field(logic: Logic) -> str:
    return {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[(logic.request_streaming, logic.response_streaming)]


# --- control --------------------------------------------------------------------------


def stats_json(mode: str) -> bytes:
    out = {"pid": os.getpid(), "shmgrpc_imported": "shmgrpc" in sys.modules, "unattributed": dict(REC.unattributed)}
    if mode == "shmgrpc":
        import shmgrpc

        out["stats"] = shmgrpc.stats()
    return json.dumps(out, default=str).encode()


def _take_sync(request: bytes, context) -> bytes:
    prefix = request.decode()
    deadline = time.monotonic() + TAKE_WAIT
    while REC.busy(prefix) and time.monotonic() < deadline:
        time.sleep(0.01)
    return REC.take(prefix)


async def _take_aio(request: bytes, context) -> bytes:
    prefix = request.decode()
    deadline = time.monotonic() + TAKE_WAIT
    while REC.busy(prefix) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return REC.take(prefix)


def control_handler(kind: str, mode: str):
    if kind == "sync":
        methods = {
            "Take": grpc.unary_unary_rpc_method_handler(_take_sync),
            "Stats": grpc.unary_unary_rpc_method_handler(lambda request, context: stats_json(mode)),
        }
    else:

        async def stats(request, context):
            return stats_json(mode)

        methods = {
            "Take": grpc.unary_unary_rpc_method_handler(_take_aio),
            "Stats": grpc.unary_unary_rpc_method_handler(stats),
        }
    return grpc.method_handlers_generic_handler(CONTROL_SERVICE, methods)


# --- serving --------------------------------------------------------------------------


def _address(spec: dict, site: str) -> str:
    return f"unix:{os.path.join(spec['dir'], site + '.sock')}"


def _bind(server, address: str) -> str:
    port = server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"diff_server: cannot listen on {address}")
    return address if address.startswith("unix:") else f"{address.rsplit(':', 1)[0]}:{port}"


def _bind_site(server, spec: dict, site: str, addresses: dict) -> None:
    addresses[site] = _bind(server, _address(spec, site))
    if site == "main":  # also on loopback TCP: the byte-counting proxy in the test forwards to it
        addresses["main_tcp"] = _bind(server, "127.0.0.1:0")


def serve_sync(spec: dict, stop: threading.Event, ready: Callable[[dict], None]) -> None:
    if spec["mode"] == "shmgrpc":
        import shmgrpc

        make_server = shmgrpc.server
    else:
        make_server = grpc.server
    servers, addresses = [], {}
    for site, conf in SITES.items():
        interceptors = [INTERCEPTORS["sync"][name](site) for name in conf["interceptors"]]
        server = make_server(
            futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix=site),
            interceptors=interceptors,
            options=conf["options"],
        )
        add_handlers(server, site, "sync")
        _bind_site(server, spec, site, addresses)
        servers.append(server)
    control = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="control"))
    control.add_generic_rpc_handlers((control_handler("sync", spec["mode"]),))
    addresses["control"] = _bind(control, _address(spec, "control"))
    for server in [*servers, control]:
        server.start()
    ready(addresses)
    while not stop.wait(0.5):
        pass
    for server in [*servers, control]:
        server.stop(0.5).wait()


def serve_aio(spec: dict, stop: threading.Event, ready: Callable[[dict], None]) -> None:
    asyncio.run(_serve_aio(spec, stop, ready))


async def _serve_aio(spec: dict, stop: threading.Event, ready: Callable[[dict], None]) -> None:
    if spec["mode"] == "shmgrpc":
        import shmgrpc.aio

        make_server = shmgrpc.aio.server
    else:
        make_server = grpc.aio.server
    servers, addresses = [], {}
    for site, conf in SITES.items():
        interceptors = [INTERCEPTORS["aio"][name](site) for name in conf["interceptors"]]
        server = make_server(interceptors=interceptors, options=conf["options"])
        add_handlers(server, site, "aio")
        _bind_site(server, spec, site, addresses)
        servers.append(server)
    control = grpc.aio.server()
    control.add_generic_rpc_handlers((control_handler("aio", spec["mode"]),))
    addresses["control"] = _bind(control, _address(spec, "control"))
    for server in [*servers, control]:
        await server.start()
    ready(addresses)
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for server in [*servers, control]:
        await server.stop(0.5)


def _watch_parent(parent: int, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        if os.getppid() != parent:
            stop.set()


def main() -> int:
    spec = json.loads(sys.argv[1])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if spec.get("parent"):
        threading.Thread(target=_watch_parent, args=(spec["parent"], stop), daemon=True).start()

    def ready(addresses: dict) -> None:
        line = {"pid": os.getpid(), "addresses": addresses, "shmgrpc_imported": "shmgrpc" in sys.modules}
        print(SERVER_READY + json.dumps(line), flush=True)

    (serve_sync if spec["kind"] == "sync" else serve_aio)(spec, stop, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
