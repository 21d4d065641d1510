"""The modes the benchmark compares, one channel each, created once.

    grpc tcp     plain gRPC over loopback TCP
    grpc unix      plain gRPC over the unix socket: the baseline
    shmgrpc auto   a channel wrapped by shmgrpc, transport "auto" (what an
                   application gets by default: memfd where it works), unix socket
    shmgrpc shm    the same, transport "shm"
    shmgrpc cma    the same, transport "cma"

This module is the only place the client touches shmgrpc's channel wrapper;
it is all an application needs: build the channel with shmgrpc (with the same
options it would give grpc), use the stub.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grpc

import shmgrpc
from protos import blobstore_pb2_grpc

MiB = 1024 * 1024
MODES = ("tcp", "unix", "auto", "shm", "cma")  # --modes names, in table order
NAMES = {"tcp": "grpc tcp", "unix": "grpc unix", "auto": "shmgrpc auto", "shm": "shmgrpc shm", "cma": "shmgrpc cma"}
BASELINE = "grpc unix"


@dataclasses.dataclass
class Mode:
    name: str
    target: str
    channel: grpc.Channel  # a shmgrpc.Channel for the shmgrpc modes
    stub: blobstore_pb2_grpc.BlobStoreStub

    @property
    def offloads(self) -> bool:
        return isinstance(self.channel, shmgrpc.Channel)

    def stats(self) -> Optional[Dict[str, Any]]:
        """The channel's shmgrpc counters; None for a plain channel."""
        return self.channel.stats() if self.offloads else None

    def status(self) -> Optional[shmgrpc.ChannelStatus]:
        """Which transport carries the channel's large messages now, and why."""
        return shmgrpc.channel_status(self.channel) if self.offloads else None

    def close(self) -> None:
        self.channel.close()  # a shmgrpc.Channel closes its grpc channel and lets go of shared memory


def channel_options(max_message_mib: int) -> List[Tuple[str, int]]:
    limit = max_message_mib * MiB
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # gRPC shares one connection among channels with equal arguments
        # (the global subchannel pool). Each mode gets its own, so that no
        # mode's handshake or buffers help or hurt another's numbers.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def plain(name: str, target: str, max_message_mib: int) -> Mode:
    channel = grpc.insecure_channel(target, options=channel_options(max_message_mib))
    return Mode(name, target, channel, blobstore_pb2_grpc.BlobStoreStub(channel))


def offloading(name: str, target: str, transport: str, max_message_mib: int) -> Mode:
    # Other SHMGRPC_* settings (threshold, pool size) still come from the
    # environment; the transport is what this row is about. The options go to
    # shmgrpc too: it offloads nothing the channel's size limits would refuse.
    config = shmgrpc.Config.from_env(transport=transport)
    channel = shmgrpc.insecure_channel(target, options=channel_options(max_message_mib), config=config)
    return Mode(name, target, channel, blobstore_pb2_grpc.BlobStoreStub(channel))


def open_modes(
    target: str, tcp_target: Optional[str], wanted: Sequence[str], max_message_mib: int
) -> Tuple[List[Mode], List[str]]:
    """(modes, notes): notes say which wanted modes were skipped and why."""
    modes: List[Mode] = []
    notes: List[str] = []
    try:
        for key in MODES:
            if key not in wanted:
                continue
            if key == "tcp":
                if tcp_target:
                    modes.append(plain(NAMES[key], tcp_target, max_message_mib))
                else:
                    notes.append("grpc tcp skipped: no --tcp-target")
            elif key == "unix":
                modes.append(plain(NAMES[key], target, max_message_mib))
            else:
                modes.append(offloading(NAMES[key], target, key, max_message_mib))
    except BaseException:
        close_all(modes)
        raise
    return modes, notes


def close_all(modes: Sequence[Mode]) -> None:
    for mode in modes:
        mode.close()
