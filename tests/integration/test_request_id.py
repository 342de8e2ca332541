"""Every answer, errors included, carries the request id: the one sent, or a new one."""

from __future__ import annotations

from typing import Iterator

import pytest
from flask import Flask

from asyncproc.api import create_app
from asyncproc.config import DatabaseSettings, Settings


@pytest.fixture(scope="module")
def app(database_url) -> Iterator[Flask]:
    application = create_app(Settings(db=DatabaseSettings(url=database_url)))
    yield application
    application.extensions["asyncproc"].close()


def test_error_answers_carry_the_request_id_too(app):
    client = app.test_client()
    sent = client.get("/results/nope", headers={"X-Request-ID": "trace-404"})
    assert (sent.status_code, sent.headers["X-Request-ID"]) == (404, "trace-404")
    generated = client.post("/process", data="{", content_type="application/json")
    assert generated.status_code == 400
    assert len(generated.headers["X-Request-ID"]) == 32


def test_the_request_id_is_forgotten_once_the_request_is_answered(app):
    from asyncproc.logs import request_id_var

    app.test_client().get("/health", headers={"X-Request-ID": "trace-once"})
    # Flask's test client serves on this thread, as a server thread would.
    assert request_id_var.get() == "-"
