"""End to end: a batch through HTTP runs to completion on a real worker."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import wait_for

pytestmark = pytest.mark.e2e


def test_a_batch_of_200_completes(service, conn):
    items = [{"data": {"operation": "compute", "n": i}} for i in range(200)]
    response = requests.post(f"{service.base_url}/process/batch", json={"tasks": items}, timeout=10)
    assert response.status_code == 202, response.text
    task_ids = [item["task_id"] for item in response.json()["tasks"]]
    assert len(set(task_ids)) == 200

    def all_completed():
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'completed') AS done, count(*) AS total"
            " FROM tasks WHERE task_id = ANY(%s::uuid[])",
            (task_ids,),
        ).fetchone()
        return row["done"] == row["total"] == 200

    wait_for(all_completed, 60, f"200 batched tasks to complete (logs in {service.logs})", interval=0.1)
    results = [service.get(task_id).json()["result"] for task_id in task_ids[:3] + task_ids[-3:]]
    assert results == [i * (i - 1) // 2 for i in (0, 1, 2, 197, 198, 199)]
