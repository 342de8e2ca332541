"""gunicorn serving create_app(): the API's only server."""

from __future__ import annotations

from gunicorn.app.base import BaseApplication

from asyncproc import logs
from asyncproc.config import Settings


class ApiServer(BaseApplication):
    def __init__(self, settings: Settings, bind: str, workers: int):
        self.settings = settings
        self.options = {
            "bind": bind,
            "workers": workers,
            # Threads let one process serve slow clients and long polls without
            # blocking the others; each thread borrows a pooled connection.
            "worker_class": "gthread",
            "threads": settings.api_threads,
            "timeout": 30,
            "graceful_timeout": 10,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": settings.log_level.lower(),
            "proc_name": "asyncproc-api",
            # Several APIs may run on one host (tests, scaling out); none needs it.
            "control_socket_disable": True,
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        # Runs in each gunicorn worker after fork, so every process opens its own pool.
        from asyncproc.api import create_app

        logs.configure(self.settings.log_level)
        return create_app(self.settings)


def run(settings: Settings, bind: str, workers: int) -> None:
    ApiServer(settings, bind, workers).run()
