"""Stage report: the run on one page — what is real in it, the text-space table, the image metrics and,
per edit, a before/after grid titled with the edit (source → target) and followed by its prompts.

``python -m flows.report`` (DVC stage ``report``) reads params.yaml ``report``, ``generate`` (the
methods) and ``metrics.clip`` (whether the judge is a real CLIP), the locked model (its preset),
data/text_space/summary/{metrics.json, table.md}, data/eval/metrics/summary/{categories.csv, table.md},
data/eval/metrics/<method>/per_image.parquet, the edits and eval prompts and data/eval/images/; writes
data/eval/report/{report.md, text_space.png, categories.png, grids/<edit_id>.png}. report.md links
the pictures beside it (a file viewer; the PNGs are also ``dvc plots``, which need no Vega to show);
the Prefect artifact ``eval-report`` is the same Markdown with the pictures embedded as ``data:`` URIs
(the UI cannot follow relative links).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import Field

from flows.reporting import logger, markdown_artifact
from flows.stage import PARAMS_FILE, StageParams, load_params, read_params, run_stage
from flows.generate import EVAL_PROMPTS, IMAGES, MODELS_DIR, OUT, GenerateParams
from flows.metrics import METRICS_DIR
from tasks.fingerprints import fingerprint
from tasks.model import locked_model
from tasks.report import REPORT_MD, embed_images, write_report

REPORT_DIR = OUT / "report"
EDITS = Path("data/processed/datasets/edits.parquet")
TEXT_SPACE = Path("data/text_space/summary")
CODE = ["t2iedit.plots", "t2iedit.text_space", "tasks.report"]


class ReportParams(StageParams):
    grids: int = Field(default=4, ge=0)   # number of edits with a before/after grid
    title: str = "Evaluation"


@flow(name="report")
def report(params_file: str = PARAMS_FILE) -> Path:
    g = load_params("generate", GenerateParams, params_file)
    p = load_params("report", ReportParams, params_file)
    judge = str((read_params(params_file).get("metrics") or {}).get("clip", "tiny"))
    preset = locked_model(MODELS_DIR).preset
    per_image = {m: METRICS_DIR / m for m in g.methods if (METRICS_DIR / m / "per_image.parquet").is_file()}
    summary = METRICS_DIR / "summary"
    text_space = TEXT_SPACE if (TEXT_SPACE / "metrics.json").is_file() else None
    inputs = [EVAL_PROMPTS, EDITS, summary / "categories.csv", summary / "table.md",
              *(d / "per_image.parquet" for d in per_image.values()),
              *([text_space / "metrics.json", text_space / "table.md"] if text_space else [])]
    fp = fingerprint("report", p, inputs=inputs, code=CODE, extra={"preset": preset, "judge": judge})
    out = write_report(REPORT_DIR, fp, summary, per_image, EVAL_PROMPTS, EDITS, IMAGES, text_space,
                       preset, judge, p.grids, p.title)
    md = (out / REPORT_MD).read_text(encoding="utf-8")
    markdown_artifact("eval-report", embed_images(md, out),
                      description=f"{out / REPORT_MD}, pictures embedded")
    logger().info("report in %s", out)
    return out


if __name__ == "__main__":
    run_stage(report)
