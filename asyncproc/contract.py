"""The request contract of POST /process and POST /process/batch, defined once.

The JSON Schemas here, with the limits and defaults they carry, are what
asyncproc/api/validation.py checks a body against, what /openapi.json publishes
(asyncproc/api/openapi.py), and where docs/api.md's tables of fields come from:
`python -m asyncproc.contract` writes them, and a test keeps the committed
document equal to what it writes. ASYNCPROC_COMPAT=seed reshapes answers only,
so the seed's body is this same one.

The CHECK constraints of migrations/ stay the last line of defence for rows that
never pass the API (a psql INSERT); a test reads them from a migrated database
and compares their bounds with these.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable

DEFAULT_OPERATION = "compute"
OPERATION_PATTERN = r"^[A-Za-z0-9_.:-]{1,100}$"
DEFAULT_PRIORITY = 0
PRIORITY_LIMIT = 1_000_000
MIN_ATTEMPTS = 1
MAX_ATTEMPTS = 100
DEFAULT_MAX_ATTEMPTS = 3
MAX_DELAY_SECONDS = 10 * 366 * 86400
# Also the longest time limit an operation may declare.
MAX_TIMEOUT_SECONDS = 7 * 86400
MAX_URL_LENGTH = 2000
MAX_BATCH_TASKS = 1000

# In the order docs/api.md and /openapi.json list them.
PROCESS_FIELDS: dict[str, dict[str, Any]] = {
    "data": {
        "type": ["object", "null"],
        "default": {},
        "description": "The operation's input. Its `operation` key may name the operation; every other key is input, "
        'e.g. `{"operation": "compute", "n": 10}`. Each operation\'s input schema is '
        '`components.schemas["<operation>.input"]` of `/openapi.json`.',
    },
    "operation": {
        "type": ["string", "null"],
        "pattern": OPERATION_PATTERN,
        "default": DEFAULT_OPERATION,
        "description": "The operation, when `data` does not name it: one of those the API knows.",
    },
    "priority": {
        "type": "integer",
        "minimum": -PRIORITY_LIMIT,
        "maximum": PRIORITY_LIMIT,
        "default": DEFAULT_PRIORITY,
        "description": "Higher runs first.",
    },
    "delay_seconds": {
        "type": "number",
        "minimum": 0,
        "maximum": MAX_DELAY_SECONDS,
        "description": "Run no earlier than this many seconds from now; not together with `run_at`.",
    },
    "run_at": {
        "type": "string",
        "format": "date-time",
        "description": "Run no earlier than this time (UTC when it has no offset), from 1970 to "
        f"{MAX_DELAY_SECONDS} seconds (ten years) from now; not together with `delay_seconds`.",
    },
    "max_attempts": {
        "type": "integer",
        "minimum": MIN_ATTEMPTS,
        "maximum": MAX_ATTEMPTS,
        "default": DEFAULT_MAX_ATTEMPTS,
        "description": "Runs at most this many times: a failed attempt is retried while attempts remain.",
    },
    "timeout_seconds": {
        "type": ["number", "null"],
        "exclusiveMinimum": 0,
        "maximum": MAX_TIMEOUT_SECONDS,
        "description": "Each attempt's time limit; when absent or null, the operation's, else the worker's "
        "(`ASYNCPROC_HANDLER_TIMEOUT_SECONDS`).",
    },
    "callback_url": {
        "type": ["string", "null"],
        "maxLength": MAX_URL_LENGTH,
        "description": "An http(s) URL that is POSTed the task when it is finished, signed in "
        "`X-Asyncproc-Signature`; needs an API key or `ASYNCPROC_CALLBACK_SECRET`, and a public host "
        "unless `ASYNCPROC_CALLBACK_ALLOW` lists it.",
    },
}

BATCH_TASKS_DESCRIPTION = "The tasks, each a `POST /process` body; more than the maximum is a `413`."


def process_request(operations: Iterable[str]) -> dict[str, Any]:
    """The schema of a POST /process body, given the operations the API knows."""
    fields = dict(PROCESS_FIELDS)
    fields["operation"] = {**fields["operation"], "enum": [*operations, None]}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": fields,
        "not": {"required": ["run_at", "delay_seconds"]},
        "description": "Send run_at or delay_seconds, not both.",
    }


def batch_request(item: dict[str, Any]) -> dict[str, Any]:
    """The schema of a POST /process/batch body whose items are `item`."""
    return {
        "type": "object",
        "required": ["tasks"],
        "additionalProperties": False,
        "properties": {
            "tasks": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_BATCH_TASKS,
                "items": item,
                "description": BATCH_TASKS_DESCRIPTION,
            }
        },
    }


def value_rule(schema: dict[str, Any]) -> str:
    """What a schema accepts, in words: docs/api.md's tables and the API's 422 messages say it alike."""
    types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
    kind = next(name for name in types if name != "null")
    words = {"integer": "an integer", "number": "a number", "string": "a string", "object": "a JSON object",
             "array": "an array"}[kind]
    if schema.get("format") == "date-time":
        words = "an ISO 8601 timestamp"
    if "minimum" in schema and "maximum" in schema:
        words += f" from {schema['minimum']} to {schema['maximum']}"
    elif "exclusiveMinimum" in schema and "maximum" in schema:
        words += f" above {schema['exclusiveMinimum']} and at most {schema['maximum']}"
    if "maxLength" in schema:
        words += f" of at most {schema['maxLength']} characters"
    if "pattern" in schema:
        words += f" matching `{schema['pattern']}`"
    if "minItems" in schema and "maxItems" in schema:
        words += f" of {schema['minItems']} to {schema['maxItems']} items"
    if "null" in types:
        words += ", or null"
    return words


def _table(fields: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| field | value | default | meaning |", "|---|---|---|---|"]
    for name, schema in fields.items():
        default = f"`{json.dumps(schema['default'])}`" if "default" in schema else "none"
        lines.append(f"| `{name}` | {value_rule(schema)} | {default} | {schema['description']} |")
    return lines


BEGIN = "<!-- generated from asyncproc/contract.py by `python -m asyncproc.contract`, edit it there: "
END = "<!-- end of the generated table -->"
TABLES = {
    "POST /process": _table(PROCESS_FIELDS),
    "POST /process/batch": _table({"tasks": batch_request({})["properties"]["tasks"]}),
}


def render(document: str) -> str:
    """`document` with each generated table written anew: the lines between BEGIN, which names the
    table's route, and END."""
    lines = document.split("\n")
    rendered: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        rendered.append(line)
        index += 1
        if line.startswith(BEGIN):
            route = line[len(BEGIN):].removesuffix(" -->")
            rendered += TABLES[route]
            while lines[index] != END:
                index += 1
    return "\n".join(rendered)


API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def main() -> int:
    API_DOC.write_text(render(API_DOC.read_text()))
    print(f"wrote the request tables of {API_DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
