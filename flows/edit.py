"""Stage edit: the closed-form, null-space constrained edit of all single edits at once (METHOD.md §6).

``python -m flows.edit`` (DVC stage ``edit``) reads params.yaml ``edit``, the locked model
(data/models), the edit set (data/processed/datasets/edits.parquet), the target values
(data/values/values.safetensors: ``z`` (n_edits, d) with ``edit_ids`` and ``value_layer`` in its
sidecar, as written by ``t2iedit.values.value_tensors``/``value_meta``) and the projectors
(data/projector/layers) and, for ``entity_keys: preserve``, the entities (data/ner/entities.parquet).
Writes the EditArtifact folder data/edit/artifact (ΔW per layer + manifest) and the DVC metrics
data/edit/metrics.json.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from typing import Literal

from pydantic import Field

from flows.reporting import logger
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from t2iedit.edit import EditArtifact
from t2iedit.storage import write_json
from t2iedit.prompts import DEFAULT_TEMPLATES
from tasks.fingerprints import fingerprint
from tasks.edit import closed_form_edit

MODELS_DIR = Path("data/models")
EDITS = Path("data/processed/datasets/edits.parquet")
VALUES = Path("data/values/values.safetensors")
PROJECTORS = Path("data/projector/layers")
ENTITIES = Path("data/ner/entities.parquet")
OUT = Path("data/edit")
ARTIFACT, METRICS = OUT / "artifact", OUT / "metrics.json"
CODE = ["t2iedit.edit", "t2iedit.keys", "t2iedit.solve", "t2iedit.projector", "t2iedit.models",
        "t2iedit.prompts", "t2iedit.storage", "t2iedit.ner", "tasks.edit", "tasks.model", "tasks.projector"]


class EditParams(StageParams):
    layers: list[int] | None = None    # None: the preset's edit layers (SD: 0..10, EMCID)
    value_layer: int | None = None     # None: the preset's value layer (SD: 10)
    beta: float = Field(default=1.0, gt=0)  # the identity weight of eq. 7 (AlphaEdit's L2 term)
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1)
    # beyond the paper (METHOD.md §6): preserve the keys of each entity's standalone prompts
    entity_keys: Literal["none", "preserve"] = "none"
    entity_keys_form: Literal["nullspace", "sequential"] = "sequential"  # AlphaEdit's K_p | exact (null space)


def edit_metrics(artifact: EditArtifact) -> dict:
    m = artifact.manifest
    return {"n_edits": m.n_edits, "layers": list(m.layers),
            "relative_residual_after": m.extra["relative_residual_after"],
            "delta_norm": {k: v["delta_norm"] for k, v in m.extra["layer_stats"].items()},
            **({"preserved_key_shift": {k: v["preserved_key_shift"] for k, v in m.extra["layer_stats"].items()}}
               if any("preserved_key_shift" in v for v in m.extra["layer_stats"].values()) else {})}


@flow(name="edit")
def edit(params_file: str = PARAMS_FILE) -> Path:
    p = load_params("edit", EditParams, params_file)
    inputs = [MODELS_DIR, EDITS, VALUES, VALUES.with_name(VALUES.name + ".json"), PROJECTORS]
    fp = fingerprint("edit", p, inputs=inputs + ([ENTITIES] if p.entity_keys == "preserve" else []), code=CODE)
    out = closed_form_edit(ARTIFACT, fp, MODELS_DIR, EDITS, VALUES, PROJECTORS, p.layers, p.value_layer,
                           p.beta, p.templates, p.model_dump(mode="json"), ENTITIES, p.entity_keys,
                           p.entity_keys_form)
    metrics = edit_metrics(EditArtifact.load(out))
    write_json(METRICS, metrics)
    logger().info("edit of %d facts over layers %s: relative residual %.3g", metrics["n_edits"],
                  metrics["layers"], metrics["relative_residual_after"])
    return out


if __name__ == "__main__":
    run_stage(edit)
