"""Proof that offloaded bytes do not cross the socket.

The channel goes through a loopback TCP proxy that counts every byte it moves.
A 16 MiB unary echo costs the socket well under 1 MiB with shmgrpc, and more
than the 32 MiB of both messages with offload off. If offload silently stops
(a handshake that no longer succeeds, a threshold read wrongly, a handle sent
inline), the first assertion goes red.
"""

from __future__ import annotations

import pytest

from tests.conftest import CALL_TIMEOUT, MiB, client_config, counts, delta, payload_of_size

SIZE = 16 * MiB


def echo_through_proxy(make_client, proxy, config):
    client = make_client(proxy.address, config)
    request = payload_of_size(SIZE, seq=5)
    response = client.stub.Unary(request, timeout=CALL_TIMEOUT)
    assert response.body == request.body
    return client


def test_offloaded_bytes_stay_off_the_socket(make_client, tcp_proxy, echo_server, transport):
    before = echo_server.stats()["shmgrpc"]
    proxy = tcp_proxy(echo_server.tcp_port)
    client = echo_through_proxy(make_client, proxy, client_config(transport))

    assert proxy.connections == 1  # the call really went through the proxy
    assert proxy.upstream < 1 * MiB, f"{proxy.upstream} bytes went client -> server"
    assert proxy.downstream < 1 * MiB, f"{proxy.downstream} bytes went server -> client"
    assert counts(client.stats(), transport) == (1, 1)
    after = echo_server.stats()["shmgrpc"]
    assert delta(after, before, "by_transport", transport, "restored", "bytes") == SIZE
    assert delta(after, before, "by_transport", transport, "offloaded", "count") == 1


@pytest.mark.parametrize("side", ["client", "server"])
def test_offload_off_sends_everything_through_the_socket(make_client, tcp_proxy, servers, side):
    """The same call with SHMGRPC_TRANSPORT=off on one side: the bytes are
    counted, so the proxy would see offloaded bytes if there were any."""
    if side == "client":
        server = servers.shared({"SHMGRPC_TRANSPORT": "shm"})
        config = client_config("off")
    else:
        server = servers.shared({"SHMGRPC_TRANSPORT": "off"})
        config = client_config("shm")
    proxy = tcp_proxy(server.tcp_port)
    client = echo_through_proxy(make_client, proxy, config)

    assert proxy.upstream > SIZE and proxy.downstream > SIZE
    assert proxy.total > 32 * MiB
    stats = client.stats()
    assert stats["offloaded"]["count"] == 0 and stats["restored"]["count"] == 0
