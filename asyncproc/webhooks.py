"""Completion webhooks: which URLs may be called, and how each call is signed.

The API checks a callback_url when the task is submitted (without DNS, which
has no place in the request path); the worker checks it again, with the
addresses the host resolves to, right before each delivery.

ASYNCPROC_CALLBACK_ALLOW is a comma-separated list of hosts the service may
call: host names (`hooks.example.com`, or `.example.com` for it and its
subdomains), IP networks (`10.1.0.0/16`, `127.0.0.1`), or `*` for any host.
Unset, it is `*`. Whatever the list, an address that is not public (private,
loopback, link-local, reserved, multicast) is called only if a network in the
list contains it.

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
        if self._in_network(address):
            return True
        return address.is_global and not address.is_multicast

    def _in_network(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


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
        raise CallbackRefused(f"callback_url address {address} is not public and not in ASYNCPROC_CALLBACK_ALLOW")
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
            raise CallbackRefused(f"{host} resolves to {address}, which is not public and not in ASYNCPROC_CALLBACK_ALLOW")
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
