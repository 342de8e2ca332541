"""The dashboard: server-rendered pages to see and steer the queue.

Every page reads through the named queries of sql/dashboard.sql (see
queries.py) and shows each one under "Show SQL". Reading works with JavaScript
off; static/dashboard.js only keeps a task's page and the task list live, from
the tasks' event streams (live.py merges the list's into one).
"""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    from asyncproc.dashboard.views import bp

    app.register_blueprint(bp)
