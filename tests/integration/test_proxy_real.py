"""Behind a load balancer, on real servers and sandboxes: the PROXY protocol
(v1 and v2) on a haproxy: listener and X-Forwarded-For from a trusted proxy
give every per-address limit and the token binding the visitor's address;
an untrusted peer's X-Forwarded-For is ignored."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import struct
import urllib.error

import pytest
from conftest import start_server
from console_client import TOKEN, ConsoleClient

# One console per address: a second one from the same visitor is refused.
ONE_PER_ADDRESS = ("per_address = 1\nper_address_per_minute = 100\n"
                   "pages_per_address_per_minute = 0\n")

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(visitor: str) -> bytes:
    """A PROXY protocol v1 header, as HAProxy's send-proxy writes it."""
    return f"PROXY TCP4 {visitor} 127.0.0.1 40000 80\r\n".encode()


def proxy_v2(visitor: str) -> bytes:
    """A PROXY protocol v2 header (PROXY command, TCP over IPv4), as
    HAProxy's send-proxy-v2 writes it."""
    addresses = (ipaddress.IPv4Address(visitor).packed + ipaddress.IPv4Address("127.0.0.1").packed
                 + struct.pack("!HH", 40000, 80))
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def proxied_socket(server, header: bytes) -> socket.socket:
    """A connection to ``server`` that has sent ``header`` in the clear and
    then starts TLS, as HAProxy's send-proxy with ssl does."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(header)
    return server.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1")


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def proxied_page(server, header: bytes) -> str:
    """The raw answer to GET /console/ sent through a PROXY header."""
    with proxied_socket(server, header) as sock:
        sock.sendall(f"GET /console/ HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        return read_response(sock).decode("utf-8", "replace")


def proxied_token(server, header: bytes) -> str:
    """A console token fetched through a PROXY header."""
    page = proxied_page(server, header)
    match = TOKEN.search(page)
    assert match, page[:300]
    return match.group(1)


class ProxiedConsole(ConsoleClient):
    """A console client whose connection starts with a PROXY header."""

    def __init__(self, server, header: bytes) -> None:
        super().__init__(server, sock=proxied_socket(server, header))


class ForwardedConsole(ConsoleClient):
    """A console client, connecting from ``source`` over TLS, that says
    (in X-Forwarded-For) it forwards ``visitor``."""

    def __init__(self, server, source: str, visitor: str) -> None:
        super().__init__(server, source=source, headers=[f"X-Forwarded-For: {visitor}"])


def forwarded_token(server, source: str, visitor: str) -> str:
    """A console token fetched from ``source`` with X-Forwarded-For ``visitor``
    (raises HTTPError when the page is refused)."""
    connection = http.client.HTTPSConnection(
        "127.0.0.1", server.port, timeout=10, context=server.ssl_context(),
        source_address=(source, 0))
    try:
        connection.request("GET", "/console/", headers={"X-Forwarded-For": visitor})
        response = connection.getresponse()
        page = response.read().decode()
    finally:
        connection.close()
    if response.status != 200:
        raise urllib.error.HTTPError("/console/", response.status, page[:200], {}, None)
    match = TOKEN.search(page)
    assert match, page[:300]
    return match.group(1)


def started(client: ConsoleClient, token: str) -> bool:
    """Log in with ``token``: whether a console prompt comes (else the
    server refused it and closed)."""
    client.login(token)
    return client.wait_for(lambda c: "In [1]:" in c.display() or c.closed, timeout=30) \
        and not client.closed


@pytest.fixture(scope="module")
def proxied_server(tmp_path_factory):
    """A server whose one listener is haproxy:ssl: (PROXY header, then TLS)."""
    srv = start_server(tmp_path_factory.mktemp("proxied"), uid_min=237000, uid_max=237049,
                       admission=ONE_PER_ADDRESS, listen_prefix="haproxy:")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def forwarding_server(tmp_path_factory):
    """A server that trusts X-Forwarded-For from 127.0.0.1 only."""
    srv = start_server(tmp_path_factory.mktemp("forwarding"), uid_min=237050, uid_max=237099,
                       admission=ONE_PER_ADDRESS, server='trusted_proxies = ["127.0.0.1"]\n')
    yield srv
    srv.stop()


@pytest.mark.parametrize("version", [proxy_v1, proxy_v2], ids=["v1", "v2"])
def test_proxy_protocol_visitors_are_limited_apart(proxied_server, version):
    """Through one proxy, a visitor's second console is refused while another
    visitor's first starts: the limit and the token binding see the visitors."""
    last = 1 if version is proxy_v1 else 2
    first, second = f"198.51.100.{last}", f"198.51.100.{last + 10}"
    first_token = proxied_token(proxied_server, version(first))
    second_tokens = [proxied_token(proxied_server, version(second)) for _ in range(2)]
    clients = []
    try:
        clients.append(ProxiedConsole(proxied_server, version(first)))
        assert started(clients[-1], first_token)
        # The first visitor is at its limit: its next page is refused...
        assert proxied_page(proxied_server, version(first)).startswith("HTTP/1.1 429")
        # ...a token is bound to the visitor that fetched it...
        clients.append(ProxiedConsole(proxied_server, version("198.51.100.99")))
        assert not started(clients[-1], second_tokens[0])
        assert "Console refused" in (clients[-1].last_message("e") or "")
        # ...and the other visitor, through the same proxy, is not limited.
        clients.append(ProxiedConsole(proxied_server, version(second)))
        assert started(clients[-1], second_tokens[1])
    finally:
        for client in clients:
            client.close()
    assert f"from {first}" in proxied_server.log()


