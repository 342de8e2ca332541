"""The callback allow-list, the URL check, the signature, and the pinned POST to a local server."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from asyncproc.webhooks import AllowList, CallbackRefused, NotPublic, check_resolved, check_url, sign, verify_signature
from worker.callbacks import MAX_ANSWER_HEAD_BYTES, MalformedAnswer, post_pinned

PUBLIC = AllowList()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "http:///nohost",
        "example.com/hook",
        "http://127.0.0.1:8080/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[fd00::1]/hook",
        "http://0.0.0.0/hook",
        "http://example.com:99999/hook",
        "http://exa mple.com/hook",
        "http://example.com/" + "x" * 2000,
    ],
)
def test_by_default_only_public_http_urls_pass(url):
    with pytest.raises(CallbackRefused):
        check_url(url, PUBLIC)


# IPv6 forms of addresses that are not public: each reaches an IPv4 address,
# through the host itself, a translator or a tunnel, or is site-local.
@pytest.mark.parametrize(
    "address",
    [
        "::127.0.0.1",  # IPv4-compatible
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:0:7f00:1",  # IPv4-translated (SIIT)
        "64:ff9b::a9fe:a9fe",  # NAT64 well-known prefix, to 169.254.169.254
        "64:ff9b::a00:1",  # NAT64 to 10.0.0.1
        "64:ff9b:1::a9fe:a9fe",  # local-use NAT64
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
        "2002:c0a8:1::1",  # 6to4 of 192.168.0.1
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo: client 127.0.0.1 (last 32 bits XOR 0xffffffff)
        "fec0::1",  # site-local, deprecated
    ],
)
def test_ipv6_forms_of_private_addresses_are_not_public(address):
    assert not PUBLIC.address_allowed(ipaddress.ip_address(address))
    with pytest.raises(NotPublic):
        check_url(f"http://[{address}]:8080/hook", PUBLIC)
    with pytest.raises(NotPublic):
        check_resolved(f"http://[{address}]:8080/hook", PUBLIC)


@pytest.mark.parametrize("address", ["::ffff:93.184.216.34", "64:ff9b::5db8:d822", "2002:5db8:d822::1", "2606:4700::1111"])
def test_ipv6_forms_of_public_addresses_pass(address):
    assert check_url(f"http://[{address}]/hook", PUBLIC) == address


def test_a_listed_network_lets_an_ipv6_form_through_only_if_it_contains_it_as_written():
    assert not AllowList.parse("127.0.0.0/8").address_allowed(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert AllowList.parse("::ffff:127.0.0.0/104").address_allowed(ipaddress.ip_address("::ffff:127.0.0.1"))


def test_public_urls_pass_by_default():
    assert check_url("https://hooks.example.com/done?x=1", PUBLIC) == "hooks.example.com"
    assert check_url("http://93.184.216.34:8080/", PUBLIC) == "93.184.216.34"


def test_a_name_that_resolves_to_loopback_is_refused_at_delivery():
    with pytest.raises(NotPublic, match="resolves to"):
        check_resolved("http://localhost:9/hook", PUBLIC)


def test_an_allow_list_names_hosts_and_networks():
    allow = AllowList.parse("127.0.0.1, .example.com, 10.0.0.0/8")
    assert check_url("http://127.0.0.1:5000/hook", allow) == "127.0.0.1"
    assert check_url("http://10.9.8.7/hook", allow) == "10.9.8.7"
    assert check_url("https://api.example.com/hook", allow) == "api.example.com"
    assert check_url("https://example.com/hook", allow) == "example.com"
    for refused in ("https://example.org/hook", "http://127.0.0.2/hook", "https://badexample.com/"):
        with pytest.raises(CallbackRefused):
            check_url(refused, allow)
    check_resolved("http://127.0.0.1:9/hook", allow)


def test_a_listed_name_still_may_not_resolve_to_a_private_address():
    with pytest.raises(CallbackRefused, match="resolves to"):
        check_resolved("http://localhost:9/hook", AllowList.parse("localhost"))


@pytest.mark.parametrize("entry", ["exa mple.com", "http://x.com", "1.2.3.4/40"])
def test_bad_allow_entries_are_refused(entry):
    with pytest.raises(ValueError):
        AllowList.parse(entry)


def test_signatures_verify_only_with_the_secret_body_and_a_fresh_timestamp():
    body = b'{"task_id": "x", "status": "completed"}'
    header = sign("s3cret", body, timestamp=1_000_000)
    assert header.startswith("t=1000000,v1=")
    assert verify_signature("s3cret", header, body, now=1_000_010)
    assert not verify_signature("other", header, body, now=1_000_010)
    assert not verify_signature("s3cret", header, body + b" ", now=1_000_010)
    assert not verify_signature("s3cret", header, body, now=1_000_000 + 301)
    assert not verify_signature("s3cret", "v1=abc", body)


class Recorder(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_POST(self) -> None:
        Recorder.seen.append({"host": self.headers["Host"], "path": self.path, "body": self.rfile.read(int(self.headers["Content-Length"]))})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_server():
    servers = []

    def start(tls_dir=None):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        if tls_dir is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls_dir / "cert.pem", tls_dir / "key.pem")
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()


def test_a_delivery_connects_to_the_checked_address_not_a_new_lookup(local_server):
    port = local_server()
    status = asyncio.run(post_pinned(f"http://hooks.invalid:{port}/done?x=1", ipaddress.ip_address("127.0.0.1"), b"{}", {}))
    assert status == 204
    assert Recorder.seen[-1] == {"host": f"hooks.invalid:{port}", "path": "/done?x=1", "body": b"{}"}


def test_https_deliveries_verify_the_certificate_against_the_host_name(local_server, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a self-signed certificate")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=hooks.invalid",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True,
        capture_output=True,
    )
    port = local_server(tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(post_pinned(f"https://hooks.invalid:{port}/done", ipaddress.ip_address("127.0.0.1"), b"{}", {}))


@pytest.fixture
def answering():
    """A server on 127.0.0.1 that reads one request and answers it with the given bytes (then more, if given)."""
    listeners = []

    def start(answer: bytes, then: bytes = b"") -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                try:
                    connection.sendall(answer)
                    while then:
                        connection.sendall(then)
                except OSError:
                    pass  # the deliverer hung up

        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1]

    yield start
    for listener in listeners:
        listener.close()


def post_to(port: int) -> int:
    return asyncio.run(post_pinned(f"http://hooks.invalid:{port}/done", ipaddress.ip_address("127.0.0.1"), b"{}", {}))


def test_only_the_answers_head_is_read_never_its_endless_compressed_body(answering):
    bomb = gzip.compress(bytes(1 << 20))
    port = answering(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", bomb)
    tracemalloc.start()
    try:
        assert post_to(port) == 200
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20


def test_an_interim_answer_is_passed_over_for_the_final_one(answering):
    assert post_to(answering(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")) == 503


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * MAX_ANSWER_HEAD_BYTES + b"\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Le",
    ],
    ids=["head too large", "not HTTP", "cut short"],
)
def test_an_answer_that_is_not_an_http_head_is_malformed(answering, answer):
    with pytest.raises(MalformedAnswer):
        post_to(answering(answer))
