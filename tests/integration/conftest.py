"""Fixtures the in-process dashboard tests share: the API, dashboard included, with access control on and off."""

from __future__ import annotations

import pytest

from tests.support import api_app


@pytest.fixture(scope="module")
def guarded_app(database_url):
    application = api_app(database_url, auth="required")
    yield application
    application.extensions["asyncproc"].close()


@pytest.fixture(scope="module")
def open_app(database_url):
    application = api_app(database_url)
    yield application
    application.extensions["asyncproc"].close()
