"""Concurrent inference sessions of one client step together.

Threads that step their own sessions (a Serve replica answering several requests, a
researcher's thread pool) hand their steps to a :class:`StepCohort`. One of them, the
leader, runs everyone's step as one unit: a single call per server carrying every
session's hidden states, which the server batches into one forward, and one pass of the
LM head over all rows, whose 113 MB weight matrix (SmolLM2, fp32) is then read once
instead of once per session.

Whoever arrives while a cohort step is running joins the next one. The next leader also
waits briefly for sessions that have just finished a step and are expected back, so that
sessions stay in step with each other instead of splitting into groups that alternate;
a lone session never waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

# A session that finished a step this recently is expected back for the next one.
ACTIVE_WITHIN_S = 0.5


class _Request:
    __slots__ = ("done", "error", "key", "lead", "payload", "result")

    def __init__(self, key: Hashable, payload: Any) -> None:
        self.key = key
        self.payload = payload
        self.result: Any = None
        self.error: BaseException | None = None
        self.lead = False
        self.done = False


class StepCohort:
    """Runs ``run`` once over the steps of every thread calling :meth:`step` together.

    ``run`` gets the payloads and returns one result per payload, or the exception that
    failed that payload alone; an exception raised by ``run`` fails the whole batch.
    """

    def __init__(
        self,
        run: Callable[[list[Any]], list[Any]],
        *,
        wait_s: float = 0.005,
        active_within_s: float = ACTIVE_WITHIN_S,
    ) -> None:
        self.run = run
        self.wait_s = wait_s
        self.active_within_s = active_within_s
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._busy = False
        # Keys of sessions between two steps, with when their last step ended.
        self._resting: dict[Hashable, float] = {}
        self.batches = 0
        self.largest_batch = 0

    def step(self, key: Hashable, payload: Any) -> Any:
        """Run ``payload`` (the step of session ``key``) with whatever else is due."""
        request = _Request(key, payload)
        with self._cond:
            self._resting.pop(key, None)
            self._pending.append(request)
            self._cond.notify_all()
            if self._busy:
                while not (request.done or request.lead):
                    self._cond.wait()
            else:
                self._busy = request.lead = True
            if not request.done:
                batch = self._gather()
        if not request.done:
            self._run(batch)
        if request.error is not None:
            raise request.error
        return request.result

    def forget(self, key: Hashable) -> None:
        """Session ``key`` is closed: nobody waits for it any more."""
        with self._cond:
            self._resting.pop(key, None)

    def _gather(self) -> list[_Request]:
        """(Leader, under the lock) wait up to ``wait_s`` for sessions that just stepped,
        then take every pending request."""
        deadline = time.monotonic() + self.wait_s
        while True:
            now = time.monotonic()
            due = any(now - ended < self.active_within_s for ended in self._resting.values())
            if not due or now >= deadline:
                break
            self._cond.wait(deadline - now)
        batch, self._pending = self._pending, []
        return batch

    def _run(self, batch: list[_Request]) -> None:
        try:
            results = self.run([r.payload for r in batch])
            for request, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    request.error = result
                else:
                    request.result = result
        except BaseException as exc:
            for request in batch:
                request.error = exc
        ended = time.monotonic()
        with self._cond:
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            for request in batch:
                request.done = True
                self._resting[request.key] = ended
            if self._pending:  # hand the lead to the first waiter of the next batch
                self._pending[0].lead = True
            else:
                self._busy = False
            self._cond.notify_all()
