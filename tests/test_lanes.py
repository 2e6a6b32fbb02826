"""The publish flow's concurrency, in Prefect's own terms: a lane runs its tasks one at a time in order, and a
failure is reported as the task that failed, not as the tasks left waiting behind it."""

import time

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.release import Lane, settle


@task(cache_policy=NO_CACHE)
def span(seconds: float) -> tuple[float, float]:
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


@task(cache_policy=NO_CACHE)
def fails(message: str) -> None:
    raise RuntimeError(message)


def test_a_lane_runs_one_task_at_a_time_in_order_beside_other_work(prefect_harness):
    @flow
    def lanes():
        lane = Lane()
        beside = span.submit(0.6)  # not on the lane: free to run alongside
        for seconds in (0.3, 0.1, 0.2):
            lane.submit(span, seconds)
        return settle(lane.futures), beside.result()

    spans, beside = lanes()
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:]))
    assert beside[0] < spans[-1][1] and spans[0][0] < beside[1]  # the lane did not wait for unrelated work


def test_settle_raises_the_failure_itself_not_the_tasks_left_waiting_behind_it(prefect_harness):
    @flow
    def matrix():
        lane = Lane()
        first = lane.submit(fails, "smoke T-BF16.gguf: 0 of 91 drafted tokens accepted")
        behind = [lane.submit(span, 0.0), span.submit(0.0, wait_for=[first])]
        settle([*behind, first])

    with pytest.raises(RuntimeError, match="0 of 91 drafted tokens accepted"):
        matrix()
