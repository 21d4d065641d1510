"""Handles that are malformed, forged, stale or too long get a precise status
and a message naming the problem, and the server keeps serving.

The client performs a real handshake first, then sends raw bytes through a
generic method on the same connection, with the hello its engine would send:
to the server this is a framed call (its hello names the server) from a
proven co-located peer that sends a bad handle. A handle is a frame (see
shmgrpc/wire.py): wire.PREFIX, a varint body length, the body.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import subprocess
import sys

import grpc
import pytest

from protos import echo_test_pb2 as pb
from shmgrpc import wire
from shmgrpc.transports import _layout as layout
from shmgrpc.transports import _pins as pins
from shmgrpc.transports import _pool as pool
from shmgrpc import shmdir
from shmgrpc._core import Route
from shmgrpc.errors import HandleError
from tests.conftest import (
    CALL_TIMEOUT,
    SHM_DIR,
    MiB,
    client_config,
    delta,
    read_line,
    spawn,
    stop_process,
    suite_env,
)
from tests.echo_server import pattern

UNARY = "/shmgrpc.testing.v1.Echo/Unary"
MAX_MESSAGE = 8 * MiB  # the server's SHMGRPC_MAX_MESSAGE here
SECRET = b"THIRD-PARTY-SECRET:" + bytes(range(256)) * 4  # known bytes at a known address

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DATA_LOSS = grpc.StatusCode.DATA_LOSS
TOO_LONG = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def strict_server(servers):
    """Both transports enabled, and a receive limit of 8 MiB."""
    return servers.shared(suite_env("auto", MAX_MESSAGE=str(MAX_MESSAGE)))


class Raw:
    """Raw bytes on a framed call of a channel whose engine has shaken hands
    with the server."""

    def __init__(self, client):
        self.client = client
        reply = client.stub.Unary(pb.Payload(seq=1, body=b"hi"), timeout=CALL_TIMEOUT)  # the handshake
        self.server_pid = reply.server_pid
        self.engine = client.engine
        state = self.engine.client.call_state()
        assert state is not None
        self.hello, self.route = state  # the hello metadata pair, the route it names
        assert self.route is not None and self.route.framed
        assert self.route.sends("shm") and self.route.sends("cma")  # both transports proven
        # bytes in, bytes out: no shmgrpc codec on this side
        self._call = client.raw_channel.unary_unary(UNARY)

    def send(self, raw: bytes, metadata=None):
        """(response bytes, None) or (None, RpcError). The hello goes with it
        unless `metadata` says otherwise."""
        try:
            return self._call(raw, metadata=[self.hello] if metadata is None else metadata,
                              timeout=CALL_TIMEOUT), None
        except grpc.RpcError as err:
            return None, err

    def refused(self, raw: bytes, code, *words: str) -> grpc.RpcError:
        response, err = self.send(raw)
        assert err is not None, f"handle was accepted: {response[:64]!r}"
        assert err.code() == code, (err.code(), err.details())
        details = err.details()
        assert details.startswith("shmgrpc: ")
        for word in words:
            assert word in details, f"{word!r} not in {details!r}"
        return err

    # handles of this client's own making

    def shm_slot_and_ticket(self, data: bytes):
        """A real, published slot of the client's pool holding `data`, and
        the ticket that releases it."""
        peer = self.route.peer
        slot, reason = self.engine.node.transports["shm"].slots.get_pool().alloc(len(data), (peer.pid, peer.start))
        assert slot is not None, reason
        slot.segment.mm[slot.offset : slot.offset + len(data)] = data
        pool.Pool.publish(slot)
        return slot.handle(), pool.Ticket(slot, slot.generation)

    def shm_slot(self, message: pb.Payload) -> wire.ShmHandle:
        return self.shm_slot_and_ticket(message.SerializeToString())[0]

    def cma_pin_and_ticket(self, data: bytes):
        """A real pin of the client's, offered to the server, holding `data`,
        and the ticket that releases it."""
        peer = self.route.peer
        raw, ticket, reason = self.engine.node.transports["cma"].part.get_pins().pin(
            data, self.route.peer_key, peer.inst, (peer.pid, peer.start), os.getpid()
        )
        assert raw is not None, reason
        return wire.decode(raw), ticket

    def cma_pin(self, message: pb.Payload) -> wire.CmaHandle:
        return self.cma_pin_and_ticket(message.SerializeToString())[0]


@pytest.fixture
def raw(make_client, strict_server):
    return Raw(make_client(strict_server.unix_target, client_config("auto")))


def still_serving(raw: Raw) -> None:
    request = pb.Payload(seq=9, body=pattern(2 * MiB, 9))
    assert raw.client.stub.Unary(request, timeout=CALL_TIMEOUT).body == request.body


def common(
    magic: bytes = wire.MAGIC, kind: int = wire.KIND_SHM, length: int = 100, token: bytes = bytes(16)
) -> bytes:
    return wire._COMMON.pack(magic, kind, 0, length, token)


# --- the genuine article first: the raw path itself works ----------------------------------


def genuine(raw: Raw, kind: str, data: bytes):
    """(encoded handle, ticket) of a real slot or pin holding `data`."""
    if kind == "shm":
        handle, ticket = raw.shm_slot_and_ticket(data)
        return wire.encode_shm(handle), ticket
    handle, ticket = raw.cma_pin_and_ticket(data)
    return wire.encode_cma(handle), ticket


@pytest.mark.parametrize("kind", ["shm", "cma"])
def test_genuine_request_handles_are_read_again_until_released(raw, kind):
    """A request handle may be read again while its sender holds it (gRPC
    retries resend the same bytes); once the sender lets go of it (its call
    ended), a replay is refused, never answered with other bytes."""
    body = f"via {kind}".encode()
    encoded, ticket = genuine(raw, kind, pb.Payload(seq=5, body=body).SerializeToString())
    for _ in range(2):  # the read, and a re-read of the acknowledged slot or pin
        response, err = raw.send(encoded)
        assert err is None, err
        assert pb.Payload.FromString(response).body == body
    raw.engine.release(ticket)
    raw.refused(encoded, DATA_LOSS, "was reused")  # a freed slot or pin has a new generation
    still_serving(raw)


def test_response_handles_are_single_use(raw):
    """The reading side of a response: restore(reread=False), as the client
    reads responses, accepts a handle once; restore(reread=True), as a server
    reads requests, accepts it again. (In process: the engine reads a slot of
    its own node, offered to itself.)"""
    engine = raw.engine
    identity = engine.node.identity
    me = engine.node.peer(identity.inst, identity.name)
    route = Route(peer=me, via=("shm",))
    data = pb.Payload(seq=6, body=b"response").SerializeToString()
    slot, reason = engine.node.transports["shm"].slots.get_pool().alloc(len(data), (me.pid, me.start))
    assert slot is not None, reason
    slot.segment.mm[slot.offset : slot.offset + len(data)] = data
    pool.Pool.publish(slot)
    encoded = wire.encode_shm(slot.handle())
    assert engine.restore(encoded, route, pb.Payload.FromString).body == b"response"
    with pytest.raises(HandleError, match="single-use"):
        engine.restore(encoded, route, pb.Payload.FromString)
    assert engine.restore(encoded, route, pb.Payload.FromString, reread=True).body == b"response"
    engine.release(pool.Ticket(slot, slot.generation))


def test_frames_are_read_only_on_framed_calls(raw):
    """A genuine handle sent without the hello (a call that is not framed) is
    handed to the application's deserializer like any bytes: protobuf refuses
    it, as gRPC refuses any unparsable request. The slot is not touched: the
    same handle then works on a framed call."""
    handle = raw.shm_slot(pb.Payload(seq=7, body=b"unframed"))
    encoded = wire.encode_shm(handle)
    response, err = raw.send(encoded, metadata=())
    assert err is not None, f"a frame was read on a call without hello: {response!r}"
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "Exception deserializing request!"
    response, err = raw.send(encoded)
    assert err is None, err
    assert pb.Payload.FromString(response).body == b"unframed"
    still_serving(raw)


def test_escaped_message_is_delivered_without_its_escape(raw):
    """On a framed call, wire.ESCAPE + bytes means those bytes (a message that
    merely begins like a frame is sent that way)."""
    message = pb.Payload(seq=8, body=b"escaped")
    response, err = raw.send(wire.ESCAPE + message.SerializeToString())
    assert err is None, err
    assert pb.Payload.FromString(response).body == b"escaped"
    # and escaping is the sender's job only when needed
    assert wire.escape(message.SerializeToString()) == message.SerializeToString()
    assert wire.escape(wire.PREFIX + b"x") == wire.ESCAPE + wire.PREFIX + b"x"


@pytest.mark.parametrize("kind", ["shm", "cma"])
def test_restored_request_the_application_cannot_parse(raw, kind):
    """Bytes that arrive through a handle but do not parse fail exactly as
    the same bytes inline do: gRPC's own INTERNAL, no shmgrpc error."""
    garbage = b"\xff" * 100_000  # field 0x1fffff..., an invalid protobuf tag
    inline_response, inline_err = raw.send(garbage)
    assert inline_err is not None, inline_response
    encoded, _ = genuine(raw, kind, garbage)
    response, err = raw.send(encoded)
    assert err is not None, response
    assert (err.code(), err.details()) == (inline_err.code(), inline_err.details())
    assert err.code() == grpc.StatusCode.INTERNAL and err.details() == "Exception deserializing request!"
    still_serving(raw)


