"""What a stage run tells its user: the run logger, progress (log lines and a Prefect progress artifact),
Markdown and table artifacts."""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Iterable, Iterator, TypeVar

from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


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
