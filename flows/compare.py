"""Stage compare: every selected method on the prepared dataset, through the same generation and
metrics, into one table in the layout of the paper's Tables 2/3 (docs/BASELINES.md).

``python -m flows.compare`` (DVC stage ``compare``) reads params.yaml ``compare``, the locked model
(data/models/lock.json), the outputs of ``prepare_datasets``, ``ner`` (entity spans for EATA),
``statistics`` and ``projector`` (C0 and P per layer: every method edits against the main run's
preserved statistics; ``projector.mode``/``value`` set P); writes data/compare/{edits/<method>/,
eval/<method>/, images/, table/{table.md, table.parquet, table.png, metrics.json}}.
Per-dataset settings are params (RoAD: ``dvc exp run -S compare.method_params.emcid.lam=6000.0
-S compare.method_params.refact.layer=7``); each method's edit and evaluation are stamped
separately, so changing one method's params reruns only that method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import Field, field_validator

from flows.reporting import logger, markdown_artifact
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from t2iedit.methods import METHODS, build_config, get_method
from t2iedit.methods.per_dataset import edits_dataset, method_params
from t2iedit.models import PRESETS
from tasks.fingerprints import fingerprint
from tasks.compare import SUMMARY, TABLE_MD, edit_method, evaluate_method, write_table
from tasks.model import locked_model

DATASETS_DIR = Path("data/processed/datasets")
ENTITIES = Path("data/ner/entities.parquet")
MOMENTS = Path("data/statistics/moments")      # C0 per layer (statistics stage)
PROJECTORS = Path("data/projector/layers")     # P per layer (projector stage)
MODELS_DIR = Path("data/models")
OUT = Path("data/compare")
TINY_CLIP = OUT / "models" / "tiny-clip"
LIB = ["t2iedit.methods", "t2iedit.methods.base", "t2iedit.methods.ours", "t2iedit.methods.emcid",
       "t2iedit.methods.time_crossattn", "t2iedit.methods.refact", "t2iedit.methods.oracle",
       "t2iedit.methods.compare", "t2iedit.methods.per_dataset", "t2iedit.edit", "t2iedit.keys", "t2iedit.solve", "t2iedit.values",
       "t2iedit.losses", "t2iedit.projector", "t2iedit.models", "t2iedit.prompts", "t2iedit.ner",
       "tasks.compare", "tasks.projector", "tasks.values"]
EVAL_LIB = ["t2iedit.generate", "t2iedit.metrics", "t2iedit.clip_eval", "t2iedit.edit", "tasks.compare",
            "tasks.evaluate"]


class SamplingParams(StageParams):
    num_inference_steps: int | None = None  # None: the preset's (SD: 50, tiny: 4)
    guidance_scale: float | None = None


class CompareParams(StageParams):
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    method_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    sampling: SamplingParams = SamplingParams()
    clip: str = "tiny"                     # tiny | a CLIP hub id / folder (paper: open_clip bigG)
    clip_revision: str | None = None
    batch_size: int = Field(default=8, ge=1)

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown or not v:
            raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
        return v


def sampling_config(p: CompareParams, preset: str) -> dict[str, Any]:
    pre = PRESETS[preset]
    return {"num_inference_steps": p.sampling.num_inference_steps or pre.num_inference_steps,
            "guidance_scale": p.sampling.guidance_scale or pre.guidance_scale,
            "height": pre.resolution, "width": pre.resolution}


@flow(name="compare")
def compare(params_file: str = PARAMS_FILE, out_dir: str = str(OUT)) -> Path:
    p = load_params("compare", CompareParams, params_file)
    out = Path(out_dir)
    for name in p.method_params:
        if name not in p.methods:
            raise ValueError(f"compare.method_params has {name!r}, which is not in compare.methods")
    configs = {name: build_config(get_method(name), p.method_params.get(name)) for name in p.methods}
    model = locked_model(MODELS_DIR)
    model_id = {"model": model.identity}

    preset = PRESETS[model.preset]
    if p.clip == "tiny":
        from t2iedit.clip_eval import build_tiny_clip

        if not (TINY_CLIP / "config.json").exists():
            build_tiny_clip(TINY_CLIP, image_size=preset.resolution)
        clip_source = str(TINY_CLIP)
    else:
        clip_source = p.clip
    sampling = sampling_config(p, model.preset)
    edits, eval_prompts = DATASETS_DIR / "edits.parquet", DATASETS_DIR / "eval_prompts.parquet"
    # the baselines' per-dataset settings (EMCID λ/lr, ReFACT's layer; BASELINES.md), method_params over them
    import pyarrow.parquet as pq

    dataset = edits_dataset(pq.read_table(edits, columns=["dataset"]).column("dataset").to_pylist())
    params = {name: method_params(name, dataset, model.preset, p.method_params.get(name)) for name in p.methods}
    summaries = {}
    for name in p.methods:
        build_config(get_method(name), params[name])  # fails before any model work
        edit_fp = fingerprint(f"compare/edit/{name}", params[name],
                              inputs=[edits, ENTITIES, MOMENTS, PROJECTORS], code=LIB, extra=model_id)
        art = edit_method(out / "edits" / name, edit_fp, name, params[name],
                          model, edits, ENTITIES, MOMENTS, PROJECTORS)
        eval_fp = fingerprint(f"compare/eval/{name}", {"seeds": p.seeds, "sampling": sampling,
                                                       "clip": [p.clip, p.clip_revision]},
                              inputs=[art, eval_prompts], code=EVAL_LIB, extra=model_id)
        ev = evaluate_method(out / "eval" / name, eval_fp, name, model, art, eval_prompts, out / "images",
                             p.seeds, sampling, clip_source, p.clip_revision, p.batch_size)
        summaries[name] = ev / SUMMARY
        logger().info("compare: %s done (%s)", name, ev)
    table_fp = fingerprint("compare/table", {"methods": p.methods}, inputs=list(summaries.values()),
                           code=["t2iedit.methods.compare", "t2iedit.metrics", "t2iedit.plots",
                                 "tasks.compare"])
    table = write_table(out / "table", table_fp, summaries,
                        f"{DATASETS_DIR.name}: {', '.join(p.methods)} ({model.preset})")
    markdown_artifact("compare-table", (table / TABLE_MD).read_text(encoding="utf-8"),
                      description="methods × categories, mean ± std over seeds")
    return table


if __name__ == "__main__":
    run_stage(compare)
