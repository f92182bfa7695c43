"""The visitor's address through trusted proxies: shellserver.proxies and
client_address(request)."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from shellserver.config import ConfigError, ServerConfig
from shellserver.proxies import (
    FORWARDED,
    TrustedProxies,
    parse_hop,
    parse_networks,
)
from shellserver.sockjs.headers import client_address

LOCAL = TrustedProxies.from_strings(["127.0.0.1", "10.0.0.0/8"])


class TrustedProxiesTests(SynchronousTestCase):
    def test_trusted_peer_names_the_visitor(self) -> None:
        """From a trusted proxy, the rightmost untrusted hop is the visitor."""
        self.assertEqual(LOCAL.client_of("127.0.0.1", ["203.0.113.5"]), "203.0.113.5")

    def test_untrusted_peer_header_ignored(self) -> None:
        """An untrusted peer's header changes nothing."""
        self.assertEqual(LOCAL.client_of("192.0.2.9", ["203.0.113.5"]), "192.0.2.9")

    def test_walk_stops_at_first_untrusted_hop(self) -> None:
        """Hops left of the first untrusted one (the client's own claims) are ignored."""
        self.assertEqual(
            LOCAL.client_of("127.0.0.1", ["1.1.1.1, 203.0.113.5", "10.1.2.3"]), "203.0.113.5")

    def test_all_hops_trusted_gives_leftmost(self) -> None:
        """When every hop is a trusted proxy, the leftmost one is the client."""
        self.assertEqual(LOCAL.client_of("127.0.0.1", ["10.0.0.2, 10.0.0.1"]), "10.0.0.2")

    def test_malformed_hop_gives_the_peer(self) -> None:
        """A hop that is not an address ends the walk at the peer."""
        self.assertEqual(LOCAL.client_of("127.0.0.1", ["203.0.113.5, unknown"]), "127.0.0.1")
        self.assertEqual(LOCAL.client_of("127.0.0.1", [""]), "127.0.0.1")

    def test_no_header_gives_the_peer(self) -> None:
        """A trusted proxy that sends no header is itself the client."""
        self.assertEqual(LOCAL.client_of("127.0.0.1", []), "127.0.0.1")

    def test_nobody_trusted_by_default(self) -> None:
        """Without trusted proxies the header is never read."""
        self.assertEqual(TrustedProxies().client_of("127.0.0.1", ["203.0.113.5"]), "127.0.0.1")

    def test_forwarded_header(self) -> None:
        """RFC 7239 for= values, quoted, with ports and IPv6 brackets, are read."""
        proxies = TrustedProxies.from_strings(["127.0.0.1"], FORWARDED)
        self.assertEqual(
            proxies.client_of("127.0.0.1", ['for="[2001:db8::1]:4711";proto=https']),
            "2001:db8::1")
        self.assertEqual(
            proxies.client_of("127.0.0.1", ["for=198.51.100.1, for=203.0.113.5:80;by=x"]),
            "203.0.113.5")
        self.assertEqual(proxies.client_of("127.0.0.1", ["for=_hidden"]), "127.0.0.1")

    def test_ipv4_mapped_peer_is_trusted(self) -> None:
        """A trusted IPv4 proxy seen on an IPv6 socket is still trusted."""
        self.assertEqual(LOCAL.client_of("::ffff:127.0.0.1", ["203.0.113.5"]), "203.0.113.5")

    def test_hop_forms(self) -> None:
        """Hops with ports and brackets are normalised; names are not addresses."""
        self.assertEqual(parse_hop(" 192.0.2.1:8080 "), "192.0.2.1")
        self.assertEqual(parse_hop("[2001:DB8::1]"), "2001:db8::1")
        self.assertEqual(parse_hop("2001:db8::1"), "2001:db8::1")
        self.assertIsNone(parse_hop("example.org"))
        self.assertIsNone(parse_hop("[2001:db8::1"))

    def test_bad_network_is_a_clear_error(self) -> None:
        """A configured value that is no address says which one."""
        with self.assertRaises(ValueError) as raised:
            parse_networks(["127.0.0.1", "proxy.local"])
        self.assertIn("'proxy.local' is not an IP address or network", str(raised.exception))

    def test_bad_header_name_refused(self) -> None:
        """Only the two forwarding headers can be chosen."""
        with self.assertRaises(ValueError):
            TrustedProxies((), "X-Real-IP")

    @given(st.text(max_size=200), st.ip_addresses().map(str))
    def test_any_header_gives_an_address(self, header: str, peer: str) -> None:
        """Whatever the header holds, the answer is the peer or a hop in it,
        always a valid address, and never an exception."""
        for proxies in (LOCAL, TrustedProxies.from_strings(["0.0.0.0/0", "::/0"], FORWARDED)):
            client = proxies.client_of(peer, [header])
            ipaddress.ip_address(client)
            self.assertTrue(client == peer or client in header.lower()
                            or ipaddress.ip_address(client).version == 6)

    @given(st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=6))
    def test_visitor_is_rightmost_untrusted(self, hops: list[str]) -> None:
        """With X-Forwarded-For from a trusted peer, the visitor is the
        rightmost hop outside the trusted networks (else the leftmost)."""
        expected = next((hop for hop in reversed(hops) if not LOCAL.trusts(hop)), hops[0])
        self.assertEqual(LOCAL.client_of("127.0.0.1", [", ".join(hops)]), expected)


