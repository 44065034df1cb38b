"""Stage prepare_datasets: verify the raw files and build the edit set.

``python -m flows.prepare_datasets`` (DVC stage ``prepare_datasets``) reads params.yaml ``datasets``
and writes data/processed/datasets/{edits,eval_prompts}.parquet + report.{json,md}. The preserved-key
corpus is a stage of its own (``flows.prepare_corpus``), so changing the dataset never touches the
statistics' inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow
from pydantic import Field, model_validator

from flows.reporting import logger, markdown_artifact
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from tasks.fingerprints import fingerprint
from tasks.edit_data import REPORT_MD, prepare_edit_set, verified_raw

RAW_DIR = Path("data/raw")
MANIFEST = RAW_DIR / "MANIFEST.json"
DOWNLOAD_DIR = Path("data/interim/raw")
DATASETS_DIR = Path("data/processed/datasets")
TOKENIZER_DIR = Path("t2iedit/assets/clip-tokenizer")  # 77-token checks
CODE = ["t2iedit.edit_data", "t2iedit.storage", "tasks.edit_data"]


class DatasetsParams(StageParams):
    name: Literal["timed", "road", "cake", "user"] = "timed"
    split: str = "test"
    user_file: str | None = None
    max_edits: int | None = Field(default=None, ge=1)  # first N single edits (+ their CAKE composites)
    conflict_policy: Literal["keep_all", "keep_first", "drop_conflicting", "error"] = "keep_all"
    download: Literal["offline", "online", "auto"] = "offline"

    @model_validator(mode="after")
    def _user_file_iff_user(self) -> "DatasetsParams":
        if (self.name == "user") != (self.user_file is not None):
            raise ValueError("datasets.user_file is required for name 'user' and only for it")
        return self


@flow(name="prepare_datasets")
def prepare_datasets(params_file: str = PARAMS_FILE) -> Path:
    p = load_params("datasets", DatasetsParams, params_file)
    raw = verified_raw(RAW_DIR, MANIFEST, p.download, DOWNLOAD_DIR)
    user_file = Path(p.user_file) if p.user_file else None
    edit_params = p.model_dump(include={"name", "split", "user_file", "max_edits", "conflict_policy"})
    # the fetched bytes equal the vendored ones (both verified against the manifest): hash the vendored tree
    edit_fp = fingerprint("prepare_datasets/edit_set", edit_params,
                          inputs=[RAW_DIR, TOKENIZER_DIR, *([user_file] if user_file else [])], code=CODE)
    edit_set = prepare_edit_set(DATASETS_DIR, edit_fp, raw, p.name, p.split, user_file,
                                p.conflict_policy, p.max_edits)
    report = (edit_set / REPORT_MD).read_text(encoding="utf-8")
    logger().info("prepared %s", edit_set)
    markdown_artifact("prepare-datasets-report", report, description="conflict policy report")
    return edit_set


if __name__ == "__main__":
    run_stage(prepare_datasets)
