"""When a task's failure is worth another attempt: the one ``retry_condition_fn`` of every task with retries."""

from __future__ import annotations

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from mtpress.errors import is_transient


def retry_if_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry only what another attempt can get past (``mtpress.errors.is_transient``: 5xx, 429 with Retry-After,
    a dropped connection, a timeout). Bad input, a failed check, a refused token and a 412 fail at once: a
    retry would repeat them, and after a 412 would plan against another writer's commit and delete their files."""
    return is_transient(state.result(raise_on_failure=False))
