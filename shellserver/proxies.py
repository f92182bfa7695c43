"""
Which address a request comes from when it passes through reverse proxies
that the operator trusts (C{server.trusted_proxies}): the visitor's address
that every per-address limit and token binding uses.
"""

import ipaddress
from collections.abc import Iterable, Sequence

from attrs import field, frozen

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The header a trusted proxy writes the address of its own peer into.
X_FORWARDED_FOR = "X-Forwarded-For"
FORWARDED = "Forwarded"
PROXY_HEADERS = (X_FORWARDED_FOR, FORWARDED)


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """
    Addresses and CIDR networks as networks.

    @raise ValueError: naming the first value that is neither.
    """
    networks = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"must contain address strings, got {value!r}")
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address or network (such as "
                "\"127.0.0.1\" or \"10.0.0.0/8\")") from None
    return tuple(networks)


def parse_hop(text: str) -> str | None:
    """
    One proxy hop's address, normalised (C{"[2001:db8::1]:80"} gives
    C{"2001:db8::1"}, C{"192.0.2.1:80"} gives C{"192.0.2.1"}), or C{None}
    when C{text} is not an address (C{"unknown"}, obfuscated names, junk).
    """
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        # IPv4 with a port; a bare IPv6 address has several colons
        text = text.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def forwarded_for_hops(value: str) -> list[str]:
    """
    The C{for=} parameter of each element of an RFC 7239 C{Forwarded}
    header, left to right; an element without one gives C{""} (not an
    address, so walking stops there).
    """
    hops = []
    for element in value.split(","):
        found = ""
        for pair in element.split(";"):
            name, equals, parameter = pair.partition("=")
            if equals and name.strip().lower() == "for":
                found = parameter
        hops.append(found)
    return hops


def x_forwarded_for_hops(value: str) -> list[str]:
    """The entries of an C{X-Forwarded-For} header, left to right."""
    return value.split(",")


@frozen
class TrustedProxies:
    """
    The reverse proxies whose forwarding header is believed.

    @ivar networks: the proxies' addresses (empty: trust nobody, every
        request's client is its TCP peer).
    @ivar header: L{X_FORWARDED_FOR} or L{FORWARDED}: the one header these
        proxies append to.  Only one is read: a client may send the other
        one made up, and the proxy would pass it on untouched.
    """

    networks: tuple[Network, ...] = ()
    header: str = field(default=X_FORWARDED_FOR)

    @header.validator
    def _check_header(self, attribute: object, value: str) -> None:
        if value not in PROXY_HEADERS:
            raise ValueError(f"must be one of {', '.join(PROXY_HEADERS)}, not {value!r}")

    @classmethod
    def from_strings(cls, values: Sequence[str], header: str = X_FORWARDED_FOR
                     ) -> "TrustedProxies":
        """From configured addresses and networks (see L{parse_networks})."""
        return cls(parse_networks(values), header)

    def trusts(self, address: str) -> bool:
        """Whether C{address} (text) is one of the trusted proxies."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def client_of(self, peer: str, header_values: Sequence[str]) -> str:
        """
        The visitor behind C{peer}: walking the forwarding header (all its
        C{header_values}, in order) from the right while the hop so far is a
        trusted proxy.  An untrusted peer's header is ignored; a hop that is
        not an address ends the walk at C{peer}.
        """
        if not self.networks or not header_values or not self.trusts(peer):
            return peer
        split = forwarded_for_hops if self.header == FORWARDED else x_forwarded_for_hops
        hops = [hop for value in header_values for hop in split(value)]
        client = peer
        while hops and self.trusts(client):
            hop = parse_hop(hops.pop())
            if hop is None:
                return peer
            client = hop
        return client
