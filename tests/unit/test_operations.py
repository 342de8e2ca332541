from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest

from asyncproc.config import SecondsRange, WorkerSettings
from asyncproc.ledger import Task
from asyncproc.operations import InvalidInput, Operation, PermanentError, Registry, Stopped, TaskContext, registry
from worker.runner import Runner


def ctx(attempt: int = 1) -> TaskContext:
    return TaskContext(
        task_id=uuid.uuid4(), attempt=attempt, max_attempts=3, request_id=None, compute_seconds=SecondsRange(0, 0)
    )


def test_compute_defaults_to_the_seed_result():
    assert registry.get("compute")({"input": 42}, ctx()) == 499999500000
    assert registry.get("compute")({"n": 10}, ctx()) == 45
    # 10.0 is an integer to JSON Schema, and the sum below it still an exact int.
    assert registry.check("compute", {"n": 10.0})({"n": 10.0}, ctx()) == 45
    assert type(registry.get("compute")({"n": 10**12 * 1.0}, ctx())) is int


@pytest.mark.parametrize(
    "operation,payload,field",
    [
        ("compute", {"n": -1}, "data.n"),
        ("compute", {"n": "10"}, "data.n"),
        ("compute", {"n": True}, "data.n"),
        ("compute", {"n": 1.5}, "data.n"),
        ("compute", {"n": 10**13}, "data.n"),
        ("sleep", {"seconds": "1"}, "data.seconds"),
        ("sleep", {"seconds": 86401}, "data.seconds"),
        ("fail", {"times": -1}, "data.times"),
        ("fail", {"message": 5}, "data.message"),
        ("nope", {}, "operation"),
    ],
)
def test_bad_input_is_a_permanent_error_naming_the_field(operation, payload, field):
    with pytest.raises(InvalidInput) as raised:
        registry.check(operation, payload)
    assert isinstance(raised.value, PermanentError)
    assert [problem["field"] for problem in raised.value.details] == [field]


def test_good_input_returns_the_handler():
    # `input` is the field of the seed's example body, accepted and ignored.
    assert registry.check("compute", {"n": 3, "input": 42}) is registry.get("compute")
    assert registry.check("fail", {"times": 2, "message": "x"}) is registry.get("fail")


def test_a_declared_schema_checks_required_nested_and_closed_objects():
    local = Registry()
    schema = {
        "type": "object",
        "required": ["url"],
        "additionalProperties": False,
        "properties": {
            "url": {"type": "string", "minLength": 1},
            "sizes": {"type": "array", "items": {"type": "integer", "minimum": 1}},
            "mode": {"enum": ["fit", "fill"]},
        },
    }

    @local.register("resize", input_schema=schema)
    def resize(payload, ctx):
        return payload

    assert local.check("resize", {"url": "a", "sizes": [1, 2], "mode": "fit"}) is resize
    with pytest.raises(InvalidInput) as raised:
        local.check("resize", {"sizes": [1, 0], "mode": "crop", "extra": 1})
    assert sorted(p["field"] for p in raised.value.details) == [
        "data.extra", "data.mode", "data.sizes[1]", "data.url"
    ]
    assert local.input_schemas() == {"resize": schema}


def test_a_custom_operation_takes_unknown_fields_unless_registered_strict():
    local = Registry()
    schema = {"type": "object", "properties": {"url": {"type": "string"}}}

    @local.register("lenient", input_schema=schema)
    @local.register("strict", input_schema=schema, strict=True)
    def handler(payload, ctx):
        return payload

    assert local.check("lenient", {"url": "a", "URL": "b"}) is handler
    with pytest.raises(InvalidInput) as raised:
        local.check("strict", {"url": "a", "URL": "b"})
    assert raised.value.details == [{"field": "data.URL", "problem": "is not an accepted field"}]
    assert local.input_schemas() == {"lenient": schema, "strict": {**schema, "additionalProperties": False}}
    assert schema == {"type": "object", "properties": {"url": {"type": "string"}}}


def test_strict_and_a_schema_that_allows_other_fields_contradict_each_other():
    schema = {"type": "object", "additionalProperties": {"type": "string"}}
    with pytest.raises(ValueError, match="^operation 'x': strict=True and input_schema's additionalProperties disagree"):
        Registry().register("x", input_schema=schema, strict=True)


