"""The header timeout's view of where a first request's headers end (asyncproc.api.asgi.HeadersEnd).

Seen later than gunicorn's parser sees it, the timeout would answer 408 in the
middle of a request being served; so the end must be found however the bytes
are split, and never after the empty line.
"""

from __future__ import annotations

import pytest

from asyncproc.api.asgi import HeadersEnd

REQUEST = b"GET /results/x?wait=30 HTTP/1.1\r\nHost: x\r\n\r\n"


def _first_end(pieces: list[bytes]) -> int | None:
    """The index of the piece in which the headers are found to end, if any."""
    watch = HeadersEnd()
    for index, piece in enumerate(pieces):
        if watch.found_in(piece):
            return index
    return None


def test_the_end_is_found_in_the_byte_that_completes_the_empty_line():
    assert _first_end([bytes([byte]) for byte in REQUEST]) == len(REQUEST) - 1


@pytest.mark.parametrize("cut", range(1, len(REQUEST)))
def test_the_end_is_found_wherever_the_bytes_are_split(cut):
    assert _first_end([REQUEST[:cut], REQUEST[cut:]]) == 1


@pytest.mark.parametrize("head", [b"GET / HTTP/1.1\n\n", b"GET / HTTP/1.1\nHost: x\n\n", b"GET / HTTP/1.1\r\nHost: x\n\r\n"])
def test_bare_line_feeds_end_the_headers_too(head):
    assert _first_end([head]) == 0


def test_empty_lines_before_the_request_line_end_nothing():
    assert _first_end([b"\r\n", b"\r\n\r\n", b"GET / HTTP/1.1\r\n", b"Host: x\r\n"]) is None
    assert _first_end([b"\r\n\r\nGET / HTTP/1.1\r\n", b"\r\n"]) == 1


def test_headers_still_coming_have_not_ended():
    assert _first_end([b"GET / HTTP/1.1\r\nHost: x\r\n", b"X-Slow: a", b"\r\n"]) is None
