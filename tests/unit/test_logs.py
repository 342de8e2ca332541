"""The JSON log format: one object per line, carrying the request id."""

from __future__ import annotations

import json
import logging

from asyncproc import logs


def _record(message: str, *args, exc_info=None) -> logging.LogRecord:
    record = logging.LogRecord("asyncproc.test", logging.WARNING, __file__, 1, message, args, exc_info)
    logs.RequestIdFilter().filter(record)
    return record


def test_a_json_line_carries_the_event_and_the_request_id():
    token = logs.request_id_var.set("rid-1")
    try:
        line = logs.formatter("json").format(_record("task %s failed: %s", "t1", "boom"))
    finally:
        logs.request_id_var.reset(token)
    event = json.loads(line)
    assert event["message"] == "task t1 failed: boom"
    assert event["request_id"] == "rid-1"
    assert (event["level"], event["logger"]) == ("WARNING", "asyncproc.test")
    assert event["ts"].endswith("+00:00") and isinstance(event["pid"], int)


def test_a_traceback_stays_inside_its_one_line():
    try:
        raise ValueError("line one\nline two")
    except ValueError as exc:
        line = logs.formatter("json").format(_record("failed", exc_info=(type(exc), exc, exc.__traceback__)))
    assert "\n" not in line
    assert "ValueError: line one\nline two" in json.loads(line)["exception"]


def test_the_text_format_names_the_request_id():
    token = logs.request_id_var.set("rid-2")
    try:
        line = logs.formatter("text").format(_record("hello"))
    finally:
        logs.request_id_var.reset(token)
    assert line.endswith("asyncproc.test [rid=rid-2] hello")


def test_a_text_line_escapes_control_characters_so_no_line_can_be_forged():
    line = logs.formatter("text").format(_record("bad key %s", "k\n2026-01-01 INFO forged\r\x00\x1b[31m\x9b"))
    assert "\n" not in line and "\r" not in line and "\x00" not in line and "\x1b" not in line and "\x9b" not in line
    assert line.endswith("bad key k\\n2026-01-01 INFO forged\\r\\x00\\x1b[31m\\x9b")
