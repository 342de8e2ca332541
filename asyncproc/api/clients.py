"""Who the client is: its address, read through the trusted proxies.

Behind a load balancer every connection comes from the balancer. When the peer
is one of ASYNCPROC_TRUSTED_PROXIES, the client is the right-most address of
X-Forwarded-For that is not itself a trusted proxy; entries further left were
written by the client and prove nothing.
"""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=16)
def _networks(trusted: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in trusted)


def is_trusted_proxy(address: str, trusted: tuple[str, ...]) -> bool:
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _networks(trusted))


def client_address(peer: str | None, forwarded_for: str | None, trusted: tuple[str, ...]) -> str:
    address = peer or "-"
    if not forwarded_for or not is_trusted_proxy(address, trusted):
        return address
    for hop in reversed([item.strip() for item in forwarded_for.split(",")]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            # A malformed entry: the last trusted hop is all we know.
            return address
        address = hop
        if not is_trusted_proxy(hop, trusted):
            return hop
    return address


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
