"""The bytes that cross the socket in place of a message, and the handshake.

Pure: no grpc, no I/O. One decoder checks magic, kind, bounds and names and
raises HandleError, never struct.error or IndexError from deep inside.

A frame is what crosses the socket in place of a message's bytes, on a call
whose hello named a shmgrpc peer (a *framed* call; no other call is ever
read as a frame):

    PREFIX (4) | varint n | body (n bytes)      a handle; n >= 32
    PREFIX (4) | 0x00     | the message's bytes  a message that merely begins
                                                 with PREFIX, escaped

PREFIX is 07 fe 53 47. 0x07 is a protobuf tag with field number 0 and wire
type 7, both invalid, so no protobuf parser accepts a frame as a message;
0xfe never occurs in UTF-8, so text and JSON codecs refuse it too. A handle
that reaches a server without shmgrpc therefore fails to deserialize there
(INTERNAL) instead of parsing as an empty message. The escape makes framed
calls unambiguous for any codec: raw bytes that begin like a frame are sent
escaped and delivered untouched.

Handle body, little-endian, common part (32 bytes):

    offset size field
    0      4    magic       b"SGH1"
    4      1    kind        1 = shm, 2 = cma, 3 = memfd
    5      1    flags       FLAG_HOLDS (1): the sender keeps a slot its reader
                            marks HELD until that reader acknowledges it or is
                            gone, so the reader may keep a view of it (a
                            buffer_deserializer's memoryview). Zero from 0.3
                            and older senders, whose readers ignore the byte.
    6      2    reserved    zero
    8      8    length      payload bytes
    16     16   token       random per message; the slot / cma entry holds it too

shm part (kind 1):

    32     8    generation  slot generation when it was written
    40     8    offset      first payload byte inside the segment
    48     4    slot        slot index inside the segment
    52     1    n           length of the segment name
    53     n    name        segment name, ASCII, "shmgrpc-..." (see shmdir.py)

memfd part (kind 3): a slot of a segment whose descriptor the sender passed
over the side connection (see side.py) before sending this handle:

    32     8    generation  slot generation when it was written
    40     8    offset      first payload byte inside the segment
    48     4    slot        slot index inside the segment
    52     4    segment     the sender's segment number on that connection

cma part (kind 2):

    32     8    generation  entry generation when it was pinned
    40     4    pid         the sender's pid
    44     4    entry       index of the sender's pin entry
    48     8    entry_addr  address of that 64-byte entry in the sender
    56     16   receiver    instance id of the receiver the bytes were offered to
    72     2    k           number of iovecs, 1..MAX_IOVECS
    74     16k  iovecs      (address u64, length u64) each, in the sender
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

from .errors import HandleError

PREFIX = b"\x07\xfeSG"  # field 0 + wire type 7 (invalid protobuf), 0xfe (invalid UTF-8), "SG"
ESCAPE = PREFIX + b"\x00"  # a body length of 0: the message itself follows
MAGIC = b"SGH1"
KIND_SHM = 1
KIND_CMA = 2
KIND_MEMFD = 3
MAX_IOVECS = 16  # the sender offers one buffer today; room for scatter lists
MAX_NAME = 100  # segment names are ~50 characters; anything longer is forged

_COMMON = struct.Struct("<4sBB2xQ16s")
FLAG_HOLDS = 1
_SHM = struct.Struct("<QQIB")
_CMA = struct.Struct("<QIIQ16sH")
_MEMFD = struct.Struct("<QQII")
_IOV = struct.Struct("<QQ")

# Segment names: shmgrpc-<pid>-<start ticks>-<16 hex random>-<id | counter>.
NAME_PREFIX = "shmgrpc-"
NAME_RE = re.compile(r"^shmgrpc-(\d{1,10})-(\d{1,20})-([0-9a-f]{16})-(id|\d{1,10})$")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


MAX_BODY = _CMA.size + _COMMON.size + MAX_IOVECS * _IOV.size + MAX_NAME
MAX_HANDLE = len(PREFIX) + 2 + MAX_BODY  # body length fits a 2-byte varint


@dataclass(frozen=True)
class ShmHandle:
    length: int
    token: bytes
    generation: int
    offset: int
    slot: int
    name: str
    flags: int = 0


@dataclass(frozen=True)
class MemfdHandle:
    length: int
    token: bytes
    generation: int
    offset: int
    slot: int
    segment: int
    flags: int = 0


@dataclass(frozen=True)
class CmaHandle:
    length: int
    token: bytes
    generation: int
    pid: int
    entry: int
    entry_addr: int
    receiver: bytes
    iovecs: Tuple[Tuple[int, int], ...]
    flags: int = 0


def frame(body: bytes) -> bytes:
    """A handle body framed: what crosses the socket instead of the message."""
    return PREFIX + _varint(len(body)) + body


def escape(data):
    """`data` as sent on a framed call when it is not offloaded: unchanged,
    unless it begins like a frame (then ESCAPE + data, read back by unescape)."""
    if data[: len(PREFIX)] == PREFIX:
        return ESCAPE + bytes(data)
    return data


def is_frame(data) -> bool:
    """On a framed call: is this message a frame (a handle or an escape)?"""
    return data[: len(PREFIX)] == PREFIX


def escaped(data) -> bool:
    """Is this frame an escaped message rather than a handle?"""
    return data[: len(ESCAPE)] == ESCAPE


def encode_shm(h: ShmHandle) -> bytes:
    name = h.name.encode("ascii")
    body = (
        _COMMON.pack(MAGIC, KIND_SHM, h.flags, h.length, h.token)
        + _SHM.pack(h.generation, h.offset, h.slot, len(name))
        + name
    )
    return frame(body)


def encode_memfd(h: MemfdHandle) -> bytes:
    return frame(
        _COMMON.pack(MAGIC, KIND_MEMFD, h.flags, h.length, h.token) + _MEMFD.pack(h.generation, h.offset, h.slot, h.segment)
    )


def encode_cma(h: CmaHandle) -> bytes:
    body = [
        _COMMON.pack(MAGIC, KIND_CMA, h.flags, h.length, h.token),
        _CMA.pack(h.generation, h.pid, h.entry, h.entry_addr, h.receiver, len(h.iovecs)),
    ]
    body.extend(_IOV.pack(addr, size) for addr, size in h.iovecs)
    return frame(b"".join(body))


def decode(data) -> "ShmHandle | CmaHandle | MemfdHandle":
    """Parse a handle from the raw bytes of a message; HandleError if malformed."""
    data = bytes(data[:MAX_HANDLE + 1])
    if len(data) > MAX_HANDLE:
        raise HandleError(f"malformed handle: longer than {MAX_HANDLE} bytes")
    if not data.startswith(PREFIX):
        raise HandleError("not a shmgrpc handle: missing the frame prefix")
    pos = len(PREFIX)
    body_len, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 14:
            raise HandleError("malformed handle: bad length prefix")
        byte = data[pos]
        pos += 1
        body_len |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    body = data[pos:]
    if len(body) != body_len:
        raise HandleError(
            f"malformed handle: length prefix says {body_len} bytes, {len(body)} follow"
        )
    if len(body) < _COMMON.size:
        raise HandleError(f"malformed handle: {len(body)} bytes is shorter than its header")
    magic, kind, flags, length, token = _COMMON.unpack_from(body, 0)
    if magic != MAGIC:
        raise HandleError(f"malformed handle: bad magic {magic!r}")
    if kind == KIND_SHM:
        return _decode_shm(body, length, token, flags)
    if kind == KIND_CMA:
        return _decode_cma(body, length, token, flags)
    if kind == KIND_MEMFD:
        if len(body) != _COMMON.size + _MEMFD.size:
            raise HandleError("malformed memfd handle: wrong size")
        generation, offset, slot, segment = _MEMFD.unpack_from(body, _COMMON.size)
        return MemfdHandle(length, token, generation, offset, slot, segment, flags)
    raise HandleError(f"malformed handle: unknown kind {kind}")


def _decode_shm(body: bytes, length: int, token: bytes, flags: int) -> ShmHandle:
    end = _COMMON.size + _SHM.size
    if len(body) < end:
        raise HandleError("malformed shm handle: truncated")
    generation, offset, slot, name_len = _SHM.unpack_from(body, _COMMON.size)
    if len(body) != end + name_len:
        raise HandleError(f"malformed shm handle: name length {name_len} does not match")
    try:
        name = body[end:].decode("ascii")
    except UnicodeDecodeError:
        raise HandleError("malformed shm handle: segment name is not ASCII") from None
    if not NAME_RE.match(name):
        raise HandleError(f"shm handle names {name!r}, which is not a shmgrpc segment")
    return ShmHandle(length, token, generation, offset, slot, name, flags)


def _decode_cma(body: bytes, length: int, token: bytes, flags: int) -> CmaHandle:
    end = _COMMON.size + _CMA.size
    if len(body) < end:
        raise HandleError("malformed cma handle: truncated")
    generation, pid, entry, entry_addr, receiver, count = _CMA.unpack_from(body, _COMMON.size)
    if not 1 <= count <= MAX_IOVECS or len(body) != end + count * _IOV.size:
        raise HandleError(f"malformed cma handle: {count} iovecs do not match its size")
    iovecs = tuple(_IOV.unpack_from(body, end + i * _IOV.size) for i in range(count))
    if sum(size for _, size in iovecs) != length:
        raise HandleError(
            f"malformed cma handle: iovecs add up to {sum(s for _, s in iovecs)} bytes, "
            f"length says {length}"
        )
    if pid <= 0:
        raise HandleError(f"malformed cma handle: pid {pid}")
    return CmaHandle(length, token, generation, pid, entry, entry_addr, receiver, iovecs, flags)


# --- handshake metadata -----------------------------------------------------
# Values are short ASCII, space separated, "-" for an empty field. Version 2
# (version 1 carried handles as a protobuf field; the two do not interoperate,
# and a peer of the other version is treated as one without shmgrpc).
#
# client -> server, on every call, key HELLO_KEY:
#     2 <client inst> <client id segment> <accepts> <server inst> <proof> <cma key> <max receive>
# server -> client, trailing metadata, key WELCOME_KEY:
#     2 <server inst> <server id segment> <accepts> <proof> <cma key> <max receive> <side> <ticket>
#
# id segment: "-" when the sender has none (no usable shm directory).
# accepts: "s" the sender of this value reads the other side's shm segments,
# "c" it can read the other side's memory with process_vm_readv, "m" it
# takes memfd segments over a side connection ("-": none).
# side, ticket: where the server's side socket is ("@name" abstract, or a
# path) and the one-time ticket that lets this client in ("-": no memfd).
# proof: HMAC of the other side's id-segment secret: shows we opened it.
# cma key: what the other side must write beside cma payloads addressed to us.
# max receive: the largest message the sender of this value accepts as a
# handle (the smaller of its gRPC max_receive_message_length and its
# SHMGRPC_MAX_MESSAGE; -1 unlimited). The other side offloads nothing
# longer: such a message goes inline, where gRPC accepts it or refuses it
# exactly as it would without shmgrpc.
HELLO_KEY = "shmgrpc-hello"
WELCOME_KEY = "shmgrpc-welcome"
RETRY_KEY = "shmgrpc-retry"  # trailing metadata: resend this call inline
# The one extra round trip per channel: a client that has no route yet calls
# this method first (unary, empty request and response, the caller's own
# metadata and credentials beside the hello). A plain server answers
# UNIMPLEMENTED and the client stays plain.
HANDSHAKE_SERVICE = "shmgrpc.v1.Handshake"
HANDSHAKE_METHOD = f"/{HANDSHAKE_SERVICE}/Hello"
VERSION = "2"
UNLIMITED = -1

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_LIMIT = re.compile(r"^(-1|\d{1,19})$")


def metadata_value(metadata, key: str) -> Optional[str]:
    """The first value of `key` in gRPC metadata (pairs), or None."""
    for name, value in metadata or ():
        if name == key:
            return value
    return None


@dataclass(frozen=True)
class Hello:
    inst: bytes
    id_segment: str
    accepts: str
    server_inst: Optional[bytes]
    proof: Optional[bytes]
    cma_key: Optional[bytes]
    max_receive: int = UNLIMITED


@dataclass(frozen=True)
class Welcome:
    inst: bytes
    id_segment: str
    accepts: str
    proof: Optional[bytes]
    cma_key: Optional[bytes]
    max_receive: int = UNLIMITED
    side: Optional[str] = None
    ticket: Optional[bytes] = None


_SIDE = re.compile(r"^(@shmgrpc-\d{1,10}-[0-9a-f]{16}|/[^\s]{1,200}\.sock)$")


def _hex_or_dash(value: Optional[bytes]) -> str:
    return value.hex() if value else "-"


def _parse_hex(text: str, what: str) -> Optional[bytes]:
    if text == "-":
        return None
    if not _HEX32.match(text):
        raise HandleError(f"malformed handshake: {what} is not 32 hex digits")
    return bytes.fromhex(text)


def _parse_limit(text: str) -> int:
    if not _LIMIT.match(text):
        raise HandleError(f"malformed handshake: max receive {text[:20]!r} is not a byte count or -1")
    return int(text)


def _parse_id(inst: str, segment: str, accepts: str) -> Tuple[bytes, str, str]:
    ident = _parse_hex(inst, "instance id")
    if ident is None:
        raise HandleError("malformed handshake: no instance id")
    match = NAME_RE.match(segment)
    if segment != "-" and (not match or match.group(4) != "id"):
        raise HandleError(f"malformed handshake: {segment[:60]!r} is not a shmgrpc id segment")
    if accepts != "-" and not set(accepts) <= set("scm"):
        raise HandleError(f"malformed handshake: accepts {accepts!r}")
    return ident, segment, accepts.replace("-", "")


def _split(text: str, fields: int):
    parts = str(text).split(" ")
    if len(parts) != fields or parts[0] != VERSION:
        raise HandleError(f"unsupported handshake {str(text)[:40]!r}: expected version {VERSION}")
    return parts


def encode_hello(h: Hello) -> str:
    return " ".join(
        (
            VERSION,
            h.inst.hex(),
            h.id_segment,
            h.accepts or "-",
            _hex_or_dash(h.server_inst),
            _hex_or_dash(h.proof),
            _hex_or_dash(h.cma_key),
            str(h.max_receive),
        )
    )


def decode_hello(text: str) -> Hello:
    parts = _split(text, 8)
    inst, segment, accepts = _parse_id(parts[1], parts[2], parts[3])
    return Hello(
        inst,
        segment,
        accepts,
        _parse_hex(parts[4], "server instance"),
        _parse_hex(parts[5], "proof"),
        _parse_hex(parts[6], "cma key"),
        _parse_limit(parts[7]),
    )


def encode_welcome(w: Welcome) -> str:
    return " ".join(
        (
            VERSION,
            w.inst.hex(),
            w.id_segment,
            w.accepts or "-",
            _hex_or_dash(w.proof),
            _hex_or_dash(w.cma_key),
            str(w.max_receive),
            w.side or "-",
            _hex_or_dash(w.ticket),
        )
    )


def decode_welcome(text: str) -> Welcome:
    parts = _split(text, 9)
    inst, segment, accepts = _parse_id(parts[1], parts[2], parts[3])
    return Welcome(
        inst,
        segment,
        accepts,
        _parse_hex(parts[4], "proof"),
        _parse_hex(parts[5], "cma key"),
        _parse_limit(parts[6]),
        _parse_side(parts[7]),
        _parse_hex(parts[8], "ticket"),
    )


def _parse_side(text: str) -> Optional[str]:
    if text == "-":
        return None
    if not _SIDE.match(text) or ".." in text:
        raise HandleError(f"malformed handshake: side socket {text[:60]!r}")
    return text
