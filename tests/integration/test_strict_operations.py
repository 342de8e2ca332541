"""Built-in operations refuse input fields they do not know; the seed's example body still passes."""

from __future__ import annotations

from typing import Iterator

import pytest
from flask import Flask

from asyncproc.api import create_app
from asyncproc.config import DatabaseSettings, Settings
from tests.support import count_tasks, post

BUILT_IN = {"compute": {"n": 42}, "sleep": {"seconds": 0}, "fail": {"times": 1, "message": "x"}}


@pytest.fixture(scope="module")
def app(database_url) -> Iterator[Flask]:
    application = create_app(Settings(db=DatabaseSettings(url=database_url)))
    yield application
    application.extensions["asyncproc"].close()


@pytest.mark.parametrize("operation", sorted(BUILT_IN))
def test_an_unknown_input_field_is_a_422_naming_it(app, clean_db, operation):
    response = post(app.test_client(), {"operation": operation, "data": {**BUILT_IN[operation], "N": 42}})
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert error["details"] == [{"field": "data.N", "problem": "is not an accepted field"}]
    assert "data.N" in error["message"]
    assert count_tasks(clean_db) == 0


@pytest.mark.parametrize(
    "body",
    [{"data": {"input": 42, "operation": "compute"}}, {"data": {"n": 42, "operation": "compute"}}],
    ids=["the seed's example", "the README's example"],
)
def test_the_seed_and_readme_bodies_are_accepted(app, clean_db, body):
    response = post(app.test_client(), body)
    assert response.status_code == 202, response.get_json()
    assert count_tasks(clean_db) == 1


@pytest.mark.parametrize("operation", sorted(BUILT_IN))
def test_openapi_says_the_built_ins_take_no_other_fields(app, operation):
    schemas = app.test_client().get("/openapi.json").get_json()["components"]["schemas"]
    assert schemas[f"{operation}.input"]["additionalProperties"] is False
