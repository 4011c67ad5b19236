"""StepCohort: concurrent sessions' steps run as one batch, with errors kept apart."""

from __future__ import annotations

import threading
import time

import pytest

from rayfin.llm.cohort import StepCohort


def _run_threads(n: int, target) -> list[object]:
    results: list[object] = [None] * n

    def wrap(i: int) -> None:
        try:
            results[i] = target(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_a_lone_session_runs_alone_and_at_once() -> None:
    seen: list[list[int]] = []
    cohort = StepCohort(
        lambda batch: seen.append(batch) or [x * 2 for x in batch], wait_s=5.0, active_within_s=60
    )
    begin = time.monotonic()
    assert [cohort.step("a", i) for i in range(3)] == [0, 2, 4]
    # Its own last step never makes it wait (wait_s is 5 s).
    assert time.monotonic() - begin < 2.0
    assert seen == [[0], [1], [2]]


def test_callers_arriving_during_a_batch_join_the_next_one() -> None:
    release = threading.Event()
    sizes: list[int] = []

    def run(batch: list[int]) -> list[int]:
        sizes.append(len(batch))
        if len(sizes) == 1:
            release.wait(10)  # hold the first batch until everyone else is queued
        return [x + 100 for x in batch]

    cohort = StepCohort(run, wait_s=0.0)
    first = threading.Thread(target=cohort.step, args=("s0", 0))
    first.start()
    while not sizes:
        time.sleep(0.001)

    def late(i: int) -> int:
        return cohort.step(f"s{i + 1}", i + 1)

    waiter = threading.Thread(target=lambda: results.extend(_run_threads(5, late)))
    results: list[object] = []
    waiter.start()
    while len(cohort._pending) < 5:
        time.sleep(0.001)
    release.set()
    first.join(10)
    waiter.join(10)
    assert results == [101, 102, 103, 104, 105]
    assert sizes == [1, 5]
    assert cohort.largest_batch == 5


def test_sessions_stay_in_step() -> None:
    """Two sessions stepping in a loop end up in every batch together (no alternation)."""

    def run(batch: list[int]) -> list[int]:
        time.sleep(0.01)
        return batch

    cohort = StepCohort(run, wait_s=0.5)
    steps = 20
    _run_threads(2, lambda i: [cohort.step(i, k) for k in range(steps)])
    assert cohort.largest_batch == 2
    assert cohort.batches <= steps + 1  # at most the very first step is apart


def test_errors_stay_with_their_session() -> None:
    def run(batch: list[int]) -> list[object]:
        time.sleep(0.05)
        return [ValueError(f"bad {x}") if x == 3 else x for x in batch]

    cohort = StepCohort(run)
    results = _run_threads(6, lambda i: cohort.step(i, i))
    assert isinstance(results[3], ValueError)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]


def test_a_failing_batch_fails_its_callers_and_not_the_next() -> None:
    calls = 0

    def run(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("server exploded")
        return batch

    cohort = StepCohort(run)
    with pytest.raises(RuntimeError, match="exploded"):
        cohort.step("a", 1)
    assert cohort.step("a", 2) == 2


def test_a_forgotten_session_is_not_waited_for() -> None:
    cohort = StepCohort(lambda batch: batch, wait_s=5.0, active_within_s=60)
    cohort.step("closed", 1)
    cohort.forget("closed")
    begin = time.monotonic()
    assert cohort.step("other", 2) == 2
    assert time.monotonic() - begin < 2.0
