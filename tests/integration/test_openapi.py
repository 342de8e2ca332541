"""GET /openapi.json describes the API, and the API keeps to it under fuzzing.

schemathesis generates requests from the document, valid and invalid ones,
sends them to the real app (in process, real PostgreSQL), and checks every
response against the document: no 5xx, documented status codes, content types,
headers and bodies.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from asyncproc.api import create_app, openapi
from asyncproc.config import ApiSettings, DatabaseSettings, Settings
from asyncproc.operations import registry

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def app(database_url):
    application = create_app(Settings(db=DatabaseSettings(url=database_url), api=ApiSettings(max_body_bytes=64 * 1024)))
    yield application
    application.extensions["asyncproc"].close()


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


# Every route with valid requests, known at collection time from the same
# builder the app serves, and invalid ones where the document constrains
# something (the other routes take any string or nothing).
FUZZ = [
    (path, method, GenerationMode.POSITIVE)
    for path, item in openapi.build(ApiSettings(), registry)["paths"].items()
    for method in item
] + [("/process", "post", GenerationMode.NEGATIVE)]


@pytest.mark.parametrize("path,method,mode", FUZZ, ids=[f"{m.upper()} {p} {mode.value}" for p, m, mode in FUZZ])
def test_the_api_keeps_to_its_openapi_document(api_schema, path, method, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        case.call_and_validate(checks=CHECKS)

    fuzz()


def test_the_document_lists_every_route_of_the_app(app):
    document = app.test_client().get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.")
    routes = {
        (rule.rule.replace("<raw_id>", "{task_id}"), method.lower())
        for rule in app.url_map.iter_rules()
        # The dashboard's HTML pages are for people, not part of the JSON API.
        if rule.endpoint != "static" and not rule.endpoint.startswith("dashboard.")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert documented == routes


def test_the_document_carries_each_operations_input_schema_and_the_error_shape(app):
    document = app.test_client().get("/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    for name, input_schema in registry.input_schemas().items():
        assert schemas[f"{name}.input"] == input_schema
    assert schemas["ProcessRequest"]["properties"]["operation"]["enum"] == [*registry.names(), None]
    assert set(schemas["Error"]["properties"]) == {"error", "detail"}
    assert set(schemas["Error"]["properties"]["error"]["properties"]) == {"code", "message", "details"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and path not in ("/health",):
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, (path, method, status)


def test_access_control_and_rate_limits_appear_when_configured(database_url):
    guarded = create_app(
        Settings(db=DatabaseSettings(url=database_url), api=ApiSettings(auth="required", rate_limit_per_second=5, rate_limit_burst=5))
    )
    try:
        document = guarded.test_client().get("/openapi.json").get_json()
    finally:
        guarded.extensions["asyncproc"].close()
    post = document["paths"]["/process"]["post"]
    assert post["security"] == [{"bearerAuth": []}]
    assert {"401", "429"} <= set(post["responses"])
    assert "security" not in document["paths"]["/health"]["get"]
