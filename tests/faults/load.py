"""A small HTTP load generator that records every answer, for fault tests."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import requests

# No request may take longer than this, whatever state the database is in.
REQUEST_TIMEOUT_SECONDS = 10.0


@dataclass
class Answer:
    method: str
    status: int
    seconds: float
    body: dict | None
    at: float


@dataclass
class Load:
    """Clients that POST tasks and read them back until stopped."""

    base_url: str
    clients: int = 4
    # Each client sends these in turn.
    bodies: list[dict] = field(default_factory=lambda: [{"operation": "compute", "data": {"n": 1000}}])
    pause: float = 0.02
    answers: list[Answer] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> "Load":
        for number in range(self.clients):
            thread = threading.Thread(target=self._client, name=f"load-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_SECONDS * 3)
            assert not thread.is_alive(), f"{thread.name} did not stop"

    def _send(self, session: requests.Session, method: str, path: str, **kwargs) -> Answer:
        """One request; a transport failure is recorded as status 0, for the test to assert on."""
        started = time.monotonic()
        try:
            response = session.request(method, self.base_url + path, timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)
        except requests.RequestException as exc:
            status, body = 0, {"exception": repr(exc)}
        else:
            status, body = response.status_code, _json(response)
        answer = Answer(method, status, time.monotonic() - started, body, time.monotonic())
        with self._lock:
            self.answers.append(answer)
        return answer

    def _client(self) -> None:
        session = requests.Session()
        mine: list[str] = []
        sent = 0
        while not self._stop.is_set():
            answer = self._send(session, "POST", "/process", json=self.bodies[sent % len(self.bodies)])
            sent += 1
            if 200 <= answer.status < 300:
                mine.append(answer.body["task_id"])
                with self._lock:
                    self.accepted.append(answer.body["task_id"])
            if mine:
                self._send(session, "GET", f"/results/{mine[-1]}")
            self._stop.wait(self.pause)

    def errors(self) -> list[Answer]:
        """Answers that are neither 2xx nor the database-down 503."""
        return [a for a in self.answers if not (200 <= a.status < 300 or _is_database_down(a))]

    def outage_answers(self) -> list[Answer]:
        return [a for a in self.answers if _is_database_down(a)]

    def slowest(self) -> float:
        return max((a.seconds for a in self.answers), default=0.0)


def _json(response: requests.Response) -> dict | None:
    try:
        return response.json()
    except ValueError:
        return None


def _is_database_down(answer: Answer) -> bool:
    return (
        answer.status == 503
        and answer.body is not None
        and answer.body.get("error", {}).get("code") == "database_unavailable"
    )
