"""Prefect tasks of the text_space stage (and of compare's text-space part): the edits of the method
variants (ours' ablations, EMCID, ReFACT) and the text-space metrics of every edit (t2iedit.text_space).

Every task takes its output path and fingerprint (STAMP_CACHE) and loads models inside."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from t2iedit import text_space as TS
from t2iedit.edit import EditArtifact, NullSpaceSolver, compute_multilayer_edit, edited, split_key
from t2iedit.models import get_preset, load_text_encoder
from t2iedit.ner import ENTITY_SCHEMA
from t2iedit.storage import load_meta, read_json, read_parquet, write_json, write_text
from tasks.edit import aligned_targets
from tasks.model import LockedModel, load_locked_encoder
from tasks.stamps import STAMP_CACHE, run_once

METRICS_JSON, TABLE_MD = "metrics.json", "table.md"
CORPUS = Path("data/processed/corpus/corpus.parquet")   # K0 (prepare_corpus)
COCO = Path("data/raw/coco/coco_30k.csv")              # the held-out captions come from here
DEFAULT_CAPTIONS = 500                                  # held-out captions of the caption drift


def load_data(edits: Path, eval_prompts: Path, entities: Path, captions_csv: Path, corpus: Path,
              skip_first: int, n_captions: int) -> TS.TextSpaceData:
    """The texts of the metrics: the applied (single) edits, the evaluation prompts of those edits and
    of their composites, the ner stage's entities, ``n_captions`` held-out COCO captions."""
    ed = read_parquet(edits).to_pandas()
    single = ed[ed["kind"] == "single"].reset_index(drop=True)
    prompts = read_parquet(eval_prompts).to_pandas()
    ents = read_parquet(entities, ENTITY_SCHEMA).to_pandas()
    with open(captions_csv, newline="", encoding="utf-8") as f:
        captions = [r["prompt"].strip() for r in csv.DictReader(f)]
    k0 = [t.strip() for t in read_parquet(corpus).column("text").to_pylist()]
    held = TS.held_out_captions(captions, k0, skip_first, n_captions) if n_captions else []
    return TS.TextSpaceData(single[["edit_id", "source", "target"]], prompts,
                            ents[ents["edit_id"].isin(set(single["edit_id"]))][["edit_id", "text"]],
                            tuple(held))


@task(cache_policy=STAMP_CACHE)
def no_projector_edit(out: Path, fingerprint: str, models_dir: Path, edits: Path, values_file: Path,
                      layers: list[int] | None, value_layer: int | None, beta: float,
                      templates: list[str]) -> Path:
    """``ours-no-projector``: the main run's target values (data/values) solved with P = I — the same
    values as ``ours``, only the projector removed (the ablation's one difference)."""
    from tasks.edit import edit_requests

    def produce(folder: Path) -> None:
        lock, tokenizer, adapter = load_locked_encoder(models_dir)
        edit_layers = sorted(layers if layers is not None else lock["edit_layers"])
        vlayer = value_layer if value_layer is not None else lock["value_layer"]
        requests = edit_requests(edits)
        z = aligned_targets(values_file, requests, vlayer)
        compute_multilayer_edit(
            adapter, tokenizer, requests, z, edit_layers, vlayer, NullSpaceSolver(None, beta=beta),
            templates, method="ours-no-projector", base_model_id=lock["base_model_id"],
            base_revision=lock["base_revision"],
            config={"use_projector": False, "beta": beta, "values": load_meta(values_file)["config_hash"]},
        ).save(folder)

    return run_once(out, fingerprint, produce)


def variant_params(method: str, values_config: dict[str, Any], edit: dict[str, Any],
                   latent: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The params mapping (``t2iedit.methods.build_config``) of a method run beside the main one: ours'
    ablations take the main run's value config (the values stage's, ``values_config``) and edit
    layers, so only the ablation's defining setting differs; EMCID keeps its loss weighting (text 0.01,
    noise 1, no entity term) and its per-dataset lr with the main run's optimisation budget (steps,
    clamp, templates, pooling, seed); ReFACT keeps its own settings (its layer: per dataset).
    ``overrides``: merged over the result."""
    budget = {k: values_config[k] for k in ("steps", "clamp_factor", "weight_decay", "templates", "pooling",
                                            "seed")}
    layers = {"layers": edit.get("layers"), "value_layer": edit.get("value_layer")}
    if method.startswith("ours"):
        params = {"values": dict(values_config), **layers, "beta": edit.get("beta", 1.0), **latent}
        params["values"].pop("log_every", None)
    elif method == "emcid":
        params = {"values": budget, **layers, **latent}
    else:
        params = {}
    from t2iedit.methods.base import _deep_merge

    return _deep_merge(params, overrides or {})


@task(cache_policy=STAMP_CACHE)
def measure(out: Path, fingerprint: str, model: LockedModel, artifacts: dict[str, Path | None],
            inputs: dict[str, Any], title: str) -> Path:
    """``out``/metrics.json (``{method: text_space_metrics}``; ``None`` artifact: the unedited model)
    and table.md; ``inputs``: the arguments of :func:`load_data`. One encoder load; the frozen features
    once; each edit applied in turn."""
    def produce(folder: Path) -> None:
        data = load_data(**inputs)
        tok, te = load_text_encoder(model.source, model.revision)
        pooling = get_preset(model.preset).pooling
        frozen = TS.Features.encode(tok, te, data.frozen_texts(), pooling)
        results = {}
        for name, art_path in artifacts.items():
            if art_path is None:
                results[name] = TS.text_space_metrics(data, frozen, frozen)
                continue
            art = EditArtifact.load(art_path)
            foreign = sorted({split_key(k)[0] for k in art.deltas} - {"text_encoder"})
            if foreign:
                raise ValueError(f"text space: method {name!r} edits {foreign}, not the text encoder "
                                 "(its text-space metrics are the unedited model's): leave it out")
            with edited({"text_encoder": te}, art, model.preset, model.revision):
                now = TS.Features.encode(tok, te, data.edited_texts(), pooling)
            results[name] = TS.text_space_metrics(data, frozen, now)
        write_json(folder / METRICS_JSON, results)
        write_text(folder / TABLE_MD, TS.markdown_table(results, title))

    return run_once(out, fingerprint, produce)


def edits_text_encoder(artifact: Path) -> bool:
    """Whether an EditArtifact changes only the text encoder (or nothing): its text space is measurable."""
    return {split_key(k)[0] for k in EditArtifact.load(artifact).deltas} <= {"text_encoder"}


def read_metrics(folder: Path) -> dict[str, Any]:
    return read_json(Path(folder) / METRICS_JSON)


def as_frame(results: dict[str, Any]) -> pd.DataFrame:
    """One row per method, the table's columns (for tests and plots)."""
    return pd.DataFrame([{"method": m, **{c: r.get(c) for c in TS.COLUMNS}} for m, r in results.items()])
