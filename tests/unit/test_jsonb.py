from __future__ import annotations

import json

import pytest

from asyncproc import jsonb

UNDECODABLE = {
    "a 5,000-digit integer": '{"n": ' + "9" * 5000 + "}",
    "3,000 levels of nesting": "[" * 3000 + "]" * 3000,
    "a number past a float": '{"x": 1e400}',
}


@pytest.mark.parametrize("text", UNDECODABLE.values(), ids=UNDECODABLE.keys())
def test_what_python_cannot_decode_is_kept_and_written_back_verbatim(text):
    value = jsonb.loads(text.encode())
    assert value == jsonb.RawJson(text)
    assert jsonb.dumps({"status": "completed", "result": value, "error": None}) == (
        '{"status":"completed","result":' + text + ',"error":null}'
    )


def test_ordinary_json_decodes_as_usual():
    assert jsonb.loads(b'{"a": [1, 2.5, "x", null]}') == {"a": [1, 2.5, "x", None]}
    assert jsonb.dumps({"a": [1, 2.5]}) == json.dumps({"a": [1, 2.5]}, separators=(",", ":"))
