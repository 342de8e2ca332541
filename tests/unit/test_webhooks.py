"""The callback allow-list, the URL check, the signature, and the pinned POST to a local server."""

from __future__ import annotations

import ipaddress
import shutil
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3

from asyncproc.webhooks import AllowList, CallbackRefused, check_resolved, check_url, sign, verify_signature
from worker.callbacks import post_pinned

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


def test_public_urls_pass_by_default():
    assert check_url("https://hooks.example.com/done?x=1", PUBLIC) == "hooks.example.com"
    assert check_url("http://93.184.216.34:8080/", PUBLIC) == "93.184.216.34"


def test_a_name_that_resolves_to_loopback_is_refused_at_delivery():
    with pytest.raises(CallbackRefused, match="resolves to"):
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
    status = post_pinned(f"http://hooks.invalid:{port}/done?x=1", ipaddress.ip_address("127.0.0.1"), b"{}", {}, 5)
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
    with pytest.raises(urllib3.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        post_pinned(f"https://hooks.invalid:{port}/done", ipaddress.ip_address("127.0.0.1"), b"{}", {}, 5)
