"""Completion webhooks: which URLs may be called, and how each call is signed.

The API checks a callback_url when the task is submitted (without DNS, which
has no place in the request path); the worker checks it again, with the
addresses the host resolves to, right before each delivery.

ASYNCPROC_CALLBACK_ALLOW is a comma-separated list of hosts the service may
call: host names (`hooks.example.com`, or `.example.com` for it and its
subdomains), IP networks (`10.1.0.0/16`, `127.0.0.1`), or `*` for any host.
Unset, it is `*`. Whatever the list, an address that is not public (private,
loopback, link-local, site-local, reserved, multicast, or an IPv6 form of an
IPv4 address that is not public) is called only if a network in the list
contains it.

Each call carries `X-Asyncproc-Signature: t=<unix time>,v1=<hex>`, where hex
is HMAC-SHA256 of "<t>.<body>" under the task's key's callback_secret (or
ASYNCPROC_CALLBACK_SECRET for tasks without a key). Receivers check it with
verify_signature().
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from asyncproc.contract import MAX_URL_LENGTH

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SIGNATURE_HEADER = "X-Asyncproc-Signature"
_HOST_ENTRY = re.compile(r"^\.?([a-z0-9_-]+\.)*[a-z0-9_-]+$")


class CallbackRefused(Exception):
    """A callback_url the service will not call; the message says why."""


class NotPublic(CallbackRefused):
    """The URL's host is, or resolves to, an address that is not public and not listed.

    The message names the address, for the log; what the URL's owner reads of
    a delivery is NOT_PUBLIC, which does not tell what a host name resolves to.
    """


NOT_PUBLIC = "not a public address"
# IPv6 addresses whose last 32 bits are an IPv4 address that a host, a
# translator or a gateway reaches instead: IPv4-compatible (::/96),
# IPv4-mapped, IPv4-translated (SIIT) and the NAT64 well-known prefix.
_IPV4_IN_LAST_32_BITS = tuple(
    ipaddress.IPv6Network(network) for network in ("::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96")
)
# Local-use NAT64 (RFC 8215): where its IPv4 address sits depends on a prefix
# length only the network knows, so none of it is public.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


@dataclass(frozen=True)
class AllowList:
    any_host: bool = True
    hosts: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> "AllowList":
        """ValueError names the entry that is neither a host name, a network nor `*`."""
        if text is None:
            return cls()
        any_host, hosts, networks = False, [], []
        for entry in (part.strip().lower() for part in text.split(",")):
            if not entry:
                continue
            if entry == "*":
                any_host = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if not _HOST_ENTRY.match(entry):
                raise ValueError(entry)
            hosts.append(entry)
        return cls(any_host, tuple(hosts), tuple(networks))

    def host_listed(self, host: str) -> bool:
        if self.any_host:
            return True
        address = _address(host)
        if address is not None:
            return self._in_network(address)
        return any(host == entry or (entry.startswith(".") and (host.endswith(entry) or host == entry[1:]))
                   for entry in self.hosts)

    def address_allowed(self, address: IPAddress) -> bool:
        return self._in_network(address) or _is_public(address)

    def _in_network(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


def _is_public(address: IPAddress) -> bool:
    """Global unicast, and so is the IPv4 address it carries, if it is an IPv6 form of one."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return True
    if address.is_site_local or address in _LOCAL_NAT64:
        return False
    carried = _carried_ipv4(address)
    return carried is None or _is_public(carried)


def _carried_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.teredo is not None:
        return address.teredo[1]
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in _IPV4_IN_LAST_32_BITS):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_url(url: str, allow: AllowList) -> str:
    """The URL's host, if the URL may be called as far as can be told without DNS."""
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"callback_url is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        valid = parts.port is None or parts.port > 0
    except ValueError:
        valid = False
    if not valid:
        raise CallbackRefused("callback_url is not a valid URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused("callback_url must be an http:// or https:// URL with a host")
    if any(ord(char) <= 32 or ord(char) == 127 for char in url):
        raise CallbackRefused("callback_url must not contain spaces or control characters")
    host = parts.hostname.lower()
    if not allow.host_listed(host):
        raise CallbackRefused(f"callback_url host {host} is not in ASYNCPROC_CALLBACK_ALLOW")
    address = _address(host)
    if address is not None and not allow.address_allowed(address):
        raise NotPublic(f"callback_url address {address} is not public and not in ASYNCPROC_CALLBACK_ALLOW")
    return host


def check_resolved(url: str, allow: AllowList) -> IPAddress:
    """check_url, and every address the host resolves to now must be allowed; the one to connect to.

    The caller connects to that address itself, so that the host cannot
    resolve to another address between the check and the call (DNS rebinding).
    """
    host = check_url(url, allow)
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CallbackRefused(f"cannot resolve {host}: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        if not allow.address_allowed(address):
            raise NotPublic(f"{host} resolves to {address}, which is not public and not in ASYNCPROC_CALLBACK_ALLOW")
    return addresses[0]


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The X-Asyncproc-Signature value for `body`."""
    moment = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{moment}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={moment},v1={digest}"


def verify_signature(secret: str, header: str, body: bytes, tolerance_seconds: float = 300, now: float | None = None) -> bool:
    """For receivers: True when `header` signs `body` under `secret` and is at most `tolerance_seconds` old."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        moment = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - moment) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, body, moment), f"t={moment},v1={fields.get('v1', '')}")
