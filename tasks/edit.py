"""Prefect task of the edit stage: the closed-form multi-layer edit of every single edit at once
(METHOD.md §6), written as an ``EditArtifact`` folder."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task

from t2iedit.edit import NullSpaceSolver, compute_multilayer_edit, entity_prompts
from t2iedit.storage import load_meta, load_tensors, read_parquet
from t2iedit.ner import ENTITY_SCHEMA, spans_by_edit
from t2iedit.projector import NullSpaceProjector
from t2iedit.prompts import EditRequest
from tasks.stamps import STAMP_CACHE, run_once
from tasks.model import load_locked_encoder
from tasks.projector import projector_file


def edit_requests(edits_parquet: Path, entities_parquet: Path | None = None) -> list[EditRequest]:
    """The edits applied together: every ``single`` row (composites are evaluation-only), with the ner
    stage's entity spans when ``entities_parquet`` is given."""
    rows = read_parquet(edits_parquet).to_pylist()
    spans = spans_by_edit(read_parquet(entities_parquet, ENTITY_SCHEMA)) if entities_parquet else {}
    return [EditRequest(r["edit_id"], r["source"], r["target"], spans.get(r["edit_id"], ()))
            for r in rows if r["kind"] == "single"]


def aligned_targets(values_file: Path, requests: list[EditRequest], value_layer: int) -> torch.Tensor:
    """z rows (n_edits, d) in the order of ``requests`` (the values file lists its edit_ids)."""
    meta = load_meta(values_file)
    if int(meta["value_layer"]) != value_layer:
        raise ValueError(f"{values_file}: values at layer {meta['value_layer']}, the edit uses {value_layer}")
    row = {edit_id: i for i, edit_id in enumerate(meta["edit_ids"])}
    missing = [r.edit_id for r in requests if r.edit_id not in row]
    if missing:
        raise KeyError(f"{values_file} has no target value for edits {missing[:5]} ({len(missing)} missing)")
    z = load_tensors(values_file)["z"]
    return z[[row[r.edit_id] for r in requests]]


@task(cache_policy=STAMP_CACHE)
def closed_form_edit(out: Path, fingerprint: str, models_dir: Path, edits_parquet: Path, values_file: Path,
                     projector_dir: Path, layers: list[int] | None, value_layer: int | None, beta: float,
                     templates: list[str], config: dict, entities_parquet: Path | None = None,
                     entity_keys: str = "none", entity_keys_form: str = "sequential") -> Path:
    """``out``: the EditArtifact of method ``ours`` (paper eq. 7 per layer, residual spread over layers).

    ``entity_keys="preserve"``: the keys of each entity's standalone prompts (``entities_parquet``, the
    entity alone and in ``templates``) are preserved by the solve (``entity_keys_form``, METHOD.md §6)."""
    def produce(folder: Path) -> None:
        lock, tokenizer, adapter = load_locked_encoder(models_dir)
        edit_layers = sorted(layers if layers is not None else lock["edit_layers"])
        vlayer = value_layer if value_layer is not None else lock["value_layer"]
        requests = edit_requests(edits_parquet, entities_parquet if entity_keys == "preserve" else None)
        z = aligned_targets(values_file, requests, vlayer)
        projectors = {l: NullSpaceProjector.load(projector_file(projector_dir, l)).P for l in edit_layers}
        preserve = entity_prompts(requests, templates) if entity_keys == "preserve" else ()
        artifact = compute_multilayer_edit(
            adapter, tokenizer, requests, z, edit_layers, vlayer,
            NullSpaceSolver(projectors, beta=beta, preserve_form=entity_keys_form),
            templates, method="ours", base_model_id=lock["base_model_id"],
            base_revision=lock["base_revision"], config=config, preserve_prompts=preserve)
        artifact.save(folder)

    return run_once(out, fingerprint, produce)
