"""The dashboard: server-rendered pages to see and steer the queue.

Every page reads through the named queries of sql/dashboard.sql (see
queries.py) and shows each one under "Show SQL". Reading works with JavaScript
off; static/dashboard.js only adds live progress on a task's page.
"""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    from asyncproc.dashboard.views import bp

    app.register_blueprint(bp)
