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
    existing scheduler at ``address`` (several GPUs or machines). ``gpus`` (dask, new cluster): one
    worker process per GPU instead — ``all`` (every GPU torch sees), a count, or a list of device ids
    — each started with ``CUDA_VISIBLE_DEVICES`` set to its own GPU, so its models land there
    (``t2iedit.models.default_device`` is then that GPU) and mapped generation/scoring tasks fan out
    over every GPU; ``cuda_cluster: true`` uses dask-cuda's ``LocalCUDACluster`` for the same (the
    optional ``gpu`` extra). On an existing cluster, start its workers per GPU yourself
    (``dask cuda worker`` or ``CUDA_VISIBLE_DEVICES=i dask worker``).
    """

    kind: Literal["thread", "dask"] = "thread"
    max_workers: int | None = Field(default=None, ge=1)
    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    address: str | None = None
    gpus: Literal["all"] | int | list[int] | None = None
    cuda_cluster: bool = False


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
    if runner.gpus is not None:
        devices = gpu_ids(runner.gpus)
        if runner.cuda_cluster:
            return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs={
                "CUDA_VISIBLE_DEVICES": ",".join(map(str, devices)),
                "threads_per_worker": runner.threads_per_worker, "dashboard_address": None})
        return DaskTaskRunner(cluster_class=per_gpu_cluster, cluster_kwargs={
            "devices": devices, "threads_per_worker": runner.threads_per_worker})
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


def gpu_ids(gpus: str | int | list[int]) -> list[int]:
    """``runner.gpus`` → device ids: ``all`` = every GPU torch sees (error if none), ``n`` = 0..n−1."""
    if gpus == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError("runner.gpus: all, but no GPU is visible (CUDA_VISIBLE_DEVICES, drivers)")
        return list(range(n))
    if isinstance(gpus, int):
        return list(range(gpus))
    if not gpus or len(set(gpus)) != len(gpus):
        raise ValueError(f"runner.gpus: expected distinct device ids, got {gpus!r}")
    return [int(g) for g in gpus]


def per_gpu_cluster(devices: list[int], threads_per_worker: int = 1, asynchronous: bool = False):
    """A local Dask cluster with one worker process per device id, each started with
    ``CUDA_VISIBLE_DEVICES=<id>`` (it sees only its GPU, as ``cuda:0``)."""
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {f"gpu{d}": {"cls": Nanny, "options": {"nthreads": threads_per_worker,
                                                     "env": {"CUDA_VISIBLE_DEVICES": str(d)}}}
               for d in devices}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
                       asynchronous=asynchronous)


def with_runner(flow: Flow, params_file: str | Path = PARAMS_FILE) -> Flow:
    """``flow`` with the task runner configured in params.yaml's ``runner`` section."""
    return flow.with_options(task_runner=make_task_runner(load_runner(params_file)))


def run_stage(flow: Flow, params_file: str | Path = PARAMS_FILE, **kwargs: Any) -> Any:
    """Entry point of ``python -m flows.<stage>``: run the flow with the configured task runner.

    Without a configured Prefect API the stage reports to the local server it shares with the other
    stages (``flows.shared_server``: one start-up per ``dvc repro``, not one per stage). An exception in
    the flow propagates, so the process exits non-zero and DVC marks the stage failed.
    """
    from flows.shared_server import shared_api

    with shared_api():
        return with_runner(flow, params_file)(params_file=str(params_file), **kwargs)
