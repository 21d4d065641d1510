"""The differential suite's client process: runs named scenarios on request.

    python -m tests.diff_client '{"kind": "sync"|"aio", "mode": "plain"|"shmgrpc", "parent": PID}'

Prints CLIENT_READY, then reads one JSON command per stdin line:

    {"scenario": NAME, "rid": ID, "targets": {"main": "unix:...", ...},
     "transport": "shm"|"cma"|"off", "threshold": "16KiB",
     "variant": "helper"|"inside"|"outside"|..., "params": {...}}

runs it and prints one line, RESULT followed by JSON:

    {"observed": {...}, "proof": {...}, "timing": {...}, "shmgrpc_imported": bool}

`observed` is what the program saw and must be equal with and without
shmgrpc: every call's status code, details, response (type and digest),
initial and trailing metadata keys, and what the client interceptors were
handed. `proof` is shmgrpc's own account (channel stats and status), `timing`
is wall-clock; neither is compared.

mode "plain": grpc channels; shmgrpc is never imported. mode "shmgrpc": the
same program with shmgrpc's channel wrappers, configured per channel with
Config.from_env({"SHMGRPC_TRANSPORT": transport, "SHMGRPC_THRESHOLD": threshold, "SHMGRPC_CMA_THRESHOLD": threshold}).
Every channel a scenario uses starts with a route-learning warm-up call, in
both modes (Run.warm_up_request), except where a scenario observes a
channel's first contact itself (a target nobody listens at; the auth
scenario's "unauthenticated first" channel).

"variant" says how shmgrpc is put on the channel (plain runs ignore it):
    helper   shmgrpc.insecure_channel / shmgrpc.aio.insecure_channel; the
             scenario's client interceptors wrap it from the outside (sync),
             or are passed as interceptors= to the helper (aio)
    outside  grpc.intercept_channel(shmgrpc.intercept_channel(raw), *interceptors)
    inside   shmgrpc.intercept_channel(grpc.intercept_channel(raw, *interceptors));
             aio: shmgrpc.aio.intercept_channel(grpc.aio.insecure_channel(..., interceptors=...))
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, Dict, List

import grpc
import grpc.aio

from protos import echo_test_pb2 as pb
from protos import echo_test_pb2_grpc as pb_grpc
from tests._diff import (
    AUTH_KEY,
    AUTH_VALUE,
    CLIENT_READY,
    CODEC_SERVICE,
    ECHO_SERVICE,
    FLAKY_SERVICE,
    KiB,
    MiB,
    NEW_HANDLE_PREFIX,
    OLD_HANDLE_PREFIX,
    RESULT,
    RID_KEY,
    Box,
    blob,
    describe,
    dict_decode,
    dict_encode,
    json_decode,
    json_encode,
    metadata_keys,
    sha,
    text,
)

ECHO_UNARY = f"/{ECHO_SERVICE}/Unary"
WARM_UP_SUFFIX = "/warm-up"  # the rid suffix of every channel's route-learning call (Run.warm_up_request)
WARM_UP_SEQ = 900
CALL_TIMEOUT = 20.0  # every call of a scenario has a deadline: a hang is a failure, not a stall
BIG_OPTIONS = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)]
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": FLAKY_SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
# per_rpc_retry_buffer_size (default 256 KiB): a call whose sent messages
# exceed it is committed and never retried. Raised so that plain gRPC retries
# the large requests too; both runs use the same options.
RETRY_OPTIONS = [
    ("grpc.service_config", RETRY_SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.per_rpc_retry_buffer_size", 8 * MiB),
]


def parse_size(value: str) -> int:
    """"16KiB" -> 16384 (the units SHMGRPC_THRESHOLD takes here)."""
    for unit, factor in (("MiB", MiB), ("KiB", KiB), ("B", 1)):
        if value.endswith(unit):
            return int(value[: -len(unit)]) * factor
    return int(value)


def payload(seq: int, size: int, **fields) -> pb.Payload:
    """A Payload whose body is `size` bytes of blob(size, seq), with its digest."""
    body = blob(size, seq)
    fields.setdefault("note", "orig")
    return pb.Payload(seq=seq, body=body, digest=hashlib.sha256(body).digest(), **fields)


def error_traits(err: BaseException) -> Dict[str, Any]:
    """What a program can ask of a failed call's exception."""

    def ask(name):
        fn = getattr(err, name, None)
        if not callable(fn):
            return "missing", None
        try:
            return "ok", fn()
        except Exception as exc:  # noqa: BLE001 - reported, compared
            return f"raises {type(exc).__name__}", None

    how, code = ask("code")
    code = code.name if isinstance(code, grpc.StatusCode) else (how if how != "ok" else repr(code))
    how, details = ask("details")
    details = details if how == "ok" else how
    how, debug = ask("debug_error_string")
    debug = type(debug).__name__ if how == "ok" else how
    return {
        "rpc_error": isinstance(err, grpc.RpcError),
        "call": isinstance(err, grpc.Call),
        "future": isinstance(err, grpc.Future),
        "aio_rpc_error": isinstance(err, grpc.aio.AioRpcError),
        "code": code,
        "details": details,
        "debug_error_string": debug,
    }


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


def with_metadata(details, extra) -> _Details:
    return _Details(
        details.method,
        details.timeout,
        [*(details.metadata or ()), *extra],
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


class _AioDetails(
    collections.namedtuple("_AioDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready")),
    grpc.aio.ClientCallDetails,
):
    pass


def aio_with_metadata(details, extra) -> _AioDetails:
    metadata = grpc.aio.Metadata(*[(k, v) for k, v in (details.metadata or ())], *extra)
    return _AioDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


def stamped(request):
    copy = type(request)()
    copy.CopyFrom(request)
    copy.note = "stamped"
    return copy


def icpt_event(events: List, name: str, details) -> Dict[str, Any]:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    ev = {"name": name, "method": method, "metadata": metadata_keys(details.metadata), "requests": [],
          "responses": [], "codes": []}
    events.append(ev)
    return ev


# --- sync client interceptors ---------------------------------------------------------


