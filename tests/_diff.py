"""What the differential suite's processes share: payloads, codecs, how an
object is described (type and digest), which metadata keys count, and the
comparison of two observation records.

Imported by tests/diff_server.py and tests/diff_client.py in *plain* processes
too, so this module must never import shmgrpc: the baseline run of every
scenario is gRPC without shmgrpc anywhere in either process.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import struct
from typing import Any, Dict, Iterable, List, Optional

KiB = 1024
MiB = 1024 * KiB

# Lines the child processes print on stdout.
SERVER_READY = "diff-server ready "
CLIENT_READY = "diff-client ready "
RESULT = "diff-result "

# The metadata key every scenario call carries: the server files what it saw
# under this value, and the test fetches it back by the same value.
RID_KEY = "x-diff-rid"
AUTH_KEY = "authorization"
AUTH_VALUE = "Bearer x"

# Services and methods the diff server defines besides the generated Echo.
ECHO_SERVICE = "shmgrpc.testing.v1.Echo"
CODEC_SERVICE = "diff.Codec"
FLAKY_SERVICE = "diff.Flaky"
CONTROL_SERVICE = "diff.Control"

# Handle prefixes: the one shmgrpc used before (a protobuf tag of field
# 2^29-1, wire type 2, as the start of a message) and the current frame prefix.
OLD_HANDLE_PREFIX = b"\xfa\xff\xff\xff\x0f"
NEW_HANDLE_PREFIX = b"\x07\xfeSG"


# --- payloads -------------------------------------------------------------------


def blob(size: int, seed: int) -> bytes:
    """`size` pseudo-random bytes, the same for the same (size, seed)."""
    return random.Random(seed * 7919 + size).randbytes(size)


def text(size: int, seed: int) -> str:
    """`size` characters of hex: JSON-safe payload for the text codecs."""
    return blob((size + 1) // 2, seed).hex()[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


# --- codecs the custom-serializer scenarios use ------------------------------------


def json_encode(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def json_decode(data: bytes) -> Any:
    return json.loads(bytes(data))


_DICT_MAGIC = b"DCT1"
_LEN = struct.Struct("<I")


def dict_encode(obj: Dict[str, bytes]) -> bytes:
    """A small binary codec: str keys, bytes values, sorted, length-prefixed."""
    out = [_DICT_MAGIC]
    for key in sorted(obj):
        k, v = key.encode(), bytes(obj[key])
        out += [_LEN.pack(len(k)), k, _LEN.pack(len(v)), v]
    return b"".join(out)


def dict_decode(data: bytes) -> Dict[str, bytes]:
    data = bytes(data)
    if not data.startswith(_DICT_MAGIC):
        raise ValueError(f"dict codec: bad magic {data[:8]!r}")
    pos, out = len(_DICT_MAGIC), {}
    while pos < len(data):
        (n,) = _LEN.unpack_from(data, pos)
        key = data[pos + 4 : pos + 4 + n].decode()
        pos += 4 + n
        (n,) = _LEN.unpack_from(data, pos)
        out[key] = data[pos + 4 : pos + 4 + n]
        pos += 4 + n
    return out


class Box:
    """A non-protobuf wrapper around a message: what an application might
    pass to a channel whose request_serializer / response_deserializer are
    its own functions."""

    __slots__ = ("msg",)

    def __init__(self, msg):
        self.msg = msg

    @staticmethod
    def serialize(box: "Box") -> bytes:
        return box.msg.SerializeToString(deterministic=True)

    @staticmethod
    def parser(message_type):
        def parse(data: bytes) -> "Box":
            return Box(message_type.FromString(data))

        return parse


# --- describing what a party was handed ---------------------------------------------


def type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _canonical(obj: Any):
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"bytes": sha(obj), "len": len(obj)}
    return obj


def describe(obj: Any) -> Dict[str, Any]:
    """Type and digest of an object a party was handed, plus a few readable
    fields, so that a difference names more than two hashes."""
    out: Dict[str, Any] = {"type": type_name(obj)}
    if hasattr(obj, "DESCRIPTOR") and hasattr(obj, "SerializeToString"):
        data = obj.SerializeToString(deterministic=True)
        out.update(proto=obj.DESCRIPTOR.full_name, size=len(data), sha=sha(data))
        if obj.DESCRIPTOR.name == "Payload":
            out.update(seq=obj.seq, note=obj.note, body_len=len(obj.body), reply_size=obj.reply_size)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        out.update(size=len(obj), sha=sha(obj), head=bytes(obj[:8]).hex())
    elif isinstance(obj, Box):
        out["msg"] = describe(obj.msg)
    elif obj is None or isinstance(obj, (dict, list, tuple, str, int, float, bool)):
        canon = json.dumps(_canonical(obj), sort_keys=True)
        out.update(sha=sha(canon.encode()), size=len(canon))
        if isinstance(obj, dict):
            out["keys"] = sorted(str(k) for k in obj)
    # Anything else: the type alone (its repr would carry an address).
    return out


def grpc_own(key: str) -> bool:
    """Metadata gRPC itself adds (pseudo-headers, user-agent, grpc-*)."""
    return key.startswith((":", "grpc-")) or key in ("user-agent", "content-type", "te")


def metadata_keys(metadata: Optional[Iterable]) -> List[str]:
    """The keys of `metadata` (pairs or _Metadatum), sorted, duplicates kept,
    minus gRPC's own and minus nothing else."""
    keys = []
    for item in metadata or ():
        key = item[0] if isinstance(item, (tuple, list)) else getattr(item, "key", None)
        if key is None:
            key = item[0]
        if not grpc_own(key):
            keys.append(key)
    return sorted(keys)


