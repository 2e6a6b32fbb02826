"""Stages more than one flow runs, wrapped as Prefect tasks once, with their retries."""

from __future__ import annotations

from prefect import task

from flows.retries import retry_if_transient
from mtpress.stages import bench, convert, download, inject

fetch_task = task(download.fetch, name="fetch", retries=3, retry_delay_seconds=[2, 10, 30],
                  retry_condition_fn=retry_if_transient)
inject_task = task(inject.inject, name="inject")
convert_task = task(convert.convert, name="convert")
bench_task = task(bench.bench, name="bench")
