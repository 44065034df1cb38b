"""What every stage flow shares: params sections, the task runner, logging, artifacts, the entry point.

A stage module looks like (see docs/ARCHITECTURE.md, "Adding a stage")::

    class StatisticsParams(StageParams):
        corpus: str
        max_texts: int

    @flow(name="statistics")
    def statistics(params_file: str = PARAMS_FILE) -> list[Path]:
        p = load_params("statistics", StatisticsParams, params_file)
        ...

    if __name__ == "__main__":
        run_stage(statistics)
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, TypeVar

import yaml
from prefect import Flow
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field

PARAMS_FILE = "params.yaml"
RUNNER_SECTION = "runner"

P = TypeVar("P", bound=BaseModel)


class StageParams(BaseModel):
    """Base of every params.yaml section model: unknown keys fail, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RunnerParams(StageParams):
    """How a flow fans out its tasks. Not a DVC param of any stage: it never changes a result.

    ``thread``: Prefect's ThreadPoolTaskRunner (``max_workers``, default Prefect's choice).
    ``dask``: prefect-dask's DaskTaskRunner on a new LocalCluster of ``n_workers`` processes, or on an
    existing scheduler at ``address`` (several GPUs or machines).
    """

    kind: Literal["thread", "dask"] = "thread"
    max_workers: int | None = Field(default=None, ge=1)
    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    address: str | None = None


def read_params(params_file: str | Path = PARAMS_FILE) -> dict[str, Any]:
    with open(params_file, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{params_file}: expected a mapping of sections")
    return data


def load_params(section: str, model: type[P], params_file: str | Path = PARAMS_FILE) -> P:
    """Validate one params.yaml section into its frozen pydantic model (unknown keys fail)."""
    data = read_params(params_file)
    if section not in data:
        raise KeyError(f"{params_file} has no section {section!r}")
    return model.model_validate(data[section] or {})


def load_runner(params_file: str | Path = PARAMS_FILE) -> RunnerParams:
    """The ``runner`` section (optional; defaults to threads)."""
    data = read_params(params_file)
    return RunnerParams.model_validate(data.get(RUNNER_SECTION) or {})


def make_task_runner(runner: RunnerParams) -> TaskRunner:
    if runner.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    from prefect_dask import DaskTaskRunner  # imported only when asked: dask is slow to import

    if runner.address:
        return DaskTaskRunner(address=runner.address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": runner.n_workers, "threads_per_worker": runner.threads_per_worker,
                        "processes": True, "dashboard_address": None},
    )


def with_runner(flow: Flow, params_file: str | Path = PARAMS_FILE) -> Flow:
    """``flow`` with the task runner configured in params.yaml's ``runner`` section."""
    return flow.with_options(task_runner=make_task_runner(load_runner(params_file)))


def run_stage(flow: Flow, params_file: str | Path = PARAMS_FILE, **kwargs: Any) -> Any:
    """Entry point of ``python -m flows.<stage>``: run the flow with the configured task runner.

    An exception in the flow propagates, so the process exits non-zero and DVC marks the stage failed.
    """
    return with_runner(flow, params_file)(params_file=str(params_file), **kwargs)


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow/task run (shown in the UI); a plain logger outside."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("t2iedit.flows")


def _in_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def markdown_artifact(key: str, markdown: str, description: str | None = None) -> None:
    """Publish Markdown (e.g. a report) as a Prefect artifact; a no-op outside a run."""
    if _in_run():
        create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description)


def table_artifact(key: str, rows: list[dict[str, Any]], description: str | None = None) -> None:
    """Publish a table (list of row dicts, e.g. a metrics table) as a Prefect artifact."""
    if _in_run():
        create_table_artifact(table=rows, key=artifact_key(key), description=description)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a GitHub-flavoured Markdown table (for reports and job summaries)."""
    if not rows:
        return "_(empty)_\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


T = TypeVar("T")


def track(items: Iterable[T], desc: str, total: int | None = None, every_s: float = 10.0) -> Iterator[T]:
    """Iterate with progress: a Prefect progress artifact plus a log line (rate) every ``every_s`` s."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    log = logger()
    progress_id = create_progress_artifact(0.0, description=desc) if _in_run() and total else None
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s or done == total:
            last = now
            rate = done / max(now - start, 1e-9)
            log.info("%s: %d/%s (%.2f/s)", desc, done, total if total else "?", rate)
            if progress_id is not None:
                update_progress_artifact(progress_id, 100.0 * done / total)
