"""Serve the pipeline as a scheduled Prefect deployment (the long-running alternative to ``dvc repro``).

    prefect server start                                    # terminal 1: API + UI on :4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api        # terminal 2
    python -m flows.serve --cron "0 3 * * *"                # registers + serves; Ctrl-C pauses it

The deployment ``pipeline/t2iedit`` runs ``flows.pipeline`` on the schedule (and on demand:
``prefect deployment run pipeline/t2iedit``). Its runs, logs and artifacts (metric tables, report)
show in the UI. Stages reuse valid outputs through their stamps, so a scheduled run after no change is
cheap.
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.stage import PARAMS_FILE
from flows.pipeline import pipeline

DEFAULT_NAME = "t2iedit"
DEFAULT_CRON = "0 3 * * *"  # nightly, 03:00


def build_deployment(name: str = DEFAULT_NAME, cron: str = DEFAULT_CRON,
                     params_file: str = PARAMS_FILE) -> RunnerDeployment:
    return pipeline.to_deployment(
        name=name, cron=cron, parameters={"params_file": params_file},
        description="The t2iedit pipeline (flows.pipeline) on a schedule.", tags=["t2iedit"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default=DEFAULT_NAME)
    ap.add_argument("--cron", default=DEFAULT_CRON, help="schedule (cron syntax, server time zone UTC)")
    ap.add_argument("--params-file", default=PARAMS_FILE)
    args = ap.parse_args(argv)
    serve(build_deployment(args.name, args.cron, args.params_file))


if __name__ == "__main__":
    main()
