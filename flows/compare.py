"""Stage compare: every selected method on the prepared dataset, through the same generation and
metrics, into one table in the layout of the paper's Tables 2/3 (docs/BASELINES.md).

``python -m flows.compare`` (DVC stage ``compare``) reads params.yaml ``compare`` and the judge of the
metrics stage (``metrics.clip``, ``metrics.clip_revision``, ``metrics.sigma``), the locked model
(data/models/lock.json), the outputs of ``prepare_datasets``, ``ner`` (entity spans for EATA),
``statistics`` and ``projector`` (C0 and P per layer: every method edits against the main run's
preserved statistics; ``projector.mode``/``value`` set P), ``metrics`` (the evaluation prompts with the
thresholds of the headline test, data/eval/metrics/thresholds: shipped, or recomputed for this judge)
and — reused, never changing a number — ``values``' source latents, ``generate``'s images and, for a
method whose resolved config is the main run's ``values``/``edit`` params (params.yaml ``values``,
``edit``), ``edit``'s artifact (data/edit/artifact) with all of its images;
writes data/compare/{edits/<method>/, eval/<method>/, images/, table/{table.md, table.parquet,
table.png, metrics.json}}. The table's first row is the paper's Oracle, ``unedited`` ("Oracle
(unedited)": the unedited model on the test prompts); the threshold test is the headline table.
Per-dataset settings come from the dataset (``t2iedit.methods.per_dataset.dataset_defaults``: EMCID's λ
and lr, ReFACT's layer for TIMED/RoAD); ``compare.method_params`` overrides them; each method's edit and
evaluation are stamped separately, so changing one method's params reruns only that method.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import Field, field_validator

from flows.metrics import THRESHOLDS_DIR, MetricsParams, judge_id, judge_source
from flows.reporting import logger, markdown_artifact
from flows.stage import PARAMS_FILE, StageParams, generate_hw, load_params, run_stage, read_params
from t2iedit.methods import METHODS, build_config, get_method
from t2iedit.methods.compare import main_run_config, shares_main_edit
from t2iedit.methods.per_dataset import edits_dataset, method_params
from t2iedit.edit import EditArtifact
from t2iedit.models import PRESETS, resolve_dtype
from tasks.fingerprints import fingerprint
from tasks.compare import SUMMARY, TABLE_MD, edit_method, evaluate_method, write_table
from tasks.model import image_size, locked_model

DATASETS_DIR = Path("data/processed/datasets")
ENTITIES = Path("data/ner/entities.parquet")
MOMENTS = Path("data/statistics/moments")      # C0 per layer (statistics stage)
PROJECTORS = Path("data/projector/layers")     # P per layer (projector stage)
MODELS_DIR = Path("data/models")
THRESHOLD_PROMPTS = THRESHOLDS_DIR / "eval_prompts.parquet"  # the metrics stage's headline thresholds
LATENTS = Path("data/values/latents")   # the main run's source latents (values stage)
MAIN_IMAGES = Path("data/eval/images")  # the main run's images (generate stage)
MAIN_EDIT = Path("data/edit/artifact")  # the main run's edit (edit stage), compare's ours when the same
OUT = Path("data/compare")
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
    methods: list[str] = Field(default_factory=lambda: list(METHODS))  # unedited: the paper's Oracle row
    method_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    sampling: SamplingParams = SamplingParams()
    reuse_main: bool = True  # the main run's source latents, images and edit where equal (no number changes)
    batch_size: int = Field(default=8, ge=1)

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown or not v:
            raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
        return v


def sampling_config(p: CompareParams, preset: str, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """``size``: (height, width), ``flows.generate.generate_size`` (generate.height/width; None: the preset's)."""
    pre = PRESETS[preset]
    height, width = size or (pre.resolution, pre.resolution)
    return {"num_inference_steps": p.sampling.num_inference_steps or pre.num_inference_steps,
            "guidance_scale": p.sampling.guidance_scale or pre.guidance_scale,
            "height": height, "width": width}


def main_edit_config(params_file: str, preset: str):
    """The ``OursConfig`` of the main run's edit (params.yaml ``values`` and ``edit``, validated as their
    stages do; ``t2iedit.methods.compare.main_run_config``)."""
    from flows.edit import EditParams
    from flows.values import ValuesParams

    data = read_params(params_file)
    return main_run_config(ValuesParams.model_validate(data.get("values") or {}).model_dump(mode="json"),
                           EditParams.model_validate(data.get("edit") or {}).model_dump(mode="json"), preset)


@flow(name="compare")
def compare(params_file: str = PARAMS_FILE, out_dir: str = str(OUT)) -> Path:
    p = load_params("compare", CompareParams, params_file)
    out = Path(out_dir)
    for name in p.method_params:
        if name not in p.methods:
            raise ValueError(f"compare.method_params has {name!r}, which is not in compare.methods")
    for name in p.methods:  # every method's params validated before any work
        build_config(get_method(name), p.method_params.get(name))
    model = locked_model(MODELS_DIR)
    model_id = {"model": model.identity}

    m = load_params("metrics", MetricsParams, params_file)  # the judge whose thresholds the metrics stage wrote
    sampling = sampling_config(p, model.preset, image_size(model, *generate_hw(params_file)))
    edits = DATASETS_DIR / "edits.parquet"
    latents = LATENTS if p.reuse_main else None
    shared_images = MAIN_IMAGES if p.reuse_main else None
    # each method's params mapping: the baselines' per-dataset settings (EMCID λ/lr, ReFACT's layer;
    # t2iedit.methods.per_dataset, BASELINES.md) with compare.method_params over them
    import pyarrow.parquet as pq

    dataset = edits_dataset(pq.read_table(edits, columns=["dataset"]).column("dataset").to_pylist())
    mparams = {name: method_params(name, dataset, model.preset, p.method_params.get(name)) for name in p.methods}
    for name in p.methods:
        build_config(get_method(name), mparams[name])  # fails before any model work
    # images run in model.dtype (the images' model identity, tasks.evaluate.images_key); float32 adds nothing
    eff = resolve_dtype(model.dtype)
    eval_id = {**model_id, **({"dtype": eff} if eff != "float32" else {})}
    main_cfg = (main_edit_config(params_file, model.preset)
                if p.reuse_main and (MAIN_EDIT / "manifest.json").is_file() else None)
    summaries, artifacts = {}, {}
    # every edit first (they share one unedited float32 pipeline), then every evaluation, those of the
    # unedited model first: one pipeline load per process and (model, edit, dtype)
    for name in p.methods:
        if shares_main_edit(get_method(name), build_config(get_method(name), mparams[name]), main_cfg,
                            model.preset):
            artifacts[name] = MAIN_EDIT  # the same computation as the main run's values + edit stages
            logger().info("compare: %s is the main run's edit (%s)", name, MAIN_EDIT)
            continue
        edit_fp = fingerprint(f"compare/edit/{name}", mparams[name],
                              inputs=[edits, ENTITIES, MOMENTS, PROJECTORS], code=LIB, extra=model_id)
        artifacts[name] = edit_method(out / "edits" / name, edit_fp, name, mparams[name],
                                      model, edits, ENTITIES, MOMENTS, PROJECTORS, latents)
    with tempfile.TemporaryDirectory(prefix="t2iedit-clip-") as scratch:
        clip_source = judge_source(m.clip, Path(scratch))
        for name in sorted(p.methods, key=lambda n: bool(EditArtifact.load(artifacts[n]).deltas)):
            art = artifacts[name]
            eval_fp = fingerprint(f"compare/eval/{name}", {"seeds": p.seeds, "sampling": sampling,
                                                           "clip": [judge_id(m.clip), m.clip_revision],
                                                           "sigma": m.sigma},
                                  inputs=[art, THRESHOLD_PROMPTS], code=EVAL_LIB, extra=eval_id)
            ev = evaluate_method(out / "eval" / name, eval_fp, name, model, art, THRESHOLD_PROMPTS,
                                 out / "images", p.seeds, sampling, clip_source, m.clip_revision,
                                 p.batch_size, m.sigma, shared_images)
            summaries[name] = ev / SUMMARY
            logger().info("compare: %s done (%s)", name, ev)
    summaries = {name: summaries[name] for name in p.methods}
    note = (f"Headline table: the threshold test (the metrics stage's thresholds, {THRESHOLD_PROMPTS}; judge "
            f"{m.clip}). Second table: the two-class CLIP test. Oracle (unedited) = the unedited model on "
            "the test prompts.")
    table_fp = fingerprint("compare/table", {"methods": p.methods, "note": note}, inputs=list(summaries.values()),
                           code=["t2iedit.methods.compare", "t2iedit.metrics", "t2iedit.plots",
                                 "tasks.compare"])
    table = write_table(out / "table", table_fp, summaries,
                        f"{DATASETS_DIR.name}: {', '.join(p.methods)} ({model.preset})", note)
    markdown_artifact("compare-table", (table / TABLE_MD).read_text(encoding="utf-8"),
                      description="methods × categories, mean ± std over seeds")
    compare_text_space(out / "text_space", model, artifacts, edits, params_file)
    return table


def compare_text_space(out: Path, model, artifacts: dict[str, Path], edits: Path, params_file: str) -> Path:
    """Text-space metrics (no images, docs/METHOD.md §8a) of every compared edit of the text encoder, the
    unedited model first: ``out``/{metrics.json, table.md}. Methods that edit the UNet (TIME) are left
    out: their text space is the unedited model's."""
    from tasks.text_space import COCO, CORPUS, DEFAULT_CAPTIONS, TABLE_MD as TS_TABLE, edits_text_encoder, measure

    skip_first = int((read_params(params_file).get("corpus") or {}).get("holdout_first") or 0)
    chosen = {"unedited": None, **{n: a for n, a in artifacts.items() if edits_text_encoder(a)}}
    inputs = {"edits": edits, "eval_prompts": DATASETS_DIR / "eval_prompts.parquet", "entities": ENTITIES,
              "captions_csv": COCO, "corpus": CORPUS, "skip_first": skip_first,
              "n_captions": DEFAULT_CAPTIONS}
    fp = fingerprint("compare/text_space", {"methods": list(chosen), "skip_first": skip_first,
                                            "captions": inputs["n_captions"]},
                     inputs=[*(a for a in chosen.values() if a is not None), edits, inputs["eval_prompts"],
                             ENTITIES, COCO, CORPUS],
                     code=["t2iedit.text_space", "t2iedit.losses", "t2iedit.edit", "tasks.text_space"],
                     extra={"model": model.identity})
    res = measure(out, fp, model, chosen, inputs, f"Text space ({model.preset}): compared methods")
    markdown_artifact("compare-text-space", (res / TS_TABLE).read_text(encoding="utf-8"),
                      description="text-space metrics (no images) of every compared method")
    return res


if __name__ == "__main__":
    run_stage(compare)