class ClientAddressTests(SynchronousTestCase):
    def request(self, peer, forwarded_for: str | None, proxies: TrustedProxies | None):
        request = DummyRequest([b""])
        request.client = peer
        if forwarded_for is not None:
            request.requestHeaders.addRawHeader(b"x-forwarded-for", forwarded_for.encode())
        if proxies is not None:
            request.site = type("Site", (), {"trusted_proxies": proxies})()
        return request

    def test_site_trusted_proxies_used(self) -> None:
        """client_address looks through the site's trusted proxies."""
        request = self.request(IPv4Address("TCP", "127.0.0.1", 4000), "203.0.113.5", LOCAL)
        self.assertEqual(client_address(request), "203.0.113.5")

    def test_without_site_setting_the_peer(self) -> None:
        """A site without trusted proxies gives the TCP peer."""
        request = self.request(IPv4Address("TCP", "127.0.0.1", 4000), "203.0.113.5", None)
        self.assertEqual(client_address(request), "127.0.0.1")

    def test_unix_peer(self) -> None:
        """A UNIX-socket peer has no address and trusts nobody's header."""
        request = self.request(UNIXAddress(b"/tmp/s"), "203.0.113.5", LOCAL)
        self.assertEqual(client_address(request), "")


class ConfigTests(SynchronousTestCase):
    def test_bad_trusted_proxy_is_a_config_error(self) -> None:
        """A trusted_proxies value that is no address fails with its key named."""
        with self.assertRaises(ConfigError) as raised:
            ServerConfig(trusted_proxies=["10.0.0.0/8", "lb"])
        self.assertIn("server.trusted_proxies", str(raised.exception))
        self.assertIn("'lb'", str(raised.exception))

    def test_bad_proxy_header_is_a_config_error(self) -> None:
        """proxy_header names one of the two forwarding headers."""
        with self.assertRaises(ConfigError) as raised:
            ServerConfig(proxy_header="X-Real-IP")
        self.assertIn("server.proxy_header", str(raised.exception))


class AccessLogTests(SynchronousTestCase):
    def test_access_log_names_the_visitor(self) -> None:
        """The access log line shows the visitor behind a trusted proxy, not the proxy."""
        from shellserver.web import visitor_log_formatter

        request = ClientAddressTests.request(
            None, IPv4Address("TCP", "127.0.0.1", 4000), "203.0.113.5", LOCAL)
        request.uri = b"/"
        request.clientproto = b"HTTP/1.1"
        request.code = 200
        request.sentLength = 0
        line = visitor_log_formatter("[ts]", request)
        self.assertTrue(line.startswith('"203.0.113.5" - - [ts] "GET / HTTP/1.1" 200'), line)
