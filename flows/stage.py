"""How a stage flow is configured and run: its params.yaml section, the task runner, the entry point.

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

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from prefect import Flow
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


def generate_hw(params_file: str | Path = PARAMS_FILE) -> tuple[int | None, int | None]:
    """params.yaml's ``generate.height`` / ``generate.width`` (None: the model's own size,
    ``tasks.model.image_size``): the size generate, compare, fid and the values latents generate at."""
    section = read_params(params_file).get("generate") or {}
    out = []
    for name in ("height", "width"):
        v = section.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 8 or v % 8):
            raise ValueError(f"{params_file}: generate.{name} must be a multiple of 8 (>= 8) or null, got {v!r}")
        out.append(v)
    return out[0], out[1]


def with_runner(flow: Flow, params_file: str | Path = PARAMS_FILE) -> Flow:
    """``flow`` with the task runner configured in params.yaml's ``runner`` section."""
    return flow.with_options(task_runner=make_task_runner(load_runner(params_file)))


def run_stage(flow: Flow, params_file: str | Path = PARAMS_FILE, **kwargs: Any) -> Any:
    """Entry point of ``python -m flows.<stage>``: run the flow with the configured task runner.

    An exception in the flow propagates, so the process exits non-zero and DVC marks the stage failed.
    """
    return with_runner(flow, params_file)(params_file=str(params_file), **kwargs)
