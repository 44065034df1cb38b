"""Stage report: pictures of the evaluation — per-category bars across methods and, per edit, a
before/after grid (source prompt and a specificity prompt; unedited vs edited, seed = the first).

``python -m flows.report`` (DVC stage ``report``) reads params.yaml ``report``,
data/eval/metrics/summary/categories.csv, data/eval/metrics/<method>/per_image.parquet and
data/eval/images/; writes data/eval/report/{report.md, categories.png, grids/<edit_id>.png};
report.md is also published as the Prefect artifact ``eval-report``.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import Field

from flows.reporting import logger, markdown_artifact
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from flows.generate import EVAL_PROMPTS, IMAGES, OUT, GenerateParams
from flows.metrics import METRICS_DIR
from tasks.fingerprints import fingerprint
from tasks.evaluate import CATEGORIES_CSV, PER_IMAGE, REPORT_MD, TABLE_MD, write_report

REPORT_DIR = OUT / "report"
CODE = ["t2iedit.plots", "tasks.evaluate"]


class ReportParams(StageParams):
    grids: int = Field(default=4, ge=0)   # number of edits with a before/after grid
    title: str = "Evaluation"


@flow(name="report")
def report(params_file: str = PARAMS_FILE) -> Path:
    g = load_params("generate", GenerateParams, params_file)
    p = load_params("report", ReportParams, params_file)
    per_image = {m: METRICS_DIR / m for m in g.methods}
    summary = METRICS_DIR / "summary"
    fp = fingerprint("report", p, inputs=[EVAL_PROMPTS, summary / CATEGORIES_CSV, summary / TABLE_MD,
                                         *(d / PER_IMAGE for d in per_image.values())], code=CODE)
    out = write_report(REPORT_DIR, fp, METRICS_DIR / "summary", per_image, EVAL_PROMPTS, IMAGES,
                       p.grids, p.title)
    markdown_artifact("eval-report", (out / REPORT_MD).read_text(encoding="utf-8"),
                      description=f"{out / REPORT_MD} (pictures: relative links beside it)")
    logger().info("report in %s", out)
    return out


if __name__ == "__main__":
    run_stage(report)
