"""The whole pipeline as one Prefect flow, for users who run Prefect without DVC.

``python -m flows.pipeline`` runs every stage flow in dvc.yaml's order as a subflow of one flow run,
in one process (one Prefect start-up, not one per stage). Each stage reuses its valid outputs
(stamps), so rerunning after a change or a crash recomputes only what is stale or unfinished.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from prefect import Flow, flow

from flows.reporting import logger, markdown_artifact
from flows.stage import PARAMS_FILE, make_task_runner, load_runner

# The stage order, in one place: (DVC stage name, flow module). dvc.yaml uses the same names and
# `cmd: python -m flows.<module>`; tests/test_pipeline_dvc.py checks the two agree.
STAGES: tuple[tuple[str, str], ...] = (
    ("prepare_model", "flows.prepare_model"),
    ("prepare_datasets", "flows.prepare_datasets"),
    ("prepare_corpus", "flows.prepare_corpus"),
    ("statistics", "flows.key_statistics"),
    ("projector", "flows.projector"),
    ("ner", "flows.ner"),
    ("values", "flows.values"),
    ("edit", "flows.edit"),
    ("text_space", "flows.text_space"),
    ("generate", "flows.generate"),
    ("metrics", "flows.metrics"),
    ("report", "flows.report"),
)


def stage_flow(module_name: str) -> Flow | None:
    """The Prefect flow of a stage module (its single module-level ``Flow``), None if not written yet."""
    if importlib.util.find_spec(module_name) is None:
        return None
    module = importlib.import_module(module_name)
    flows = [v for v in vars(module).values() if isinstance(v, Flow) and v.fn.__module__ == module_name]
    if len(flows) != 1:
        raise RuntimeError(f"{module_name} must define exactly one flow, found {len(flows)}")
    return flows[0]


def available_stages() -> list[tuple[str, Flow]]:
    return [(name, f) for name, mod in STAGES if (f := stage_flow(mod)) is not None]


@flow(name="pipeline")
def pipeline(params_file: str = PARAMS_FILE, only: list[str] | None = None) -> dict[str, Any]:
    """Run the stage flows in order (``only``: a subset of stage names, still in pipeline order)."""
    log = logger()
    runner = load_runner(params_file)
    stages = available_stages()
    missing = [name for name, _ in STAGES if name not in {n for n, _ in stages}]
    if missing:
        log.warning("stages not implemented yet, skipped: %s", ", ".join(missing))
    results: dict[str, Any] = {}
    for name, stage in stages:
        if only is not None and name not in only:
            continue
        log.info("stage %s", name)
        results[name] = stage.with_options(task_runner=make_task_runner(runner))(params_file=params_file)
    markdown_artifact("pipeline-summary", "## Pipeline\n\n" + "\n".join(
        f"- `{name}`: {results[name]!s:.200}" for name in results) + "\n")
    return results


if __name__ == "__main__":
    pipeline()