def test_missing_proxy_header_is_refused_quietly(proxied_server):
    """A connection without a PROXY header (or a garbled one) is closed with
    nothing answered and no traceback logged."""
    for opening in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PROXY garbage here\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", proxied_server.port), timeout=10) as sock:
            sock.sendall(opening)
            assert read_response(sock) == b""
    assert "Traceback" not in proxied_server.log()


def test_trusted_x_forwarded_for_visitors_are_limited_apart(forwarding_server):
    """Through a trusted proxy, X-Forwarded-For names the visitor: a visitor's
    second console is refused while another visitor's first starts."""
    first_token = forwarded_token(forwarding_server, "127.0.0.1", "203.0.113.1")
    second_tokens = [forwarded_token(forwarding_server, "127.0.0.1", "203.0.113.2")
                     for _ in range(2)]
    clients = []
    try:
        clients.append(ForwardedConsole(forwarding_server, "127.0.0.1", "203.0.113.1"))
        assert started(clients[-1], first_token)
        with pytest.raises(urllib.error.HTTPError) as refused:
            forwarded_token(forwarding_server, "127.0.0.1", "203.0.113.1")
        assert refused.value.code == 429
        clients.append(ForwardedConsole(forwarding_server, "127.0.0.1", "203.0.113.9"))
        assert not started(clients[-1], second_tokens[0])
        assert "Console refused" in (clients[-1].last_message("e") or "")
        clients.append(ForwardedConsole(forwarding_server, "127.0.0.1", "203.0.113.2"))
        assert started(clients[-1], second_tokens[1])
    finally:
        for client in clients:
            client.close()


def test_untrusted_x_forwarded_for_is_ignored(forwarding_server):
    """From an untrusted peer, X-Forwarded-For changes nothing: two
    'visitors' it names share the peer's one console."""
    tokens = [forwarded_token(forwarding_server, "127.0.0.2", f"203.0.113.{last}")
              for last in (3, 4)]
    clients = []
    try:
        clients.append(ForwardedConsole(forwarding_server, "127.0.0.2", "203.0.113.3"))
        assert started(clients[-1], tokens[0])
        with pytest.raises(urllib.error.HTTPError) as refused:
            forwarded_token(forwarding_server, "127.0.0.2", "203.0.113.4")
        assert refused.value.code == 429
        clients.append(ForwardedConsole(forwarding_server, "127.0.0.2", "203.0.113.4"))
        assert not started(clients[-1], tokens[1])
        assert "No console now" in (clients[-1].last_message("e") or "")
    finally:
        for client in clients:
            client.close()


# Two connections per address; the balancer (127.0.0.1) forwards more.
TWO_CONNECTIONS = "max_connections_per_address = 2\n"


@pytest.fixture(scope="module")
def capped_proxied_server(tmp_path_factory):
    """A haproxy:ssl: server allowing two connections per address."""
    srv = start_server(tmp_path_factory.mktemp("capped"), uid_min=253000, uid_max=253099,
                       server=TWO_CONNECTIONS, listen_prefix="haproxy:")
    yield srv
    srv.stop()


def held_connection(server, header: bytes) -> http.client.HTTPConnection:
    """A keep-alive connection sent through ``header`` that has had one
    request answered (so the server has read its PROXY header and TLS)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.sock = proxied_socket(server, header)
    connection.request("GET", "/embed.js")
    response = connection.getresponse()
    response.read()
    assert response.status == 200
    return connection


def answered(server, header: bytes) -> bool:
    """Whether a request sent through ``header`` is answered (a connection
    over the cap is reset after its handshake, or during it)."""
    try:
        with proxied_socket(server, header) as sock:
            sock.sendall(f"GET /embed.js HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            return read_response(sock).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@pytest.mark.parametrize("version", [proxy_v1, proxy_v2], ids=["v1", "v2"])
def test_connection_cap_counts_the_visitor(capped_proxied_server, version):
    """Through one balancer address, a visitor holding max_connections_per_address
    connections is refused another while a second visitor still connects."""
    last = 1 if version is proxy_v1 else 2
    first, second = f"192.0.2.{last}", f"192.0.2.{last + 10}"
    held = [held_connection(capped_proxied_server, version(first)) for _ in range(2)]
    try:
        assert not answered(capped_proxied_server, version(first))
        assert answered(capped_proxied_server, version(second))
    finally:
        for connection in held:
            connection.close()
    assert f"{first} holds 2 connections: refusing more" in capped_proxied_server.log()
    assert "127.0.0.1 holds" not in capped_proxied_server.log()
