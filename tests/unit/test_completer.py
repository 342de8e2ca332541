"""The completer's batching: outcomes that arrive together share one write, and each caller gets its own answer."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import pytest

from worker.completer import Completer


class Recorder:
    """A batch writer that keeps every batch and records the outcomes whose attempt is 1."""

    def __init__(self, fail_with: Exception | None = None):
        self.batches: list[list[tuple[UUID, int, object, int | None]]] = []
        self.fail_with = fail_with

    async def write(self, outcomes):
        self.batches.append(list(outcomes))
        await asyncio.sleep(0.01)  # a commit: what arrives meanwhile joins the next batch
        if self.fail_with is not None:
            raise self.fail_with
        return {task_id: ("recorded", result) for task_id, attempt, result, _ in outcomes if attempt == 1}


def test_outcomes_arriving_together_share_one_write_and_each_gets_its_answer():
    recorder = Recorder()
    completer = Completer(recorder.write, max_batch=100, linger=0.001)
    ids = [uuid4() for _ in range(10)]

    async def run():
        return await asyncio.gather(*(completer.complete(task_id, 1 if i % 2 == 0 else 2, i) for i, task_id in enumerate(ids)))

    answers = asyncio.run(run())
    assert len(recorder.batches) == 1
    assert answers == [("recorded", i) if i % 2 == 0 else None for i in range(10)]


def test_a_batch_never_exceeds_its_size_and_what_arrives_during_a_write_is_written_after_it():
    recorder = Recorder()
    completer = Completer(recorder.write, max_batch=4, linger=0.001)

    async def run():
        first = [asyncio.create_task(completer.complete(uuid4(), 1, i)) for i in range(6)]
        await asyncio.sleep(0.005)  # the first batch is being written now
        later = [asyncio.create_task(completer.complete(uuid4(), 1, i)) for i in range(6, 8)]
        return await asyncio.gather(*first, *later)

    answers = asyncio.run(run())
    assert len(recorder.batches[0]) == 4
    assert all(len(batch) <= 4 for batch in recorder.batches)
    assert sorted(result for batch in recorder.batches for _, _, result, _ in batch) == list(range(8))
    assert [result for _, result in answers] == list(range(8))


def test_a_failed_write_fails_every_caller_in_its_batch():
    completer = Completer(Recorder(fail_with=ValueError("refused")).write, linger=0.001)

    async def run():
        return await asyncio.gather(*(completer.complete(uuid4(), 1, i) for i in range(3)), return_exceptions=True)

    assert [str(answer) for answer in asyncio.run(run())] == ["refused"] * 3


def test_a_caller_cancelled_while_waiting_leaves_its_outcome_in_the_batch():
    recorder = Recorder()
    completer = Completer(recorder.write, linger=0.001)
    task_id = uuid4()

    async def run():
        waiting = asyncio.create_task(completer.complete(task_id, 1, "done", 7))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0.05)

    asyncio.run(run())
    assert recorder.batches == [[(task_id, 1, "done", 7)]]