# --- malformed ---------------------------------------------------------------------------

MALFORMED = {
    "too short": (wire.frame(b"\x00" * 10), "shorter than its header"),
    "bad length prefix": (wire.PREFIX + b"\xff\xff\xff", "bad length prefix"),
    "length prefix lies": (wire.PREFIX + b"\x40" + common(), "length prefix says 64 bytes, 32 follow"),
    "bad magic": (wire.frame(common(magic=b"EVIL") + bytes(40)), "bad magic"),
    "unknown kind": (wire.frame(common(kind=7) + bytes(40)), "unknown kind 7"),
    "truncated shm part": (wire.frame(common() + bytes(10)), "truncated"),
    "name length mismatch": (
        wire.frame(common() + wire._SHM.pack(1, 4096, 0, 60) + b"shmgrpc-1-2-0123456789abcdef-1"),
        "name length 60 does not match",
    ),
    "cma iovec count": (
        wire.frame(common(kind=wire.KIND_CMA) + wire._CMA.pack(1, 1, 0, 0, bytes(16), 0)),
        "0 iovecs",
    ),
    "cma iovecs disagree with length": (
        wire.frame(
            common(kind=wire.KIND_CMA, length=100)
            + wire._CMA.pack(1, 1, 0, 0, bytes(16), 1)
            + wire._IOV.pack(4096, 99)
        ),
        "iovecs add up to 99 bytes, length says 100",
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_handles(raw, case):
    data, words = MALFORMED[case]
    assert wire.is_frame(data) and not wire.escaped(data)  # a handle, as the server reads it
    raw.refused(data, INVALID, "malformed" if case != "length prefix lies" else "", words)
    still_serving(raw)


# --- shm: names, bounds, tokens -------------------------------------------------------------


def shm(raw: Raw, **changes) -> bytes:
    handle = raw.shm_slot(pb.Payload(seq=3, body=pattern(1000, 3)))
    return wire.encode_shm(dataclasses.replace(handle, **changes))


def test_shm_segment_name_outside_the_prefix(raw):
    for name in (
        "evil-segment",
        "shmgrpc-1-2-0123456789abcdef-../../etc/passwd",
        "shmgrpc-1-2-0123456789ABCDEF-1",
    ):
        raw.refused(shm(raw, name=name), INVALID, "not a shmgrpc segment")
    still_serving(raw)


def test_shm_segment_that_does_not_exist(raw):
    raw.refused(shm(raw, name="shmgrpc-1-1-0123456789abcdef-1"), DATA_LOSS, "does not exist")
    still_serving(raw)


def test_shm_out_of_bounds(raw):
    raw.refused(shm(raw, slot=10_000), INVALID, "slot 10000 is outside segment")
    handle = raw.shm_slot(pb.Payload(body=b"x" * 100))
    raw.refused(
        wire.encode_shm(dataclasses.replace(handle, offset=handle.offset + 1)), INVALID, "outside slot"
    )
    raw.refused(wire.encode_shm(dataclasses.replace(handle, offset=0)), INVALID, "outside slot")
    raw.refused(wire.encode_shm(dataclasses.replace(handle, length=1 * MiB)), INVALID, "outside slot")
    still_serving(raw)


def test_shm_wrong_token_and_stale_generation(raw):
    raw.refused(shm(raw, token=b"\x01" * 16), INVALID, "token mismatch")
    err = raw.refused(shm(raw, generation=999), DATA_LOSS, "was reused", "generation")
    assert "999" in err.details()
    still_serving(raw)


def test_shm_length_over_the_receivers_limit(raw):
    raw.refused(shm(raw, length=MAX_MESSAGE + 1), TOO_LONG, f"at most {MAX_MESSAGE}", "SHMGRPC_MAX_MESSAGE")
    still_serving(raw)


def test_shm_segment_with_loose_mode_or_foreign_header(raw):
    """Files of the right name that shmgrpc did not make are refused."""
    base = shmdir.new_base_name()
    loose, foreign = f"{base}-90001", f"{base}-90002"
    paths = [os.path.join(SHM_DIR, n) for n in (loose, foreign)]
    try:
        for path, mode in zip(paths, (0o644, 0o600)):
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
            os.fchmod(fd, mode)
            os.write(fd, b"NOTASEGMENT" * 1000)
            os.close(fd)
        raw.refused(shm(raw, name=loose), INVALID, loose, "mode 0644")
        raw.refused(shm(raw, name=foreign), INVALID, foreign, "corrupt or foreign header")
    finally:
        for path in paths:
            os.unlink(path)
    still_serving(raw)


# A third process with an engine of its own: it publishes a slot of its pool
# and keeps SECRET at a known address; it prints where, and exits at EOF.
THIRD = """
import ctypes, json, os, sys
from protos import echo_test_pb2 as pb
from shmgrpc import Config, wire
from shmgrpc.transports import _pool as pool
from shmgrpc import shmdir
from shmgrpc._core import Engine
secret = bytes.fromhex(sys.argv[1])
reader_pid = int(sys.argv[2])
engine = Engine(Config.from_env({"SHMGRPC_TRANSPORT": "shm"}), "client")
assert engine.ready()
data = pb.Payload(seq=1, body=secret).SerializeToString()
slot, reason = engine.node.transports["shm"].slots.get_pool().alloc(len(data), (reader_pid, shmdir.process_start(reader_pid)))
assert slot is not None, reason
slot.segment.mm[slot.offset:slot.offset + len(data)] = data
pool.Pool.publish(slot)
held = ctypes.create_string_buffer(secret, len(secret))
print(json.dumps({"pid": os.getpid(), "shm": wire.encode_shm(slot.handle()).hex(),
                  "addr": ctypes.addressof(held), "len": len(secret)}), flush=True)
sys.stdin.read()
engine.close()
print("{}")
"""


@pytest.fixture
def third(raw):
    proc = spawn(
        [sys.executable, "-c", THIRD, SECRET.hex(), str(raw.server_pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    line = read_line(proc, 30)
    assert line, "the third process did not start"
    yield json.loads(line)
    proc.stdin.close()
    proc.wait(30)
    assert proc.returncode == 0
    stop_process(proc)


def assert_secret_absent(err: grpc.RpcError) -> None:
    text = (err.details() or "").encode("utf-8", "replace")
    assert b"THIRD-PARTY" not in text and SECRET[19:40] not in text
    assert SECRET.hex()[:40] not in err.details()


def test_shm_slot_of_another_process(raw, third):
    """A genuine slot, of a live shmgrpc process of our uid, that is not this
    call's peer: refused before a byte of it is parsed."""
    err = raw.refused(bytes.fromhex(third["shm"]), INVALID, "belongs to another shmgrpc instance")
    assert_secret_absent(err)
    still_serving(raw)


# --- cma: forged regions and entries ---------------------------------------------------------


def cma(raw: Raw, **changes) -> bytes:
    h = raw.cma_pin(pb.Payload(seq=4, body=pattern(1000, 4)))
    return wire.encode_cma(dataclasses.replace(h, **changes))


def test_cma_handle_naming_a_third_process(raw, third):
    h = raw.cma_pin(pb.Payload(seq=4, body=b"x"))
    forged = dataclasses.replace(
        h, pid=third["pid"], length=third["len"], iovecs=((third["addr"], third["len"]),)
    )
    err = raw.refused(wire.encode_cma(forged), INVALID, f"names pid {third['pid']}", "refused")
    assert_secret_absent(err)
    still_serving(raw)


def test_cma_forged_entry_in_the_peer(raw):
    """An entry of the right shape in the peer's own memory, pointing at bytes
    the peer wants the server to echo back, but not carrying the key the
    server issued: refused, and the bytes are never read."""
    held = ctypes.create_string_buffer(SECRET, len(SECRET))
    entry = ctypes.create_string_buffer(pins.ENTRY.size)
    token = os.urandom(16)
    pins.ENTRY.pack_into(
        entry, 0, pins.ENTRY_MAGIC, 1, layout.READY, len(SECRET), token, os.urandom(16), ctypes.addressof(held),
        bytes(16),
    )
    h = wire.CmaHandle(
        length=len(SECRET),
        token=token,
        generation=1,
        pid=os.getpid(),
        entry=0,
        entry_addr=ctypes.addressof(entry),
        receiver=raw.route.peer.inst,
        iovecs=((ctypes.addressof(held), len(SECRET)),),
    )
    err = raw.refused(wire.encode_cma(h), INVALID, "does not carry the key")
    assert_secret_absent(err)
    # the same with a random entry address: nothing there to read
    raw.refused(wire.encode_cma(dataclasses.replace(h, entry_addr=4096)), INVALID, "EFAULT")
    # and pointing the entry at arbitrary memory: not an entry
    raw.refused(
        wire.encode_cma(dataclasses.replace(h, entry_addr=ctypes.addressof(held))),
        INVALID,
        "not a shmgrpc pin entry",
    )
    still_serving(raw)


def test_cma_region_other_than_offered(raw):
    h = raw.cma_pin(pb.Payload(seq=4, body=pattern(10_000, 4)))
    ((addr, length),) = h.iovecs
    outside = dataclasses.replace(h, iovecs=((addr + 4096, length),))
    raw.refused(wire.encode_cma(outside), INVALID, "is not the region offered")
    h = raw.cma_pin(pb.Payload(seq=4, body=pattern(10_000, 4)))
    ((addr, length),) = h.iovecs
    longer = dataclasses.replace(h, length=length + 1, iovecs=((addr, length + 1),))
    raw.refused(wire.encode_cma(longer), INVALID, "is not the region offered")
    h = raw.cma_pin(pb.Payload(seq=4, body=pattern(10_000, 4)))
    ((addr, length),) = h.iovecs
    split = dataclasses.replace(h, iovecs=((addr, 10), (addr + 10, length - 10)))
    raw.refused(wire.encode_cma(split), INVALID, "is not the region offered")
    still_serving(raw)


def test_cma_wrong_token_generation_receiver_length(raw):
    raw.refused(cma(raw, token=b"\x02" * 16), INVALID, "token mismatch")
    raw.refused(cma(raw, generation=12345), DATA_LOSS, "was reused")
    err = raw.refused(
        cma(raw, receiver=b"\x03" * 16), grpc.StatusCode.FAILED_PRECONDITION, "another receiver"
    )
    assert (wire.RETRY_KEY, "inline") in tuple(err.trailing_metadata() or ())
    h = raw.cma_pin(pb.Payload(body=b"x"))
    too_long = dataclasses.replace(h, length=MAX_MESSAGE + 1, iovecs=((h.iovecs[0][0], MAX_MESSAGE + 1),))
    raw.refused(wire.encode_cma(too_long), TOO_LONG, "SHMGRPC_MAX_MESSAGE")
    still_serving(raw)


# --- every refusal is counted ------------------------------------------------------------------


def test_every_refused_handle_is_counted(raw, strict_server):
    """stats()["errors"] counts refused handles by error class, whatever
    stage refused them."""
    cases = [
        (MALFORMED["bad magic"][0], "HandleError"),
        (shm(raw, token=b"\x01" * 16), "HandleError"),
        (shm(raw, generation=999), "DataLossError"),
        (shm(raw, length=MAX_MESSAGE + 1), "HandleTooLarge"),
        (cma(raw, token=b"\x02" * 16), "HandleError"),
    ]
    for data, name in cases:
        before = strict_server.stats()["shmgrpc"]
        _, err = raw.send(data)
        assert err is not None
        after = strict_server.stats()["shmgrpc"]
        assert delta(after, before, "errors", name) == 1, (name, err.details(), after["errors"])