def metadata_value(metadata: Optional[Iterable], key: str) -> Optional[str]:
    for item in metadata or ():
        k, v = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item.key, item.value)
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None


# --- comparing two observation records -------------------------------------------------


def _short(value: Any, limit: int = 300) -> str:
    text_ = json.dumps(value, sort_keys=True, default=str)
    return text_ if len(text_) <= limit else text_[:limit] + "..."


def _identity(item: Any) -> str:
    """What makes two list items "the same item" for alignment: a call's
    label, an event's name, method and site; anything else by value."""
    if isinstance(item, dict) and any(k in item for k in ("label", "method")):
        return json.dumps([item.get(k) for k in ("label", "name", "site", "method")], default=str)
    return json.dumps(item, sort_keys=True, default=str)


def differences(a: Any, b: Any, path: str = "") -> List[str]:
    """Every place where `a` (the baseline) and `b` (the shmgrpc run) differ,
    as "path: ...", in document order. Lists are aligned first (calls by
    label, events by name, site and method, other items by value), so an
    extra or missing item is reported as such instead of shifting every
    item after it."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in b:
                out.append(f"{sub}: present only in the baseline: {_short(a[key])}")
            elif key not in a:
                out.append(f"{sub}: present only in the shmgrpc run: {_short(b[key])}")
            else:
                out += differences(a[key], b[key], sub)
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = []
        matcher = difflib.SequenceMatcher(a=[_identity(x) for x in a], b=[_identity(y) for y in b], autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            pairs = min(i2 - i1, j2 - j1) if tag in ("equal", "replace") else 0
            for k in range(pairs):
                i, j = i1 + k, j1 + k
                out += differences(a[i], b[j], f"{path}[{i}]" if i == j else f"{path}[{i}~{j}]")
            for i in range(i1 + pairs, i2):
                out.append(f"{path}[{i}]: only in the baseline: {_short(a[i])}")
            for j in range(j1 + pairs, j2):
                out.append(f"{path}[+{j}]: only in the shmgrpc run: {_short(b[j])}")
        return out
    if a != b:
        return [f"{path}: baseline {_short(a)} != shmgrpc run {_short(b)}"]
    return []
