"""The request contract is one definition: what the API accepts, what /openapi.json
publishes and what docs/api.md's tables say all come from asyncproc.contract."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from asyncproc import contract
from asyncproc.api import validation
from asyncproc.errors import BatchTooLarge, InvalidRequest
from asyncproc.operations import registry
from tests.support import PROJECT_ROOT

URL = "https://hooks.example.com/done"
# Bodies whose fate the schema alone decides. Not here, because JSON Schema
# cannot say them: run_at's parse and range ("format" only annotates), the
# characters jsonb cannot store, nesting depth, data's own "operation" key, and
# each operation's input, which its own schema checks.
BODIES = [
    {},
    {"data": None, "operation": None, "timeout_seconds": None, "callback_url": None},
    {"data": {"n": 3}, "operation": "compute", "priority": -1_000_000, "max_attempts": 100, "delay_seconds": 0},
    {"priority": 1_000_000, "max_attempts": 1, "timeout_seconds": 604800, "callback_url": URL},
    {"max_attempts": 3.0, "priority": 2.0, "delay_seconds": 1.5, "timeout_seconds": 0.001},
    {"run_at": "2030-01-01T00:00:00Z"},
    {"operation": "sleep", "data": {"seconds": 1}},
    {"run_at": "2030-01-01T00:00:00Z", "delay_seconds": 1},
    {"max_attempts": 0},
    {"max_attempts": 101},
    {"max_attempts": 2.5},
    {"max_attempts": None},
    {"max_attempts": "3"},
    {"priority": True},
    {"priority": 1_000_001},
    {"priority": -1_000_001},
    {"delay_seconds": -1},
    {"delay_seconds": contract.MAX_DELAY_SECONDS + 1},
    {"delay_seconds": None},
    {"timeout_seconds": 0},
    {"timeout_seconds": 604801},
    {"timeout_seconds": "5"},
    {"run_at": 1700000000},
    {"run_at": None},
    {"operation": "no_such_operation"},
    {"operation": 5},
    {"operation": "drop table"},
    {"data": []},
    {"data": "x"},
    {"callback_url": 5},
    {"callback_url": URL + "x" * 2000},
    {"priorty": 1},
    [],
    "data",
    None,
]


def _api_accepts(body) -> bool:
    try:
        validation.new_task(body, idempotency_key=None, request_id=None, can_sign=True)
    except InvalidRequest:
        return False
    return True


@pytest.mark.parametrize("body", BODIES, ids=[repr(body)[:60] for body in BODIES])
def test_the_api_takes_a_body_exactly_when_the_published_schema_does(body):
    schema = Draft202012Validator(contract.process_request(registry.names()))
    assert _api_accepts(body) == schema.is_valid(body)


@pytest.mark.parametrize(
    "body",
    [{"tasks": [{}]}, {"tasks": [{}] * contract.MAX_BATCH_TASKS}, {"tasks": []}, {"tasks": [{}] * (contract.MAX_BATCH_TASKS + 1)},
     {"tasks": [{"max_attempts": 0}]}, {"tasks": {}}, {"tasks": [{}], "more": 1}, {}],
    ids=["one", "the most", "none", "too many", "a bad item", "not a list", "an unknown field", "no tasks"],
)
def test_the_api_takes_a_batch_exactly_when_the_published_schema_does(body):
    schema = Draft202012Validator(contract.batch_request(contract.process_request(registry.names())))
    try:
        validation.new_tasks(body, request_id=None)
        accepted = True
    except (InvalidRequest, BatchTooLarge):
        accepted = False
    assert accepted == schema.is_valid(body)


def test_defaults_are_the_contracts():
    task = validation.new_task({}, idempotency_key=None, request_id=None)
    assert (task.operation, task.payload, task.priority, task.max_attempts, task.timeout_seconds) == (
        contract.DEFAULT_OPERATION, {}, contract.DEFAULT_PRIORITY, contract.DEFAULT_MAX_ATTEMPTS, None
    )
    assert type(validation.new_task({"max_attempts": 5.0}, idempotency_key=None, request_id=None).max_attempts) is int


def test_the_published_schemas_are_valid_json_schema():
    Draft202012Validator.check_schema(contract.process_request(registry.names()))
    Draft202012Validator.check_schema(contract.batch_request(contract.process_request(registry.names())))


def test_a_refused_field_is_named_and_its_rule_said_as_the_docs_say_it():
    with pytest.raises(InvalidRequest) as raised:
        validation.new_task({"max_attempts": 0}, idempotency_key=None, request_id=None)
    assert raised.value.message == "max_attempts must be an integer from 1 to 100"
    assert raised.value.details == [{"field": "max_attempts"}]


def test_docs_api_md_holds_the_tables_the_contract_generates():
    document = (PROJECT_ROOT / "docs" / "api.md").read_text()
    assert document.count(contract.BEGIN) == len(contract.TABLES)
    assert contract.render(document) == document, "run `python -m asyncproc.contract` and commit docs/api.md"
