"""Stage text_space: the text-space metrics (no images, docs/METHOD.md "Text-space metrics") of the
unedited model, of this run's edit (``ours``) and of the methods beside it — ours' ablations, EMCID,
ReFACT — on the locked model's real text encoder.

``python -m flows.text_space`` (DVC stage ``text_space``) reads params.yaml ``text_space``, ``values``
(the latent settings of the ablations' visual loss), ``edit`` (layers, β) and ``corpus.holdout_first``
(the FID head kept out of the held-out captions); the locked model, the datasets, the ner entities, the
main run's C0 / projectors / target values / edit artifact, the corpus K0 and the COCO captions.
Writes data/text_space/edits/<method>/ (each method's EditArtifact, stamped and kept between runs
(DVC persist): changing one method's params reruns only it) and data/text_space/summary/{metrics.json
(``{method: metrics}``, ``dvc metrics``), table.md}. ``ours-no-projector`` reuses the main run's target values (only P differs); the other
ablations reoptimise their values with the main run's value config and one setting changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import Field, field_validator

from flows.edit import EditParams
from flows.reporting import logger, markdown_artifact
from flows.stage import PARAMS_FILE, StageParams, load_params, read_params, run_stage
from flows.values import ValuesParams
from t2iedit.methods import get_method
from t2iedit.methods.base import _deep_merge
from t2iedit.methods.per_dataset import edits_dataset, method_params
from t2iedit.storage import read_parquet
from t2iedit.storage import load_meta
from tasks.compare import edit_method
from tasks.fingerprints import fingerprint
from tasks.model import locked_model
from tasks.stamps import prune
from tasks.text_space import (COCO, CORPUS, DEFAULT_CAPTIONS, METRICS_JSON, TABLE_MD, measure,
                              no_projector_edit, variant_params)

MODELS_DIR = Path("data/models")
DATASETS_DIR = Path("data/processed/datasets")
EDITS, EVAL_PROMPTS = DATASETS_DIR / "edits.parquet", DATASETS_DIR / "eval_prompts.parquet"
ENTITIES = Path("data/ner/entities.parquet")
MOMENTS, PROJECTORS = Path("data/statistics/moments"), Path("data/projector/layers")
VALUES = Path("data/values/values.safetensors")
EDIT_ARTIFACT = Path("data/edit/artifact")
OUT = Path("data/text_space")
#: Methods that may run beside ours here (time edits the UNet: its text space is the unedited one's).
VARIANTS = ("ours-no-projector", "ours-no-eata", "ours-no-visual", "emcid", "refact")
LIB = ["t2iedit.methods", "t2iedit.methods.base", "t2iedit.methods.ours", "t2iedit.methods.emcid",
       "t2iedit.methods.refact", "t2iedit.edit", "t2iedit.keys", "t2iedit.solve", "t2iedit.values",
       "t2iedit.losses", "t2iedit.projector", "t2iedit.models", "t2iedit.prompts",
       "t2iedit.methods.per_dataset", "tasks.compare",
       "tasks.text_space", "tasks.edit"]
METRIC_CODE = ["t2iedit.text_space", "t2iedit.losses", "t2iedit.edit", "t2iedit.models", "tasks.text_space"]


class TextSpaceParams(StageParams):
    methods: list[str] = Field(default_factory=lambda: list(VARIANTS))
    method_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    captions: int = Field(default=DEFAULT_CAPTIONS, ge=0)  # held-out COCO captions of the caption drift

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in VARIANTS]
        if unknown:
            raise ValueError(f"text_space.methods: {unknown} cannot run here; choose from {list(VARIANTS)}")
        return v


@flow(name="text_space")
def text_space(params_file: str = PARAMS_FILE, out_dir: str = str(OUT)) -> Path:
    p = load_params("text_space", TextSpaceParams, params_file)
    v = load_params("values", ValuesParams, params_file)
    e = load_params("edit", EditParams, params_file)
    skip_first = int((read_params(params_file).get("corpus") or {}).get("holdout_first") or 0)
    for name in p.method_params:
        if name not in p.methods:
            raise ValueError(f"text_space.method_params has {name!r}, which is not in text_space.methods")
    out = Path(out_dir)
    model = locked_model(MODELS_DIR)
    model_id = {"model": model.identity}
    values_config = load_meta(VALUES)["config"]  # the main run's resolved value config
    # the baselines' per-dataset settings (EMCID λ / lr, ReFACT's layer scaled to the preset's depth), as
    # compare applies them (t2iedit.methods.per_dataset), under text_space.method_params
    dataset = edits_dataset(read_parquet(EDITS).column("dataset").to_pylist())
    edit_cfg = {"layers": e.layers, "value_layer": e.value_layer, "beta": e.beta}
    latent = {"latent_images": v.latent_images, "latent_seed": v.seed, "latent_steps": v.latent_steps}

    artifacts: dict[str, Path | None] = {"unedited": None, "ours": EDIT_ARTIFACT}
    for name in p.methods:
        if name == "ours-no-projector":
            fp = fingerprint("text_space/edit/ours-no-projector", edit_cfg | {"templates": e.templates},
                             inputs=[EDITS, VALUES], code=LIB, extra=model_id)
            artifacts[name] = no_projector_edit(out / "edits" / name, fp, MODELS_DIR, EDITS, VALUES,
                                                e.layers, e.value_layer, e.beta, list(e.templates))
            continue
        params = method_params(name, dataset, model.preset,
                               _deep_merge(variant_params(name, values_config, edit_cfg, latent),
                                           p.method_params.get(name) or {}))
        params = _deep_merge(params, get_method(name).fixed)  # the ablation's defining setting
        fp = fingerprint(f"text_space/edit/{name}", params,
                         inputs=[EDITS, ENTITIES, MOMENTS, PROJECTORS], code=LIB, extra=model_id)
        artifacts[name] = edit_method(out / "edits" / name, fp, name, params, model, EDITS, ENTITIES,
                                      MOMENTS, PROJECTORS)
        logger().info("text space: %s edited", name)
    inputs = {"edits": EDITS, "eval_prompts": EVAL_PROMPTS, "entities": ENTITIES, "captions_csv": COCO,
              "corpus": CORPUS, "skip_first": skip_first, "n_captions": p.captions}
    fp = fingerprint("text_space/measure", {"captions": p.captions, "skip_first": skip_first,
                                            "methods": list(artifacts)},
                     inputs=[*(a for a in artifacts.values() if a is not None), EDITS, EVAL_PROMPTS,
                             ENTITIES, COCO, CORPUS], code=METRIC_CODE, extra=model_id)
    prune(out / "edits", keep=[a for n, a in artifacts.items() if n in p.methods])
    result = measure(out / "summary", fp, model, artifacts, inputs,
                     f"Text space ({model.preset}): unedited, ours and {', '.join(p.methods) or 'nothing else'}")
    markdown_artifact("text-space", (result / TABLE_MD).read_text(encoding="utf-8"),
                      description="text-space metrics (no images) of every method")
    logger().info("text-space metrics in %s", result / METRICS_JSON)
    return result


if __name__ == "__main__":
    run_stage(text_space)
