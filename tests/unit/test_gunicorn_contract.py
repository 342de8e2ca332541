"""What asyncproc.api relies on in the installed gunicorn, private or not.

Any gunicorn release may change a private name without notice: on the first
one that does, these fail and say which name changed. setup.cfg admits only the
gunicorn versions where they, and the tests of the API's limits
(tests/e2e/test_waiting.py, tests/e2e/test_api_processes.py), passed.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re

import pytest
from gunicorn import __version__ as gunicorn_version
from gunicorn.asgi import protocol
from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers import base, gasgi

from asyncproc.api import asgi
from asyncproc.api.gunicorn_adapter import PRIVATE_NAMES


def _resolve(dotted: str) -> object:
    """The object a dotted name names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("name", sorted(PRIVATE_NAMES))
def test_each_private_name_the_adapter_relies_on_is_there_with_its_signature(name):
    try:
        found = _resolve(name)
    except (ImportError, AttributeError):
        pytest.fail(f"gunicorn {gunicorn_version} has no {name}: asyncproc.api.gunicorn_adapter relies on it")
    signature = str(inspect.signature(found))
    assert signature == PRIVATE_NAMES[name], (
        f"gunicorn {gunicorn_version} changed {name} to {signature}; "
        f"asyncproc.api.gunicorn_adapter expects {PRIVATE_NAMES[name]}"
    )


@pytest.mark.parametrize(("status", "error"), [(400, "a malformed request"), (414, "a request line over its limit"),
                                               (431, "a header over its limit")])
def test_gunicorn_answers_its_parser_errors_through_the_method_the_adapter_overrides(status, error):
    source = inspect.getsource(protocol)
    assert re.search(rf"self\._send_error_response\(\s*{status}\b", source), (
        f"gunicorn {gunicorn_version} no longer answers {error} ({status}) through "
        "gunicorn.asgi.protocol.ASGIProtocol._send_error_response: "
        "asyncproc.api.gunicorn_adapter's JSON answer would not be used"
    )


def test_the_connections_drive_gunicorns_protocol_through_asyncios_protocol_interface():
    # asyncproc.api.asgi._Connection builds it with its constructor and feeds it as an asyncio.Protocol.
    assert str(inspect.signature(ASGIProtocol.__init__)) == "(self, worker)", inspect.signature(ASGIProtocol.__init__)
    assert issubclass(ASGIProtocol, asyncio.Protocol)
    assert not issubclass(ASGIProtocol, asyncio.BufferedProtocol), "it would be fed by get_buffer(), not data_received()"


def test_the_worker_overrides_what_gunicorns_base_worker_leaves_to_subclasses():
    # gunicorn's documented contract: init_process() sets the process up, calls
    # init_signals(), loads the application, then calls run(), the main loop.
    steps = inspect.getsource(base.Worker.init_process)
    assert steps.index("self.init_signals()") < steps.index("self.load_wsgi()") < steps.index("self.run()")
    assert issubclass(asgi.Worker, gasgi.ASGIWorker)
    assert {"init_signals", "run"} <= set(vars(asgi.Worker))