class Stamp(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Rebuilds every request: a copy with `note` stamped. Records what it
    was handed (request objects, metadata keys, unary responses)."""

    def __init__(self, events: List):
        self.events = events

    def _see(self, ev, request):
        ev["requests"].append(describe(request))
        return stamped(request)

    def _result(self, ev, outcome):
        try:
            ev["responses"].append(describe(outcome.result()))
            ev["codes"].append("OK")
        except grpc.RpcError as err:
            ev["codes"].append(err.code().name)
        return outcome

    def intercept_unary_unary(self, continuation, details, request):
        ev = icpt_event(self.events, "stamp", details)
        return self._result(ev, continuation(details, self._see(ev, request)))

    def intercept_unary_stream(self, continuation, details, request):
        ev = icpt_event(self.events, "stamp", details)
        return continuation(details, self._see(ev, request))

    def intercept_stream_unary(self, continuation, details, request_iterator):
        ev = icpt_event(self.events, "stamp", details)
        return self._result(ev, continuation(details, (self._see(ev, r) for r in request_iterator)))

    def intercept_stream_stream(self, continuation, details, request_iterator):
        ev = icpt_event(self.events, "stamp", details)
        return continuation(details, (self._see(ev, r) for r in request_iterator))


class Retry(grpc.UnaryUnaryClientInterceptor):
    """Calls the continuation again (at most 3 attempts) while it fails with UNAVAILABLE."""

    def __init__(self, events: List):
        self.events = events

    def intercept_unary_unary(self, continuation, details, request):
        ev = icpt_event(self.events, "retry", details)
        ev["requests"].append(describe(request))
        for attempt in range(3):
            outcome = continuation(details, request)
            err = outcome.exception()
            ev["codes"].append("OK" if err is None else err.code().name)
            if err is None:
                ev["responses"].append(describe(outcome.result()))
                return outcome
            if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == 2:
                return outcome
        return outcome


class AddAuth(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer x` to every call."""

    def __init__(self, events: List):
        self.events = events

    def _details(self, details):
        icpt_event(self.events, "add-auth", details)
        return with_metadata(details, [(AUTH_KEY, AUTH_VALUE)])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


# --- aio client interceptors (grpc.aio wants one class per shape) -------------------------


async def _aio_requests(ev, request_iterator, stamp: bool):
    if hasattr(request_iterator, "__aiter__"):
        async for request in request_iterator:
            ev["requests"].append(describe(request))
            yield stamped(request) if stamp else request
    else:
        for request in request_iterator:
            ev["requests"].append(describe(request))
            yield stamped(request) if stamp else request


async def _aio_result(ev, call):
    try:
        ev["responses"].append(describe(await call))
        ev["codes"].append("OK")
    except grpc.RpcError as err:
        ev["codes"].append(err.code().name)
    return call


class AioStampUU(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, events):
        self.events = events

    async def intercept_unary_unary(self, continuation, details, request):
        ev = icpt_event(self.events, "stamp", details)
        ev["requests"].append(describe(request))
        return await _aio_result(ev, await continuation(details, stamped(request)))


class AioStampUS(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, events):
        self.events = events

    async def intercept_unary_stream(self, continuation, details, request):
        ev = icpt_event(self.events, "stamp", details)
        ev["requests"].append(describe(request))
        return await continuation(details, stamped(request))


class AioStampSU(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, events):
        self.events = events

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        ev = icpt_event(self.events, "stamp", details)
        return await _aio_result(ev, await continuation(details, _aio_requests(ev, request_iterator, True)))


class AioStampSS(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, events):
        self.events = events

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        ev = icpt_event(self.events, "stamp", details)
        return await continuation(details, _aio_requests(ev, request_iterator, True))


class AioRetry(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, events):
        self.events = events

    async def intercept_unary_unary(self, continuation, details, request):
        ev = icpt_event(self.events, "retry", details)
        ev["requests"].append(describe(request))
        for attempt in range(3):
            call = await continuation(details, request)
            code = await call.code()
            ev["codes"].append(code.name)
            if code == grpc.StatusCode.OK:
                ev["responses"].append(describe(await call))
                return call
            if code != grpc.StatusCode.UNAVAILABLE or attempt == 2:
                return call
        return call


class AioAddAuthUU(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, events):
        self.events = events

    async def intercept_unary_unary(self, continuation, details, request):
        icpt_event(self.events, "add-auth", details)
        return await continuation(aio_with_metadata(details, [(AUTH_KEY, AUTH_VALUE)]), request)


class AioAddAuthSS(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, events):
        self.events = events

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        icpt_event(self.events, "add-auth", details)
        return await continuation(aio_with_metadata(details, [(AUTH_KEY, AUTH_VALUE)]), request_iterator)


SYNC_INTERCEPTORS = {
    "stamp": lambda ev: [Stamp(ev)],
    "retry": lambda ev: [Retry(ev)],
    "add-auth": lambda ev: [AddAuth(ev)],
}
AIO_INTERCEPTORS = {
    "stamp": lambda ev: [AioStampUU(ev), AioStampUS(ev), AioStampSU(ev), AioStampSS(ev)],
    "retry": lambda ev: [AioRetry(ev)],
    "add-auth": lambda ev: [AioAddAuthUU(ev), AioAddAuthSS(ev)],
}


# --- one scenario run -------------------------------------------------------------------


class Run:
    """Channels, observations and proof of one command."""

    def __init__(self, cmd: dict, mode: str, kind: str):
        self.cmd = cmd
        self.mode = mode
        self.kind = kind
        self.rid = cmd["rid"]
        self.targets = cmd["targets"]
        self.params = cmd.get("params") or {}
        self.variant = cmd.get("variant") or "helper"
        self.calls: List[dict] = []
        self.interceptors: List[dict] = []  # events of the client interceptors
        self.checks: Dict[str, Any] = {}  # scenario-specific observations, compared
        self.timing: Dict[str, float] = {}
        self.wrappers: List[tuple] = []  # (label, shmgrpc channel)
        self.raw: List[Any] = []  # channels to close

    def md(self, suffix: str = "", extra=()) -> list:
        return [(RID_KEY, self.rid + suffix), *extra]

    def config(self):
        import shmgrpc

        return shmgrpc.Config.from_env(
            {"SHMGRPC_TRANSPORT": self.cmd["transport"], "SHMGRPC_THRESHOLD": self.cmd["threshold"], "SHMGRPC_CMA_THRESHOLD": self.cmd["threshold"]}
        )

    def interceptors_for(self, names) -> list:
        table = SYNC_INTERCEPTORS if self.kind == "sync" else AIO_INTERCEPTORS
        out = []
        for name in names:
            out += table[name](self.interceptors)
        return out

    # sync channels

    # A shmgrpc channel has no handshake call: it learns its server's route
    # from the trailers of its first calls that carry the hello, and those
    # go inline. So that a scenario's large messages are offloaded from its
    # first call on, every channel a scenario uses starts with one
    # route-learning call (warm_up), made through the very channel the
    # scenario gets (every client and server interceptor sees it), in the
    # plain run too: both runs make the same calls, and its outcome is
    # recorded and compared like any other. Its rid carries WARM_UP_SUFFIX,
    # so the server files it apart from the scenario's own calls.

    def warm_up_request(self) -> pb.Payload:
        """An Echo request and answer of at least the run's threshold: the
        request carries the hello (a unary request at or above the
        threshold), and the large answer marks Echo/Unary as a method that
        answers large, so its later calls carry the hello too."""
        size = parse_size(self.cmd["threshold"])
        return payload(WARM_UP_SEQ, size, reply_size=size, note="warm-up")

    def _warm_up_extra(self, target: str, interceptors) -> list:
        # the auth site refuses calls without credentials (and a refused
        # call teaches a channel nothing): carry them unless an interceptor adds them
        return [(AUTH_KEY, AUTH_VALUE)] if target == "auth" and "add-auth" not in interceptors else []

    def channel(self, target: str, options=None, interceptors=(), config=None, label: str = "",
                warm_up: bool = True):
        """A sync channel to targets[target] carrying `interceptors` (names),
        through shmgrpc as self.variant says unless the run is plain; with
        `warm_up`, after one route-learning call (see warm_up_request)."""
        channel = self._channel(target, options, interceptors, config, label)
        if warm_up:
            echo = channel.unary_unary(ECHO_UNARY, request_serializer=pb.Payload.SerializeToString,
                                       response_deserializer=pb.Payload.FromString)
            self.unary(f"warm-up {label or target}", echo, self.warm_up_request(), suffix=WARM_UP_SUFFIX,
                       extra=self._warm_up_extra(target, interceptors))
        return channel

    def _channel(self, target: str, options, interceptors, config, label: str):
        address = self.targets[target]
        icpts = self.interceptors_for(interceptors)
        if self.mode == "plain":
            raw = grpc.insecure_channel(address, options=options)
            self.raw.append(raw)
            return grpc.intercept_channel(raw, *icpts) if icpts else raw
        import shmgrpc

        config = config if config is not None else self.config()
        if self.variant == "helper":
            wrapped = shmgrpc.insecure_channel(address, options=options, config=config)
            outer = grpc.intercept_channel(wrapped, *icpts) if icpts else wrapped
        elif self.variant == "outside":
            raw = grpc.insecure_channel(address, options=options)
            self.raw.append(raw)
            wrapped = shmgrpc.intercept_channel(raw, config, options=options)
            outer = grpc.intercept_channel(wrapped, *icpts) if icpts else wrapped
        elif self.variant == "inside":
            raw = grpc.insecure_channel(address, options=options)
            self.raw.append(raw)
            inner = grpc.intercept_channel(raw, *icpts) if icpts else raw
            wrapped = outer = shmgrpc.intercept_channel(inner, config, options=options)
        else:
            raise ValueError(f"unknown variant {self.variant!r}")
        self.wrappers.append((label or target, wrapped))
        return outer

    # aio channels

    async def aio_channel(self, target: str, options=None, interceptors=(), config=None, label: str = "",
                          warm_up: bool = True):
        """channel()'s aio twin: the channel, after its route-learning call."""
        channel = self._aio_channel(target, options, interceptors, config, label)
        if warm_up:
            echo = channel.unary_unary(ECHO_UNARY, request_serializer=pb.Payload.SerializeToString,
                                       response_deserializer=pb.Payload.FromString)
            await self.aio_unary(f"warm-up {label or target}", echo, self.warm_up_request(), suffix=WARM_UP_SUFFIX,
                                 extra=self._warm_up_extra(target, interceptors))
        return channel

    def _aio_channel(self, target: str, options, interceptors, config, label: str):
        address = self.targets[target]
        icpts = self.interceptors_for(interceptors) or None
        if self.mode == "plain":
            raw = grpc.aio.insecure_channel(address, options=options, interceptors=icpts)
            self.raw.append(raw)
            return raw
        import shmgrpc.aio

        config = config if config is not None else self.config()
        if self.variant == "inside":
            raw = grpc.aio.insecure_channel(address, options=options, interceptors=icpts)
            self.raw.append(raw)
            wrapped = shmgrpc.aio.intercept_channel(raw, config, options=options)
        elif self.variant in ("helper", "outside"):
            wrapped = shmgrpc.aio.insecure_channel(address, options=options, interceptors=icpts, config=config)
        else:
            raise ValueError(f"unknown variant {self.variant!r}")
        self.wrappers.append((label or target, wrapped))
        return wrapped

    def proof(self) -> dict:
        out = {"channels": []}
        if self.mode == "plain":
            return out
        import shmgrpc

        for label, channel in self.wrappers:
            entry = {"label": label}
            try:
                entry["stats"] = channel.stats()
            except Exception as err:  # noqa: BLE001 - reported to the test
                entry["stats_error"] = f"{type(err).__name__}: {err}"
            try:
                status = shmgrpc.channel_status(channel)
                entry["status"] = {
                    f: getattr(status, f, None) for f in ("transport", "transports", "reason", "settled")
                }
            except Exception as err:  # noqa: BLE001
                entry["status_error"] = f"{type(err).__name__}: {err}"
            out["channels"].append(entry)
        return out

    def close_sync(self) -> None:
        for _, channel in self.wrappers:
            try:
                channel.close()
            except Exception:  # noqa: BLE001 - closing twice is the wrapper's business
                pass
        for channel in self.raw:
            channel.close()

    async def close_aio(self) -> None:
        for _, channel in self.wrappers:
            try:
                await channel.close()
            except Exception:  # noqa: BLE001
                pass
        for channel in self.raw:
            await channel.close()

    def result(self) -> dict:
        return {
            "observed": {"calls": self.calls, "client_interceptors": self.interceptors, "checks": self.checks},
            "proof": self.proof(),
            "timing": self.timing,
        }

    # sync call helpers

    def unary(self, label: str, multicallable, request, suffix: str = "", extra=(), **kw) -> dict:
        try:
            response, call = multicallable.with_call(
                request, metadata=self.md(suffix, extra), timeout=kw.pop("timeout", CALL_TIMEOUT), **kw
            )
            rec = {
                "code": call.code().name,
                "details": call.details(),
                "initial": metadata_keys(call.initial_metadata()),
                "trailing": metadata_keys(call.trailing_metadata()),
                "response": describe(response),
            }
        except grpc.RpcError as err:
            rec = _sync_error(err)
        except Exception as err:  # noqa: BLE001 - not a gRPC outcome: the application sees this
            rec = _foreign_error(err)
        rec = {"label": label, **rec}
        self.calls.append(rec)
        return rec

    def stream(self, label: str, start) -> dict:
        """Record a response-streaming call; `start()` makes it (inside the
        try: a wrapper may fail the call as it starts)."""
        responses = []
        try:
            call = start()
            for response in call:
                responses.append(describe(response))
            rec = {
                "code": call.code().name,
                "details": call.details(),
                "initial": metadata_keys(call.initial_metadata()),
                "trailing": metadata_keys(call.trailing_metadata()),
            }
        except grpc.RpcError as err:
            rec = _sync_error(err)
        except Exception as err:  # noqa: BLE001
            rec = _foreign_error(err)
        rec = {"label": label, **rec, "responses": responses}
        self.calls.append(rec)
        return rec

    # aio call helpers

    async def aio_unary(self, label: str, multicallable, request, suffix: str = "", extra=(), **kw) -> dict:
        try:
            call = multicallable(request, metadata=self.md(suffix, extra), timeout=kw.pop("timeout", CALL_TIMEOUT),
                                 **kw)
            response = await call
            rec = {
                "code": (await call.code()).name,
                "details": await call.details(),
                "initial": metadata_keys(await call.initial_metadata()),
                "trailing": metadata_keys(await call.trailing_metadata()),
                "response": describe(response),
            }
        except grpc.RpcError as err:
            rec = _aio_error(err)
        except Exception as err:  # noqa: BLE001
            rec = _foreign_error(err)
        rec = {"label": label, **rec}
        self.calls.append(rec)
        return rec

    async def aio_stream(self, label: str, start) -> dict:
        responses = []
        try:
            call = start()
            async for response in call:
                responses.append(describe(response))
            rec = {
                "code": (await call.code()).name,
                "details": await call.details(),
                "initial": metadata_keys(await call.initial_metadata()),
                "trailing": metadata_keys(await call.trailing_metadata()),
            }
        except grpc.RpcError as err:
            rec = _aio_error(err)
        except Exception as err:  # noqa: BLE001
            rec = _foreign_error(err)
        rec = {"label": label, **rec, "responses": responses}
        self.calls.append(rec)
        return rec


def _sync_error(err: grpc.RpcError) -> dict:
    def keys(name):
        fn = getattr(err, name, None)
        try:
            return metadata_keys(fn()) if callable(fn) else "missing"
        except Exception as exc:  # noqa: BLE001
            return f"raises {type(exc).__name__}"

    code = err.code() if callable(getattr(err, "code", None)) else None
    return {
        "code": code.name if code is not None else None,
        "details": err.details() if callable(getattr(err, "details", None)) else None,
        "initial": keys("initial_metadata"),
        "trailing": keys("trailing_metadata"),
    }


_aio_error = _sync_error  # AioRpcError answers the same questions synchronously


def _foreign_error(err: BaseException) -> dict:
    """A call that raised something other than grpc.RpcError: the
    application sees an exception plain gRPC would not have raised (or would
    have raised too: then both runs record it alike)."""
    tb = traceback.extract_tb(err.__traceback__)
    where = f"{os.path.basename(tb[-1].filename)}:{tb[-1].name}" if tb else "?"
    return {"code": None, "raised": f"{type(err).__name__}: {err}", "raised_in": where}


# --- scenarios: sync ----------------------------------------------------------------------


def sync_shapes(run: Run) -> None:
    """Every RPC shape, each on its own channel (labelled by shape, so the
    offload proof is per shape)."""
    target = run.params.get("target", "main")
    shapes = run.params.get("shapes", ["uu", "us", "su", "ss"])

    def stub(shape):
        return pb_grpc.EchoStub(run.channel(target, label=shape))

    if "uu" in shapes:
        uu = stub("uu")
        for i, (size, reply) in enumerate([(1 * KiB, 0), (300 * KiB, 0), (40 * KiB, 300 * KiB)]):
            run.unary(f"uu{i}", uu.Unary, payload(i, size, reply_size=reply))
    if "us" in shapes:
        us = stub("us")
        run.stream("us", lambda: us.ServerStream(payload(3, 200 * KiB, reply_size=100 * KiB), metadata=run.md(),
                                                 timeout=CALL_TIMEOUT))
    if "su" in shapes:
        requests = [payload(10, 300 * KiB, reply_size=64 * KiB), payload(11, 1 * KiB), payload(12, 100 * KiB)]
        run.unary("su", stub("su").ClientStream, iter(requests))
    if "ss" in shapes:
        ss = stub("ss")
        requests = [payload(20, 300 * KiB), payload(21, 1 * KiB, reply_size=200 * KiB), payload(22, 50 * KiB)]
        run.stream("ss", lambda: ss.BidiStream(iter(requests), metadata=run.md(), timeout=CALL_TIMEOUT))


def sync_stamp(run: Run) -> None:
    stub = pb_grpc.EchoStub(run.channel("main", interceptors=["stamp"]))
    run.unary("uu-large", stub.Unary, payload(1, 300 * KiB))
    run.unary("uu-small", stub.Unary, payload(2, 1 * KiB, reply_size=100 * KiB))
    run.unary("su", stub.ClientStream, iter([payload(3, 200 * KiB), payload(4, 2 * KiB)]))
    requests = [payload(5, 200 * KiB), payload(6, 2 * KiB, reply_size=64 * KiB)]
    run.stream("ss", lambda: stub.BidiStream(iter(requests), metadata=run.md(), timeout=CALL_TIMEOUT))
    run.stream("us", lambda: stub.ServerStream(payload(2, 100 * KiB), metadata=run.md(), timeout=CALL_TIMEOUT))


CODECS = ("json", "raw", "dict", "proto-det", "box", "to-dict", "to-bytes", "json-bidi")


def codec_calls(channel_for) -> List[tuple]:
    """(label, multicallable, request, kind) of the codec scenario; kind says
    which call helper: "unary" or "stream" (a list of requests). Each codec
    has its own channel, channel_for(codec), so the offload proof is per codec."""
    method = lambda name: f"/{CODEC_SERVICE}/{name}"  # noqa: E731
    echo = f"/{ECHO_SERVICE}/Unary"
    json_uu = channel_for("json").unary_unary(method("Json"), request_serializer=json_encode,
                                              response_deserializer=json_decode)
    json_ss = channel_for("json-bidi").stream_stream(method("JsonBidi"), request_serializer=json_encode,
                                                     response_deserializer=json_decode)
    raw_uu = channel_for("raw").unary_unary(method("Raw"))  # no serializers at all: bytes both ways
    dict_uu = channel_for("dict").unary_unary(method("Dict"), request_serializer=dict_encode,
                                              response_deserializer=dict_decode)
    proto_det = channel_for("proto-det").unary_unary(
        echo,
        request_serializer=lambda m: m.SerializeToString(deterministic=True),
        response_deserializer=pb.Payload.FromString,
    )
    boxed = channel_for("box").unary_unary(echo, request_serializer=Box.serialize,
                                           response_deserializer=Box.parser(pb.Payload))
    to_dict = channel_for("to-dict").unary_unary(
        echo,
        request_serializer=pb.Payload.SerializeToString,
        response_deserializer=lambda data: {"size": len(data), "sha": sha(data)},
    )
    proto_to_bytes = channel_for("to-bytes").unary_unary(echo, request_serializer=pb.Payload.SerializeToString)
    calls = []
    for i, (size, reply) in enumerate([(100, 0), (300 * KiB, 0), (100, 200 * KiB)]):
        calls.append((f"json{i}", json_uu, {"tag": f"j{i}", "blob": text(size, i), "reply": reply}, "unary"))
        calls.append((f"raw{i}", raw_uu, blob(size + reply, 50 + i), "unary"))
        calls.append(
            (f"dict{i}", dict_uu, {"tag": f"d{i}".encode(), "blob": blob(size, 60 + i), "reply": str(reply).encode()},
             "unary")
        )
        calls.append((f"proto-det{i}", proto_det, payload(70 + i, size, reply_size=reply), "unary"))
        calls.append((f"box{i}", boxed, Box(payload(80 + i, size, reply_size=reply)), "unary"))
        calls.append((f"to-dict{i}", to_dict, payload(90 + i, size, reply_size=reply), "unary"))
        calls.append((f"to-bytes{i}", proto_to_bytes, payload(100 + i, size, reply_size=reply), "unary"))
    calls.append(
        ("json-bidi", json_ss,
         [{"tag": "b0", "blob": text(300 * KiB, 7)}, {"tag": "b1", "blob": "x"},
          {"tag": "b2", "blob": "", "reply": 64 * KiB}],
         "stream")
    )
    return calls


def sync_codecs(run: Run) -> None:
    for label, multicallable, request, kind in codec_calls(lambda codec: run.channel("main", label=codec)):
        if kind == "unary":
            run.unary(label, multicallable, request)
        else:
            run.stream(label, lambda: multicallable(iter(request), metadata=run.md(), timeout=CALL_TIMEOUT))


def prefix_payloads() -> List[tuple]:
    out = []
    prefixes = {
        "old": OLD_HANDLE_PREFIX,
        "new": NEW_HANDLE_PREFIX,
        "escape": NEW_HANDLE_PREFIX + b"\x00",
        "forged": NEW_HANDLE_PREFIX + bytes([60]) + b"SGH1\x01\x00\x00\x00",
    }
    for name, prefix in prefixes.items():
        for j, size in enumerate([len(prefix), 100, 300 * KiB]):
            out.append((f"{name}-{size}", prefix + blob(size - len(prefix), 200 + j)))
    return out


def sync_prefix(run: Run) -> None:
    channel = run.channel("main")
    raw_uu = channel.unary_unary(f"/{CODEC_SERVICE}/Raw")
    raw_ss = channel.stream_stream(f"/{CODEC_SERVICE}/RawBidi")
    for label, data in prefix_payloads():
        run.unary(label, raw_uu, data)
    stream = [data for label, data in prefix_payloads() if not label.endswith("-100")]
    run.stream("bidi", lambda: raw_ss(iter(stream), metadata=run.md(), timeout=CALL_TIMEOUT))


def flaky_requests():
    return [payload(0, 300 * KiB), payload(1, 1 * MiB, reply_size=300 * KiB), payload(2, 1 * KiB, reply_size=64 * KiB)]


def _flaky(channel):
    return channel.unary_unary(
        f"/{FLAKY_SERVICE}/Unary",
        request_serializer=pb.Payload.SerializeToString,
        response_deserializer=pb.Payload.FromString,
    )


def sync_retry_service_config(run: Run) -> None:
    flaky = _flaky(run.channel("main", options=RETRY_OPTIONS))
    for i, request in enumerate(flaky_requests()):
        run.unary(f"flaky{i}", flaky, request)


def sync_retry_interceptor(run: Run) -> None:
    flaky = _flaky(run.channel("main", interceptors=["retry"]))
    for i, request in enumerate(flaky_requests()):
        run.unary(f"flaky{i}", flaky, request)


def sync_wait_for_ready(run: Run) -> None:
    """Nothing listens at the target: both calls wait for it until their 1 s deadline."""
    stub = pb_grpc.EchoStub(run.channel("nowhere", warm_up=False))
    results: Dict[str, dict] = {}

    def unary():
        t0 = time.monotonic()
        try:
            stub.Unary(payload(1, 300 * KiB), metadata=run.md(), wait_for_ready=True, timeout=1)
            results["uu"] = {"code": "OK"}
        except grpc.RpcError as err:
            results["uu"] = {"code": err.code().name, "details": err.details()}
        run.timing["uu"] = time.monotonic() - t0

    def client_stream():
        t0 = time.monotonic()
        try:
            stub.ClientStream(iter([payload(2, 300 * KiB), payload(3, 300 * KiB)]), metadata=run.md(),
                              wait_for_ready=True, timeout=1)
            results["su"] = {"code": "OK"}
        except grpc.RpcError as err:
            results["su"] = {"code": err.code().name, "details": err.details()}
        run.timing["su"] = time.monotonic() - t0

    threads = [threading.Thread(target=unary), threading.Thread(target=client_stream)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_TIMEOUT)
    for label in ("uu", "su"):
        run.calls.append({"label": label, **results.get(label, {"code": "did not finish"})})


def sync_limit_server_recv(run: Run) -> None:
    stub = pb_grpc.EchoStub(run.channel("small"))
    run.unary("512KiB", stub.Unary, payload(1, 512 * KiB))
    run.unary("2MiB", stub.Unary, payload(2, 2 * MiB))
    run.unary("after", stub.Unary, payload(3, 1 * KiB))


def sync_limit_client_recv(run: Run) -> None:
    stub = pb_grpc.EchoStub(run.channel("main"))
    run.unary("reply-2MiB", stub.Unary, payload(1, 1 * KiB, reply_size=2 * MiB))
    run.unary("reply-8MiB", stub.Unary, payload(2, 1 * KiB, reply_size=8 * MiB))
    run.unary("after", stub.Unary, payload(3, 1 * KiB))


def sync_limit_raised(run: Run) -> None:
    stub = pb_grpc.EchoStub(run.channel("big", options=BIG_OPTIONS))
    run.unary("16MiB", stub.Unary, payload(1, 16 * MiB, reply_size=16 * MiB))


def sync_shared_config(run: Run) -> None:
    config = run.config() if run.mode != "plain" else None
    a = pb_grpc.EchoStub(run.channel("main", config=config, label="shmgrpc-server"))
    b = pb_grpc.EchoStub(run.channel("plain_main", config=config, label="plain-server"))
    for i in range(2):
        run.unary(f"a{i}", a.Unary, payload(10 + i, 300 * KiB, reply_size=200 * KiB), suffix="/a")
        run.unary(f"b{i}", b.Unary, payload(20 + i, 300 * KiB, reply_size=200 * KiB), suffix="/b")
    run.unary("b-su", b.ClientStream, iter([payload(30, 300 * KiB), payload(31, 100 * KiB)]), suffix="/b")
    run.stream("a-ss", lambda: a.BidiStream(iter([payload(40, 300 * KiB)]), metadata=run.md("/a"),
                                            timeout=CALL_TIMEOUT))


def sync_auth(run: Run) -> None:
    auth = [(AUTH_KEY, AUTH_VALUE)]
    a = pb_grpc.EchoStub(run.channel("auth", label="per-call metadata"))
    run.unary("md-uu", a.Unary, payload(1, 300 * KiB, reply_size=200 * KiB), extra=auth)
    run.stream("md-ss", lambda: a.BidiStream(iter([payload(2, 300 * KiB), payload(3, 1 * KiB)]),
                                     metadata=run.md(extra=auth), timeout=CALL_TIMEOUT))
    run.unary("none-uu", a.Unary, payload(4, 300 * KiB))
    run.stream("none-ss", lambda: a.BidiStream(iter([payload(5, 300 * KiB)]), metadata=run.md(), timeout=CALL_TIMEOUT))
    run.unary("md-uu-again", a.Unary, payload(6, 300 * KiB), extra=auth)
    b = pb_grpc.EchoStub(run.channel("auth", interceptors=["add-auth"], label="interceptor"))
    run.unary("icpt-uu", b.Unary, payload(7, 300 * KiB, reply_size=200 * KiB))
    run.stream("icpt-ss", lambda: b.BidiStream(iter([payload(8, 300 * KiB)]), metadata=run.md(), timeout=CALL_TIMEOUT))
    # no warm-up: the first call, refused before any welcome, teaches the
    # channel nothing; the next (inline) learns the route; the last is offloaded
    c = pb_grpc.EchoStub(run.channel("auth", label="unauthenticated first", warm_up=False))
    run.unary("first-none", c.Unary, payload(9, 300 * KiB))
    run.unary("then-md", c.Unary, payload(10, 300 * KiB), extra=auth)
    run.unary("then-md-again", c.Unary, payload(11, 300 * KiB), extra=auth)


def sync_errors(run: Run) -> None:
    stub = pb_grpc.EchoStub(run.channel("main"))
    fail = payload(1, 300 * KiB, note="fail")

    future = stub.Unary.future(fail, metadata=run.md(), timeout=CALL_TIMEOUT)
    seen: List[Any] = []
    future.add_done_callback(seen.append)
    exc = future.exception(timeout=CALL_TIMEOUT)
    try:
        future.result(timeout=CALL_TIMEOUT)
        raised: Any = "no exception"
    except Exception as err:  # noqa: BLE001 - its traits are the observation
        raised = error_traits(err)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    run.checks["future"] = {
        "future": isinstance(future, grpc.Future),
        "call": isinstance(future, grpc.Call),
        "exception": error_traits(exc) if exc is not None else None,
        "result_raises": raised,
        "code": future.code().name,
        "details": future.details(),
        "done": future.done(),
        "cancelled": future.cancelled(),
        "callback_calls": len(seen),
        "callback_arg_is_the_future": bool(seen) and seen[0] is future,
        "callback_arg_code": seen[0].code().name if seen else None,
    }

    try:
        stub.Unary.with_call(fail, metadata=run.md(), timeout=CALL_TIMEOUT)
        run.checks["with_call"] = "no exception"
    except Exception as err:  # noqa: BLE001
        run.checks["with_call"] = error_traits(err)
    try:
        stub.Unary(fail, metadata=run.md(), timeout=CALL_TIMEOUT)
        run.checks["call"] = "no exception"
    except Exception as err:  # noqa: BLE001
        run.checks["call"] = error_traits(err)

    def stream_failure(call) -> dict:
        got = []
        try:
            for response in call:
                got.append(describe(response))
            raised_ = "no exception"
        except Exception as err:  # noqa: BLE001
            raised_ = error_traits(err)
        return {
            "iterator_is_call": isinstance(call, grpc.Call),
            "iterator_is_future": isinstance(call, grpc.Future),
            "responses": got,
            "raised": raised_,
            "code": call.code().name,
            "details": call.details(),
        }

    run.checks["server_stream"] = stream_failure(
        stub.ServerStream(payload(3, 300 * KiB, note="fail-after-1", reply_size=200 * KiB),
                          metadata=run.md(), timeout=CALL_TIMEOUT)
    )
    run.checks["bidi"] = stream_failure(
        stub.BidiStream(iter([payload(3, 300 * KiB), payload(4, 300 * KiB, note="fail")]),
                        metadata=run.md(), timeout=CALL_TIMEOUT)
    )
    good = stub.Unary.future(payload(5, 300 * KiB, reply_size=300 * KiB), metadata=run.md(), timeout=CALL_TIMEOUT)
    response = good.result(timeout=CALL_TIMEOUT)
    run.checks["good_future"] = {
        "future": isinstance(good, grpc.Future),
        "call": isinstance(good, grpc.Call),
        "response": describe(response),
        "code": good.code().name,
        "exception": good.exception(),
    }


SYNC = {
    "shapes": sync_shapes,
    "stamp": sync_stamp,
    "codecs": sync_codecs,
    "prefix": sync_prefix,
    "retry_service_config": sync_retry_service_config,
    "retry_interceptor": sync_retry_interceptor,
    "wait_for_ready": sync_wait_for_ready,
    "limit_server_recv": sync_limit_server_recv,
    "limit_client_recv": sync_limit_client_recv,
    "limit_raised": sync_limit_raised,
    "shared_config": sync_shared_config,
    "auth": sync_auth,
    "errors": sync_errors,
}


# --- scenarios: aio -----------------------------------------------------------------------


async def _agen(items):
    for item in items:
        yield item


async def aio_shapes(run: Run) -> None:
    target = run.params.get("target", "main")
    shapes = run.params.get("shapes", ["uu", "us", "su", "ss"])

    async def stub(shape):
        return pb_grpc.EchoStub(await run.aio_channel(target, label=shape))

    if "uu" in shapes:
        uu = await stub("uu")
        for i, (size, reply) in enumerate([(1 * KiB, 0), (300 * KiB, 0), (40 * KiB, 300 * KiB)]):
            await run.aio_unary(f"uu{i}", uu.Unary, payload(i, size, reply_size=reply))
    if "us" in shapes:
        us = await stub("us")
        await run.aio_stream("us", lambda: us.ServerStream(payload(3, 200 * KiB, reply_size=100 * KiB),
                                                           metadata=run.md(), timeout=CALL_TIMEOUT))
    if "su" in shapes:
        requests = [payload(10, 300 * KiB, reply_size=64 * KiB), payload(11, 1 * KiB), payload(12, 100 * KiB)]
        await run.aio_unary("su", (await stub("su")).ClientStream, iter(requests))
    if "ss" in shapes:
        ss = await stub("ss")
        requests = [payload(20, 300 * KiB), payload(21, 1 * KiB, reply_size=200 * KiB), payload(22, 50 * KiB)]
        await run.aio_stream("ss", lambda: ss.BidiStream(_agen(requests), metadata=run.md(), timeout=CALL_TIMEOUT))


async def aio_stamp(run: Run) -> None:
    stub = pb_grpc.EchoStub(await run.aio_channel("main", interceptors=["stamp"]))
    await run.aio_unary("uu-large", stub.Unary, payload(1, 300 * KiB))
    await run.aio_unary("uu-small", stub.Unary, payload(2, 1 * KiB, reply_size=100 * KiB))
    await run.aio_unary("su", stub.ClientStream, iter([payload(3, 200 * KiB), payload(4, 2 * KiB)]))
    requests = [payload(5, 200 * KiB), payload(6, 2 * KiB, reply_size=64 * KiB)]
    await run.aio_stream("ss", lambda: stub.BidiStream(_agen(requests), metadata=run.md(), timeout=CALL_TIMEOUT))
    await run.aio_stream("us", lambda: stub.ServerStream(payload(2, 100 * KiB), metadata=run.md(),
                                                         timeout=CALL_TIMEOUT))


async def aio_codecs(run: Run) -> None:
    channels = {}
    for codec in CODECS:  # made (and warmed up) first: codec_calls asks for them synchronously
        channels[codec] = await run.aio_channel("main", label=codec)
    for label, multicallable, request, kind in codec_calls(channels.__getitem__):
        if kind == "unary":
            await run.aio_unary(label, multicallable, request)
        else:
            await run.aio_stream(label, lambda: multicallable(_agen(request), metadata=run.md(), timeout=CALL_TIMEOUT))


async def aio_prefix(run: Run) -> None:
    channel = await run.aio_channel("main")
    raw_uu = channel.unary_unary(f"/{CODEC_SERVICE}/Raw")
    raw_ss = channel.stream_stream(f"/{CODEC_SERVICE}/RawBidi")
    for label, data in prefix_payloads():
        await run.aio_unary(label, raw_uu, data)
    stream = [data for label, data in prefix_payloads() if not label.endswith("-100")]
    await run.aio_stream("bidi", lambda: raw_ss(_agen(stream), metadata=run.md(), timeout=CALL_TIMEOUT))


async def aio_retry_service_config(run: Run) -> None:
    flaky = _flaky(await run.aio_channel("main", options=RETRY_OPTIONS))
    for i, request in enumerate(flaky_requests()):
        await run.aio_unary(f"flaky{i}", flaky, request)


async def aio_retry_interceptor(run: Run) -> None:
    flaky = _flaky(await run.aio_channel("main", interceptors=["retry"]))
    for i, request in enumerate(flaky_requests()):
        await run.aio_unary(f"flaky{i}", flaky, request)


async def aio_wait_for_ready(run: Run) -> None:
    stub = pb_grpc.EchoStub(await run.aio_channel("nowhere", warm_up=False))

    async def timed(label, make_call):
        t0 = time.monotonic()
        try:
            await make_call()
            out = {"code": "OK"}
        except grpc.RpcError as err:
            out = {"code": err.code().name, "details": err.details()}
        run.timing[label] = time.monotonic() - t0
        return {"label": label, **out}

    results = await asyncio.gather(
        timed("uu", lambda: stub.Unary(payload(1, 300 * KiB), metadata=run.md(), wait_for_ready=True, timeout=1)),
        timed("su", lambda: stub.ClientStream(iter([payload(2, 300 * KiB), payload(3, 300 * KiB)]), metadata=run.md(),
                                              wait_for_ready=True, timeout=1)),
    )
    run.calls.extend(results)


async def aio_limit_server_recv(run: Run) -> None:
    stub = pb_grpc.EchoStub(await run.aio_channel("small"))
    await run.aio_unary("512KiB", stub.Unary, payload(1, 512 * KiB))
    await run.aio_unary("2MiB", stub.Unary, payload(2, 2 * MiB))
    await run.aio_unary("after", stub.Unary, payload(3, 1 * KiB))


async def aio_limit_client_recv(run: Run) -> None:
    stub = pb_grpc.EchoStub(await run.aio_channel("main"))
    await run.aio_unary("reply-2MiB", stub.Unary, payload(1, 1 * KiB, reply_size=2 * MiB))
    await run.aio_unary("reply-8MiB", stub.Unary, payload(2, 1 * KiB, reply_size=8 * MiB))
    await run.aio_unary("after", stub.Unary, payload(3, 1 * KiB))


async def aio_limit_raised(run: Run) -> None:
    stub = pb_grpc.EchoStub(await run.aio_channel("big", options=BIG_OPTIONS))
    await run.aio_unary("16MiB", stub.Unary, payload(1, 16 * MiB, reply_size=16 * MiB))


async def aio_shared_config(run: Run) -> None:
    config = run.config() if run.mode != "plain" else None
    a = pb_grpc.EchoStub(await run.aio_channel("main", config=config, label="shmgrpc-server"))
    b = pb_grpc.EchoStub(await run.aio_channel("plain_main", config=config, label="plain-server"))
    for i in range(2):
        await run.aio_unary(f"a{i}", a.Unary, payload(10 + i, 300 * KiB, reply_size=200 * KiB), suffix="/a")
        await run.aio_unary(f"b{i}", b.Unary, payload(20 + i, 300 * KiB, reply_size=200 * KiB), suffix="/b")
    await run.aio_unary("b-su", b.ClientStream, iter([payload(30, 300 * KiB), payload(31, 100 * KiB)]), suffix="/b")
    await run.aio_stream("a-ss", lambda: a.BidiStream(_agen([payload(40, 300 * KiB)]), metadata=run.md("/a"),
                                              timeout=CALL_TIMEOUT))


async def aio_auth(run: Run) -> None:
    auth = [(AUTH_KEY, AUTH_VALUE)]
    a = pb_grpc.EchoStub(await run.aio_channel("auth", label="per-call metadata"))
    await run.aio_unary("md-uu", a.Unary, payload(1, 300 * KiB, reply_size=200 * KiB), extra=auth)
    await run.aio_stream("md-ss", lambda: a.BidiStream(_agen([payload(2, 300 * KiB), payload(3, 1 * KiB)]),
                                               metadata=run.md(extra=auth), timeout=CALL_TIMEOUT))
    await run.aio_unary("none-uu", a.Unary, payload(4, 300 * KiB))
    await run.aio_stream("none-ss", lambda: a.BidiStream(_agen([payload(5, 300 * KiB)]), metadata=run.md(),
                                                 timeout=CALL_TIMEOUT))
    await run.aio_unary("md-uu-again", a.Unary, payload(6, 300 * KiB), extra=auth)
    b = pb_grpc.EchoStub(await run.aio_channel("auth", interceptors=["add-auth"], label="interceptor"))
    await run.aio_unary("icpt-uu", b.Unary, payload(7, 300 * KiB, reply_size=200 * KiB))
    await run.aio_stream("icpt-ss", lambda: b.BidiStream(_agen([payload(8, 300 * KiB)]), metadata=run.md(),
                                                 timeout=CALL_TIMEOUT))
    c = pb_grpc.EchoStub(await run.aio_channel("auth", label="unauthenticated first", warm_up=False))
    await run.aio_unary("first-none", c.Unary, payload(9, 300 * KiB))
    await run.aio_unary("then-md", c.Unary, payload(10, 300 * KiB), extra=auth)
    await run.aio_unary("then-md-again", c.Unary, payload(11, 300 * KiB), extra=auth)


async def aio_errors(run: Run) -> None:
    stub = pb_grpc.EchoStub(await run.aio_channel("main"))
    fail = payload(1, 300 * KiB, note="fail")

    call = stub.Unary(fail, metadata=run.md(), timeout=CALL_TIMEOUT)
    try:
        await call
        raised: Any = "no exception"
    except Exception as err:  # noqa: BLE001
        raised = error_traits(err)
    run.checks["unary"] = {
        "call": isinstance(call, grpc.aio.Call),
        "unary_unary_call": isinstance(call, grpc.aio.UnaryUnaryCall),
        "raised": raised,
        "code": (await call.code()).name,
        "details": await call.details(),
        "done": call.done(),
        "cancelled": call.cancelled(),
    }

    async def stream_failure(call_) -> dict:
        got = []
        try:
            async for response in call_:
                got.append(describe(response))
            raised_ = "no exception"
        except Exception as err:  # noqa: BLE001
            raised_ = error_traits(err)
        return {
            "call": isinstance(call_, grpc.aio.Call),
            "responses": got,
            "raised": raised_,
            "code": (await call_.code()).name,
            "details": await call_.details(),
        }

    run.checks["server_stream"] = await stream_failure(
        stub.ServerStream(payload(3, 300 * KiB, note="fail-after-1", reply_size=200 * KiB),
                          metadata=run.md(), timeout=CALL_TIMEOUT)
    )
    run.checks["bidi"] = await stream_failure(
        stub.BidiStream(_agen([payload(3, 300 * KiB), payload(4, 300 * KiB, note="fail")]),
                        metadata=run.md(), timeout=CALL_TIMEOUT)
    )
    # read()/write() style on a stream-stream call
    call = stub.BidiStream(metadata=run.md(), timeout=CALL_TIMEOUT)
    await call.write(payload(6, 300 * KiB))
    first = await call.read()
    await call.write(payload(7, 300 * KiB, note="fail"))
    await call.done_writing()
    try:
        second = await call.read()
        raised = {"read": "no exception", "second": describe(second) if second is not grpc.aio.EOF else "EOF"}
    except Exception as err:  # noqa: BLE001
        raised = error_traits(err)
    run.checks["bidi_read_write"] = {
        "first": describe(first),
        "second_read": raised,
        "code": (await call.code()).name,
        "details": await call.details(),
    }


AIO = {
    "shapes": aio_shapes,
    "stamp": aio_stamp,
    "codecs": aio_codecs,
    "prefix": aio_prefix,
    "retry_service_config": aio_retry_service_config,
    "retry_interceptor": aio_retry_interceptor,
    "wait_for_ready": aio_wait_for_ready,
    "limit_server_recv": aio_limit_server_recv,
    "limit_client_recv": aio_limit_client_recv,
    "limit_raised": aio_limit_raised,
    "shared_config": aio_shared_config,
    "auth": aio_auth,
    "errors": aio_errors,
}


# --- the command loop --------------------------------------------------------------------


def _crash(err: BaseException) -> dict:
    return {"crash": "".join(traceback.format_exception(type(err), err, err.__traceback__))}


def _emit(result: dict) -> None:
    result["shmgrpc_imported"] = "shmgrpc" in sys.modules
    print(RESULT + json.dumps(result, default=str), flush=True)


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


def serve_sync(spec: dict) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        run = Run(cmd, spec["mode"], "sync")
        t0 = time.monotonic()
        try:
            SYNC[cmd["scenario"]](run)
            result = run.result()
        except BaseException as err:  # noqa: BLE001 - the test shows the traceback
            result = _crash(err)
        finally:
            run.close_sync()
        result.setdefault("timing", {})["total"] = time.monotonic() - t0
        _emit(result)


async def serve_aio(spec: dict) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        if not line.strip():
            continue
        cmd = json.loads(line)
        run = Run(cmd, spec["mode"], "aio")
        t0 = time.monotonic()
        try:
            await AIO[cmd["scenario"]](run)
            result = run.result()
        except BaseException as err:  # noqa: BLE001
            result = _crash(err)
        finally:
            await run.close_aio()
        result.setdefault("timing", {})["total"] = time.monotonic() - t0
        _emit(result)


def main() -> int:
    spec = json.loads(sys.argv[1])
    if spec.get("parent"):
        threading.Thread(target=_watch_parent, args=(spec["parent"],), daemon=True).start()
    if spec["mode"] == "shmgrpc":
        import shmgrpc  # noqa: F401 - the API must be there before the first command
        import shmgrpc.aio  # noqa: F401
    print(CLIENT_READY + json.dumps({"pid": os.getpid(), "shmgrpc_imported": "shmgrpc" in sys.modules}), flush=True)
    if spec["kind"] == "sync":
        serve_sync(spec)
    else:
        asyncio.run(serve_aio(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