@pytest.mark.parametrize(
    "schema,problem",
    [
        ({"type": "object", "properties": {"n": {"type": "integr"}}}, r"is not valid JSON Schema: .* \(at properties/n/type\)$"),
        ({"type": "object", "properties": {"s": {"pattern": "(["}}}, r"is not valid JSON Schema: .* \(at properties/s/pattern\)$"),
        ({"type": "object", "required": "url"}, r"is not valid JSON Schema: .* \(at required\)$"),
        ({"type": "array"}, "must be a JSON Schema object with type object"),
        ({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"},
         "is checked as JSON Schema https://json-schema.org/draft/2020-12/schema"),
    ],
    ids=["unknown type", "invalid regex", "required not a list", "not an object", "another dialect"],
)
def test_an_invalid_schema_is_refused_at_registration_in_one_line_naming_the_operation(schema, problem):
    with pytest.raises(ValueError, match="^operation 'resize': input_schema " + problem) as raised:
        Registry().register("resize", input_schema=schema)
    assert "\n" not in str(raised.value)


def test_input_is_checked_with_json_schemas_own_semantics():
    local = Registry()

    @local.register("x", input_schema={
        "type": "object",
        "properties": {
            "one": {"enum": [1]},
            "count": {"type": "integer"},
            "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "either": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
        },
    })
    def handler(payload, ctx):
        return payload

    # JSON has one number type: 1.0 is the integer 1, and equal to the 1 of an enum.
    assert local.check("x", {"one": 1.0, "count": 2.0, "code": "ABC", "either": 3}) is handler
    with pytest.raises(InvalidInput) as raised:
        local.check("x", {"one": True, "count": 2.5, "code": "abc", "either": 1.5})
    # true is not 1 in JSON Schema, whatever Python's True == 1 says.
    assert raised.value.details == [
        {"field": "data.one", "problem": "must be one of 1"},
        {"field": "data.count", "problem": "must be of type integer"},
        {"field": "data.code", "problem": "must match the pattern '^[A-Z]{3}$'"},
        {"field": "data.either", "problem": "must match exactly one of its schemas"},
    ]


def test_a_problem_never_quotes_a_huge_value():
    local = Registry()

    @local.register("x", input_schema={"type": "object", "properties": {"words": {"contains": {"type": "integer"}}}})
    def handler(payload, ctx):
        return payload

    with pytest.raises(InvalidInput) as raised:
        local.check("x", {"words": ["x" * 100_000]})
    [problem] = raised.value.details
    assert problem["field"] == "data.words"
    assert problem["problem"].startswith("['xxx") and len(problem["problem"]) == 200


def test_fail_fails_its_first_times_attempts_then_succeeds():
    fail = registry.get("fail")
    with pytest.raises(RuntimeError, match="nope"):
        fail({"times": 2, "message": "nope"}, ctx(attempt=2))
    assert fail({"times": 2}, ctx(attempt=3)) == {"succeeded_on_attempt": 3}
    with pytest.raises(RuntimeError):
        fail({}, ctx(attempt=50))


def test_a_name_cannot_be_taken_twice():
    local = Registry()

    @local.register("x")
    def first(payload, ctx):
        return 1

    with pytest.raises(ValueError, match="already registered"):

        @local.register("x")
        def second(payload, ctx):
            return 2


def test_backoff_doubles_from_the_base_and_is_capped():
    runner = Runner(WorkerSettings(retry_backoff_seconds=1, retry_backoff_max_seconds=10), None, None, registry, None, None, None)
    for attempt, base in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (9, 10)]:
        assert 0.8 * base <= runner.backoff(attempt) <= 1.2 * base


def test_compute_reports_progress_during_its_simulated_work():
    reported = []
    context = TaskContext(
        task_id=uuid.uuid4(), attempt=1, max_attempts=3, request_id=None,
        compute_seconds=SecondsRange(0.05, 0.05), progress_sink=lambda p, m: reported.append((p, m)),
    )
    assert registry.get("compute")({"n": 4}, context) == 6
    percents = [p for p, _ in reported]
    assert percents == sorted(percents) and len(percents) == 10 and percents[-1] < 100
    assert reported[0][1] == "step 1 of 10"


def test_sleep_and_compute_stop_when_asked():
    context = TaskContext(
        task_id=uuid.uuid4(), attempt=1, max_attempts=3, request_id=None, compute_seconds=SecondsRange(60, 60)
    )
    context.stop_event.set()
    with pytest.raises(Stopped):
        registry.get("sleep")({"seconds": 60}, context)
    with pytest.raises(Stopped):
        registry.get("compute")({}, context)


def test_sync_handlers_run_in_a_process_unless_they_opt_into_a_thread():
    local = Registry()

    @local.register("in_process", timeout_seconds=5, memory_mb=128)
    def in_process(payload, ctx):
        return 1

    @local.register("in_thread", isolation="thread")
    def in_thread(payload, ctx):
        return 1

    @local.register("on_loop")
    async def on_loop(payload, ctx):
        return 1

    found = {name: local.find(name) for name in local.names()}
    assert {name: op.isolation for name, op in found.items()} == {
        "in_process": "process", "in_thread": "thread", "on_loop": None
    }
    assert (found["in_process"].timeout_seconds, found["in_process"].memory_mb) == (5, 128)
    assert local.find("unknown") is None


@pytest.mark.parametrize(
    "options,asynchronous,problem",
    [
        ({"isolation": "fork"}, False, "isolation must be one of"),
        ({"timeout_seconds": 0}, False, "timeout_seconds must be"),
        ({"memory_mb": 1}, False, "memory_mb must be"),
        ({"memory_mb": 64, "isolation": "thread"}, False, "memory_mb needs isolation='process'"),
        ({"memory_mb": 64}, True, "memory_mb needs isolation='process'"),
        ({"isolation": "thread"}, True, "an async handler runs on the event loop"),
    ],
)
def test_impossible_isolation_options_are_refused_at_registration(options, asynchronous, problem):
    async def async_handler(payload, ctx):
        return 1

    def sync_handler(payload, ctx):
        return 1

    with pytest.raises(ValueError, match=problem):
        Registry().register("x", **options)(async_handler if asynchronous else sync_handler)


def _task(timeout_seconds):
    now = datetime.now(timezone.utc)
    return Task(uuid.uuid4(), "x", {}, "running", None, None, 1, 3, 0, None, None, now, now, now, None, now,
                None, None, timeout_seconds=timeout_seconds)


@pytest.mark.parametrize(
    "task_limit,operation_limit,default,expected",
    [
        (2.0, 5.0, 600, 2.0),
        (None, 5.0, 600, 5.0),
        (None, None, 600, 600),
        (None, None, 0, None),
        (30.0, None, 0, 30.0),
    ],
)
def test_a_tasks_time_limit_comes_from_the_task_then_its_operation_then_the_default(
    task_limit, operation_limit, default, expected
):
    runner = Runner(WorkerSettings(handler_timeout_seconds=default), None, None, registry, None, None, None)
    operation = Operation("x", lambda payload, ctx: None, timeout_seconds=operation_limit)
    assert runner.time_limit(_task(task_limit), operation) == expected
