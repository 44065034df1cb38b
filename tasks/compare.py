"""Prefect tasks of the compare stage: the main run's statistics → one edit per method → images →
metrics → one table. Every task takes its output path and fingerprint (STAMP_CACHE) and loads models
inside."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from prefect import task

from t2iedit import metrics as M
from t2iedit import plots
from t2iedit.edit import EditArtifact, edited
from t2iedit.generate import SamplingConfig, generate_images, write_index
from t2iedit.storage import load_meta, read_json, read_parquet, write_json, write_parquet, write_text
from t2iedit.keys import SecondMoment
from t2iedit.methods import Components, SharedStats, compute_edit, get_method
from t2iedit.methods.compare import COMPARISON_SCHEMA, comparison_table, prompt_column
from t2iedit.models import PRESETS, TextEncoderAdapter, default_device, load_pipeline
from t2iedit.projector import NullSpaceProjector
from tasks.stamps import STAMP_CACHE, run_once
from tasks.evaluate import SUMMARY, TABLE_MD, clip_encoder, images_key, write_scores
from tasks.model import LockedModel
from tasks.projector import projector_file
from tasks.values import edit_requests

INDEX, TABLE_PARQUET, TABLE_PNG = "index.parquet", "table.parquet", "table.png"


def load_components(preset: str, source: str, revision: str | None) -> Components:
    p = PRESETS[preset]
    pipe = load_pipeline(source, revision).to(default_device())
    return Components(pipe=pipe, adapter=TextEncoderAdapter(pipe.text_encoder, p.text_layer_template,
                                                             p.text_block_template),
                      base_model_id=preset, base_revision=revision, edit_layers=p.edit_layers,
                      value_layer=p.value_layer)


def load_stats(moments_dir: Path, projectors_dir: Path) -> SharedStats:
    """C0 and the null-space projector P of every layer the main pipeline's ``statistics`` and
    ``projector`` stages wrote (layer_XX.safetensors in each): every method of the comparison edits
    against the same preserved statistics as the main run."""
    moments = {int(load_meta(f)["layer"]): SecondMoment.load(f).moment()
               for f in sorted(Path(moments_dir).glob("layer_*.safetensors"))}
    if not moments:
        raise FileNotFoundError(f"no second moments in {moments_dir}: run the statistics stage first")
    projectors = {}
    for layer in moments:
        f = projector_file(projectors_dir, layer)
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no projector for layer {layer}; run the projector stage first")
        projectors[layer] = NullSpaceProjector.load(f).P
    return SharedStats(moments=moments, projectors=projectors)


@task(cache_policy=STAMP_CACHE)
def edit_method(out: Path, fingerprint: str, method: str, params: dict[str, Any], model: LockedModel,
                edits: Path, entities: Path, moments: Path, projectors: Path) -> Path:
    """The method's EditArtifact for every single edit of the dataset (folder ``out``), with the ner
    stage's entity spans (``entities``) and the main run's C0 and projectors (:func:`load_stats`)."""
    def produce(folder: Path) -> None:
        torch.manual_seed(0)  # nothing should draw from the global RNG; pin it anyway
        comps = load_components(model.preset, model.source, model.revision)
        requests = edit_requests(edits, entities)
        compute_edit(method, requests, load_stats(moments, projectors), comps, params).save(folder)

    return run_once(out, fingerprint, produce)


@task(cache_policy=STAMP_CACHE)
def evaluate_method(out: Path, fingerprint: str, method: str, model: LockedModel, artifact: Path,
                    eval_prompts: Path, image_root: Path, seeds: list[int], sampling: dict[str, Any],
                    clip_source: str, clip_revision: str | None, batch_size: int) -> Path:
    """Generate the method's images (edit applied) and score them: ``out``/per_image.parquet,
    summary.json (``{test: metrics.summarize}``), index.parquet. Images are keyed by the locked
    weights' and the edit's content (``tasks.evaluate.images_key``)."""
    def produce(folder: Path) -> None:
        comps = load_components(model.preset, model.source, model.revision)
        art = EditArtifact.load(artifact)
        ep = read_parquet(eval_prompts).to_pandas()
        col = prompt_column(get_method(method).oracle_prompts)
        texts = ep[col].fillna(ep["prompt"]) if col != "prompt" else ep["prompt"]
        mh = images_key(model, artifact)
        parts = {"text_encoder": comps.text_encoder, "unet": comps.unet}
        with edited(parts, art, model.preset, model.revision):
            index = generate_images(comps.pipe, [(t, s) for t in texts for s in seeds], image_root,
                                    mh, SamplingConfig(**sampling), batch_size=batch_size,
                                    progress=False)
        index_df = read_parquet(write_index(folder / INDEX, [index])).to_pandas()
        rows = M.evaluate_images(clip_encoder(clip_source, clip_revision), ep,
                                 index_df, image_root, method, prompt_column=col)
        write_scores(folder, M.per_image_table(rows))

    return run_once(out, fingerprint, produce)


@task(cache_policy=STAMP_CACHE)
def write_table(out: Path, fingerprint: str, summaries: dict[str, Path], title: str) -> Path:
    """``out``/table.md (one Markdown table per test), table.parquet (:data:`COMPARISON_SCHEMA`),
    table.png (grouped bars of the binary test, else the threshold test) and metrics.json."""
    def produce(folder: Path) -> None:
        results = {m: read_json(p) for m, p in summaries.items()}
        tests = [t for t in M.TESTS if any(t in r for r in results.values())]
        md = [f"# {title}", ""]
        for test in tests:
            md.append(M.markdown_table({m: r[test] for m, r in results.items() if test in r},
                                       title=f"{test} test"))
        write_text(folder / TABLE_MD, "\n".join(md))
        write_parquet(folder / TABLE_PARQUET, comparison_table(results), COMPARISON_SCHEMA)
        data = plots.category_data({m: r[tests[0]] for m, r in results.items() if tests[0] in r})
        plots.category_bars(data, folder / TABLE_PNG, title=f"{title} ({tests[0]} test)")
        write_json(folder / "metrics.json", {m: {t: {"score": r[t]["score"]["mean"]} for t in r}
                                             for m, r in results.items()})

    return run_once(out, fingerprint, produce)


def table_frame(path: Path) -> pd.DataFrame:
    return read_parquet(path / TABLE_PARQUET, COMPARISON_SCHEMA).to_pandas()
