"""shmgrpc's channel functions take what grpc's take, the way grpc takes it
(issue 17).

- shmgrpc.insecure_channel / secure_channel / shmgrpc.aio.insecure_channel /
  secure_channel have grpc's parameters: same names, kinds (positional or
  keyword) and defaults, in the same order, plus a keyword-only `config`.
- They call grpc's functions with everything but the target (and the
  credentials) by keyword, so a wrapper patched over grpc's function that
  adds `interceptors` to its keyword arguments (OpenTelemetry's
  GrpcAioInstrumentorClient does exactly that) works, and the application's
  own interceptors still reach it.
- Their multicallables take what grpc's take: a request stream is
  `request_iterator`, by keyword too.
- shmgrpc.intercept_channel(channel, OPTIONS) (options given positionally
  where the Config goes) is a TypeError that says what was given and what is
  expected, sync and aio.
"""

from __future__ import annotations

import asyncio
import inspect

import grpc
import pytest

import shmgrpc
import shmgrpc.aio
from tests.conftest import client_config

TARGET = "unix:/nonexistent/shmgrpc-signature-test.sock"  # never connected: no call is made
OPTIONS = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]

PAIRS = [
    ("grpc.insecure_channel", grpc.insecure_channel, shmgrpc.insecure_channel),
    ("grpc.secure_channel", grpc.secure_channel, shmgrpc.secure_channel),
    ("grpc.aio.insecure_channel", grpc.aio.insecure_channel, shmgrpc.aio.insecure_channel),
    ("grpc.aio.secure_channel", grpc.aio.secure_channel, shmgrpc.aio.secure_channel),
]


def described(fn, drop=()):
    return [(p.name, p.kind.name, repr(p.default)) for p in inspect.signature(fn).parameters.values()
            if p.name not in drop]


@pytest.mark.parametrize("name,grpc_fn,shm_fn", PAIRS, ids=[p[0] for p in PAIRS])
def test_signature_matches_grpc(name, grpc_fn, shm_fn):
    params = inspect.signature(shm_fn).parameters
    assert "config" in params and params["config"].kind is inspect.Parameter.KEYWORD_ONLY, \
        f"shmgrpc's {name}: `config` must be keyword-only"
    assert described(shm_fn, drop=("config",)) == described(grpc_fn), (
        f"shmgrpc's {name} takes other arguments than {name}:\n"
        f"  grpc:    {inspect.signature(grpc_fn)}\n  shmgrpc: {inspect.signature(shm_fn)}"
    )


SHAPES = ["unary_unary", "unary_stream", "stream_unary", "stream_stream"]


@pytest.mark.parametrize("shape", SHAPES)
def test_multicallables_take_what_grpcs_take(shape):
    """A stub's multicallables take grpc's parameters, same names and kinds:
    `stub.Stream(request_iterator=requests)` and `stub.Stream(requests, 5.0)`
    work through shmgrpc as through grpc (sync and aio)."""
    async def aio_pair():
        plain, wrapped = grpc.aio.insecure_channel(TARGET), shmgrpc.aio.insecure_channel(TARGET, config=client_config())
        try:
            return getattr(plain, shape)("/shmgrpc.test/Signature"), getattr(wrapped, shape)("/shmgrpc.test/Signature")
        finally:
            await plain.close()
            await wrapped.close()

    plain, wrapped = grpc.insecure_channel(TARGET), shmgrpc.insecure_channel(TARGET, config=client_config())
    try:
        pairs = [("sync", getattr(plain, shape)("/shmgrpc.test/Signature"),
                  getattr(wrapped, shape)("/shmgrpc.test/Signature"))]
    finally:
        plain.close()
        wrapped.close()
    pairs.append(("aio", *asyncio.run(aio_pair())))
    for api, theirs, ours in pairs:
        for name in ("__call__", "with_call", "future"):
            if hasattr(theirs, name):
                assert described(getattr(ours, name)) == described(getattr(theirs, name)), (
                    f"{api} {shape}.{name}: shmgrpc takes other arguments than grpc\n"
                    f"  grpc:    {inspect.signature(getattr(theirs, name))}\n"
                    f"  shmgrpc: {inspect.signature(getattr(ours, name))}"
                )


# --- behaviour: what reaches grpc's function -------------------------------------------------


class Recorder:
    """Stands in for a grpc channel function, as OpenTelemetry's instrumentors
    do: records how it was called, adds an interceptor of its own to the
    keyword arguments (GrpcAioInstrumentorClient._add_interceptors), calls
    the real function."""

    def __init__(self, original, add_interceptor=None):
        self.original = original
        self.add_interceptor = add_interceptor
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, dict(kwargs)))
        if self.add_interceptor is not None:
            kwargs["interceptors"] = [self.add_interceptor, *(kwargs.get("interceptors") or ())]
        return self.original(*args, **kwargs)


