"""The publish flow's background lane: tasks started there belong to the flow run, and a failure stops the build."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prefect import flow, task

from flows.publish import _in_run_context, _raise_first_failure


@task
def where_am_i() -> str:
    from prefect.context import get_run_context

    return str(get_run_context().task_run.flow_run_id)


def test_a_task_on_the_lane_is_a_task_run_of_the_flow(prefect_harness):
    @flow
    def parent() -> tuple[str, str]:
        from prefect.context import get_run_context

        with ThreadPoolExecutor(max_workers=1) as lane:
            future = _in_run_context(lane, where_am_i)
            return str(get_run_context().flow_run.id), future.result()

    flow_run_id, seen_by_task = parent()
    assert seen_by_task == flow_run_id


def test_a_failure_on_the_lane_is_raised_at_the_next_check_not_at_the_end():
    release = threading.Event()

    def fails():
        raise RuntimeError("smoke Demo-Q4_K_M.gguf: greedy output differs")

    with ThreadPoolExecutor(max_workers=2) as lane:
        futures = [lane.submit(release.wait, 30), lane.submit(fails)]
        deadline = time.monotonic() + 10
        while not futures[1].done() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(RuntimeError, match="greedy output differs"):
            _raise_first_failure(futures)  # the first future is still running
        release.set()
    _raise_first_failure([futures[0]])  # a finished, successful future raises nothing