class AioUnaryNoop(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(details, request)


def _check_keywords(recorder: Recorder, positional: int, expected: dict) -> None:
    assert len(recorder.calls) == 1, recorder.calls
    args, kwargs = recorder.calls[0]
    assert len(args) <= positional, (
        f"grpc's function got {len(args)} positional arguments {args!r}: "
        f"only the first {positional} may be positional, the rest by keyword"
    )
    for key, value in expected.items():
        assert key in kwargs, f"{key} not passed by keyword: args {args!r}, kwargs {kwargs!r}"
        assert kwargs[key] == value, f"{key}: {kwargs[key]!r} != {value!r}"


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_aio_insecure_channel_under_an_otel_like_patch(monkeypatch, how):
    """grpc.aio.insecure_channel patched as GrpcAioInstrumentorClient patches
    it: shmgrpc.aio.insecure_channel must hand it `interceptors` (and the
    rest) by keyword, and the application's interceptors arrive."""
    otel_like, mine = AioUnaryNoop(), AioUnaryNoop()
    recorder = Recorder(grpc.aio.insecure_channel, add_interceptor=otel_like)
    monkeypatch.setattr(grpc.aio, "insecure_channel", recorder)

    async def main():
        if how == "positional":
            channel = shmgrpc.aio.insecure_channel(TARGET, OPTIONS, grpc.Compression.Gzip, [mine],
                                                   config=client_config())
        else:
            channel = shmgrpc.aio.insecure_channel(target=TARGET, options=OPTIONS, compression=grpc.Compression.Gzip,
                                                   interceptors=[mine], config=client_config())
        await channel.close()

    asyncio.run(main())
    _check_keywords(recorder, 1, {"options": OPTIONS, "compression": grpc.Compression.Gzip, "interceptors": [mine]})


def test_aio_channel_without_interceptors_under_an_otel_like_patch(monkeypatch):
    recorder = Recorder(grpc.aio.insecure_channel, add_interceptor=AioUnaryNoop())
    monkeypatch.setattr(grpc.aio, "insecure_channel", recorder)

    async def main():
        channel = shmgrpc.aio.insecure_channel(TARGET, OPTIONS, config=client_config())
        await channel.close()

    asyncio.run(main())
    _check_keywords(recorder, 1, {"options": OPTIONS})
    assert not recorder.calls[0][1].get("interceptors"), recorder.calls


def test_aio_secure_channel_under_an_otel_like_patch(monkeypatch):
    otel_like, mine = AioUnaryNoop(), AioUnaryNoop()
    recorder = Recorder(grpc.aio.secure_channel, add_interceptor=otel_like)
    monkeypatch.setattr(grpc.aio, "secure_channel", recorder)
    credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)

    async def main():
        channel = shmgrpc.aio.secure_channel(TARGET, credentials, OPTIONS, None, [mine], config=client_config())
        await channel.close()

    asyncio.run(main())
    _check_keywords(recorder, 2, {"options": OPTIONS, "interceptors": [mine]})


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_sync_channels_call_grpc_by_keyword(monkeypatch, how):
    """GrpcInstrumentorClient wraps grpc.insecure_channel / secure_channel;
    shmgrpc's functions hand them options and compression by keyword."""
    insecure = Recorder(grpc.insecure_channel)
    secure = Recorder(grpc.secure_channel)
    monkeypatch.setattr(grpc, "insecure_channel", insecure)
    monkeypatch.setattr(grpc, "secure_channel", secure)
    credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)
    if how == "positional":
        channels = [shmgrpc.insecure_channel(TARGET, OPTIONS, grpc.Compression.Gzip, config=client_config()),
                    shmgrpc.secure_channel(TARGET, credentials, OPTIONS, grpc.Compression.Gzip,
                                           config=client_config())]
    else:
        channels = [shmgrpc.insecure_channel(target=TARGET, options=OPTIONS, compression=grpc.Compression.Gzip,
                                             config=client_config()),
                    shmgrpc.secure_channel(target=TARGET, credentials=credentials, options=OPTIONS,
                                           compression=grpc.Compression.Gzip, config=client_config())]
    for channel in channels:
        channel.close()
    _check_keywords(insecure, 1, {"options": OPTIONS, "compression": grpc.Compression.Gzip})
    _check_keywords(secure, 2, {"options": OPTIONS, "compression": grpc.Compression.Gzip})


def test_sync_channel_under_the_real_grpc_instrumentor_shape(monkeypatch):
    """What GrpcInstrumentorClient returns from grpc.insecure_channel is an
    intercepted channel, not grpc's: shmgrpc.insecure_channel wraps it."""
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    original = grpc.insecure_channel

    def instrumented(*args, **kwargs):  # GrpcInstrumentorClient.wrapper_fn, minus wrapt
        return intercept_channel(original(*args, **kwargs), client_interceptor())

    monkeypatch.setattr(grpc, "insecure_channel", instrumented)
    channel = shmgrpc.insecure_channel(TARGET, OPTIONS, config=client_config())
    try:
        assert isinstance(channel, grpc.Channel)
    finally:
        channel.close()


# --- options where the Config goes ---------------------------------------------------------------


def test_sync_intercept_channel_options_in_place_of_config():
    raw = grpc.insecure_channel(TARGET, OPTIONS)
    try:
        with pytest.raises(TypeError) as info:
            shmgrpc.intercept_channel(raw, OPTIONS)
    finally:
        raw.close()
    message = str(info.value)
    assert "list" in message, f"the TypeError does not say what was given: {message!r}"
    assert "Config" in message, f"the TypeError does not say what is expected: {message!r}"


def test_aio_intercept_channel_options_in_place_of_config():
    async def main():
        raw = grpc.aio.insecure_channel(TARGET, OPTIONS)
        try:
            with pytest.raises(TypeError) as info:
                shmgrpc.aio.intercept_channel(raw, OPTIONS)
        finally:
            await raw.close()
        return str(info.value)

    message = asyncio.run(main())
    assert "list" in message, f"the TypeError does not say what was given: {message!r}"
    assert "Config" in message, f"the TypeError does not say what is expected: {message!r}"
