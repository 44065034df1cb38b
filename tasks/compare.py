"""Prefect tasks of the compare stage: the main run's statistics → one edit per method → images →
metrics → one table. Every task takes its output path and fingerprint (STAMP_CACHE) and loads models
inside.

Work done once (issue 16): every method edits against the main run's C0, projectors and entity spans;
methods with the visual loss use the main run's source latents (data/values/latents) when their latent
settings are the main run's; methods that change no weight (``unedited``, ``oracle``) take the main
run's unedited images (data/eval/images) wherever the same (text, seed, sampling) was generated there;
a method that computes exactly the main run's edit (``t2iedit.methods.compare.shares_main_edit``: its
resolved config is the main run's values/edit config) is the main run's artifact (data/edit/artifact),
and all its images are the main run's edited images. None of it changes a number: the shared latents,
edit and images are what the method would have computed (tests/test_work_sharing.py, byte for byte).
One pipeline per process and (model, edit, dtype) (``tasks.evaluate.cached_pipeline``): the edits of
every method share the unedited float32 one; each evaluation loads its edited model once.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from prefect import task

from t2iedit import metrics as M
from t2iedit import plots
from t2iedit.edit import EditArtifact
from t2iedit.generate import SamplingConfig, image_relpath, write_index
from t2iedit.storage import (load_meta, load_tensors, read_json, read_parquet, write_json, write_parquet,
                             write_text)
from t2iedit.keys import SecondMoment
from t2iedit.methods import Components, SharedStats, build_config, compute_edit, get_method
from t2iedit.methods.compare import COMPARISON_SCHEMA, comparison_table, prompt_column
from t2iedit.models import PRESETS, TextEncoderAdapter
from t2iedit.projector import NullSpaceProjector
from t2iedit.values import generate_source_latents
from tasks.stamps import STAMP_CACHE, run_once
from tasks.evaluate import (SUMMARY, TABLE_MD, cached_pipeline, clip_encoder, generate_shared, images_key,
                            write_scores)
from tasks.model import LockedModel
from tasks.projector import projector_file
from tasks.values import edit_requests

INDEX, TABLE_PARQUET, TABLE_PNG = "index.parquet", "table.parquet", "table.png"
logger = logging.getLogger(__name__)


def load_components(preset: str, source: str, revision: str | None):
    """(Components, lock) of the unedited float32 pipeline (value optimisation and key statistics keep
    the text encoder in float32), the process's :func:`tasks.evaluate.cached_pipeline`: every method's
    edit of one process shares one load. Hold the lock while a method uses it (every method leaves the
    models unchanged when it returns, ``t2iedit.methods.base``)."""
    p = PRESETS[preset]
    pipe, lock = cached_pipeline(preset, source, revision, None, "float32")
    return Components(pipe=pipe, adapter=TextEncoderAdapter(pipe.text_encoder, p.text_layer_template,
                                                             p.text_block_template),
                      base_model_id=preset, base_revision=revision, edit_layers=p.edit_layers,
                      value_layer=p.value_layer), lock


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


def latent_settings(method: str, params: dict[str, Any], preset: str) -> dict[str, int] | None:
    """The source-image latents a method's visual loss uses (seed, images per edit, sampling steps;
    ``latent_steps`` null = the preset's, as the values stage), or None without the visual loss."""
    config = build_config(get_method(method), params)
    values = getattr(config, "values", None)
    if values is None or values.lambda_visual == 0:
        return None
    return {"seed": int(config.latent_seed), "images": int(config.latent_images),
            "steps": int(config.latent_steps or PRESETS[preset].num_inference_steps)}


def shared_latents(latents_dir: Path | None, edit_ids: list[str], want: dict[str, int]) -> torch.Tensor | None:
    """The main run's source latents (values stage: ``latents_dir``/batch_*.safetensors) of ``edit_ids``,
    (n, K, C, H, W), if they were generated with the settings ``want``; else None."""
    if latents_dir is None or not Path(latents_dir).is_dir():
        return None
    found: dict[str, torch.Tensor] = {}
    for f in sorted(Path(latents_dir).glob("batch_*.safetensors")):
        meta = load_meta(f)
        lat = load_tensors(f)["latents"]  # (n, K, C, H, W)
        if (int(meta.get("seed", -1)) != want["seed"] or int(meta.get("num_inference_steps", -1)) != want["steps"]
                or lat.shape[1] != want["images"]):
            continue
        found.update(zip(meta["edit_ids"], lat))
    if not all(e in found for e in edit_ids):
        return None
    return torch.stack([found[e] for e in edit_ids])


@task(cache_policy=STAMP_CACHE)
def edit_method(out: Path, fingerprint: str, method: str, params: dict[str, Any], model: LockedModel,
                edits: Path, entities: Path, moments: Path, projectors: Path,
                latents_dir: Path | None = None) -> Path:
    """The method's EditArtifact for every single edit of the dataset (folder ``out``), with the ner
    stage's entity spans (``entities``), the main run's C0 and projectors (:func:`load_stats`) and,
    for the visual loss, its source latents (``latents_dir``) where their settings match."""
    def produce(folder: Path) -> None:
        torch.manual_seed(0)  # nothing should draw from the global RNG; pin it anyway
        comps, lock = load_components(model.preset, model.source, model.revision)
        requests = edit_requests(edits, entities)
        stats = load_stats(moments, projectors)
        want = latent_settings(method, params, model.preset)
        with lock:
            if want is not None:
                ids = [r.edit_id for r in requests]
                stats.source_latents = shared_latents(latents_dir, ids, want)
                if stats.source_latents is None:
                    logger.info("compare/%s: generating source latents %s", method, want)
                    stats.source_latents = generate_source_latents(
                        comps.pipe, ids, [r.source for r in requests], seed=want["seed"],
                        images_per_prompt=want["images"], num_inference_steps=want["steps"])
                else:
                    logger.info("compare/%s: the main run's source latents", method)
            artifact = compute_edit(method, requests, stats, comps, params)
        artifact.save(folder)

    return run_once(out, fingerprint, produce)


def share_images(items: list[tuple[str, int]], image_root: Path, shared_root: Path | None, mh: str,
                 config: SamplingConfig) -> int:
    """Link (else copy) the images of ``items`` that ``shared_root`` already holds under the same key
    into ``image_root``; returns how many are now present there."""
    present = 0
    for prompt, seed in dict.fromkeys(items):
        rel = image_relpath(prompt, seed, mh, config)
        dst = image_root / rel
        if not dst.exists() and shared_root is not None and (shared_root / rel).is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(shared_root / rel, dst)
            except OSError:
                shutil.copyfile(shared_root / rel, dst)
        present += dst.exists()
    return present


@task(cache_policy=STAMP_CACHE)
def evaluate_method(out: Path, fingerprint: str, method: str, model: LockedModel, artifact: Path,
                    eval_prompts: Path, image_root: Path, seeds: list[int], sampling: dict[str, Any],
                    clip_source: str, clip_revision: str | None, batch_size: int, sigma: str = "2sigma",
                    shared_images: Path | None = None) -> Path:
    """Generate the method's images (edit applied) and score them: ``out``/per_image.parquet,
    summary.json (``{test: metrics.summarize}``), index.parquet. Images are keyed by the locked
    weights' and the edit's content and the dtype (``tasks.evaluate.images_key``; an edit that changes
    no weight is the unedited model, keyed as such); every image ``shared_images`` — the main run's —
    holds under the same key is linked, not generated (the unedited model's images; with ``artifact``
    the main run's own edit, all of its edited images). The rest is generated by the process's
    pipeline of (model, edit, ``model.dtype``) (``tasks.evaluate.cached_pipeline``), loaded only if an
    image is missing. ``eval_prompts`` carries the thresholds of the headline test (the metrics stage's)."""
    def produce(folder: Path) -> None:
        art = EditArtifact.load(artifact)
        ep = read_parquet(eval_prompts).to_pandas()
        col = prompt_column(get_method(method).oracle_prompts)
        texts = ep[col].fillna(ep["prompt"]) if col != "prompt" else ep["prompt"]
        items = [(t, s) for t in texts for s in seeds]
        config = SamplingConfig(**sampling)
        edit = artifact if art.deltas else None
        mh = images_key(model, edit)
        shared = share_images(items, image_root, shared_images, mh, config)
        index = generate_shared(items, image_root, mh, config, batch_size, lambda: cached_pipeline(
            model.preset, model.source, model.revision, edit, model.dtype))
        logger.info("compare/%s: %d of %d images shared with the main run", method, shared,
                    len(dict.fromkeys(items)))
        index_df = read_parquet(write_index(folder / INDEX, [index])).to_pandas()
        rows = M.evaluate_images(clip_encoder(clip_source, clip_revision), ep,
                                 index_df, image_root, method, prompt_column=col, sigma=sigma)
        write_scores(folder, M.per_image_table(rows))

    return run_once(out, fingerprint, produce)


@task(cache_policy=STAMP_CACHE)
def write_table(out: Path, fingerprint: str, summaries: dict[str, Path], title: str,
                note: str | None = None) -> Path:
    """``out``/table.md (one Markdown table per test: the threshold test first — the headline — then
    the two-class test; the Oracle row ``unedited`` first), table.parquet (:data:`COMPARISON_SCHEMA`),
    table.png (grouped bars of the headline test) and metrics.json."""
    def produce(folder: Path) -> None:
        results = {m: read_json(summaries[m]) for m in M.paper_rows(summaries)}
        tests = [t for t in M.TESTS if any(t in r for r in results.values())]
        md = [f"# {title}", "", *([note, ""] if note else [])]
        for test in tests:
            md.append(M.markdown_table({m: r[test] for m, r in results.items() if test in r},
                                       title=M.TEST_TITLES[test], labels=M.ROW_LABELS))
        write_text(folder / TABLE_MD, "\n".join(md))
        write_parquet(folder / TABLE_PARQUET, comparison_table(results), COMPARISON_SCHEMA)
        data = plots.category_data({m: r[tests[0]] for m, r in results.items() if tests[0] in r})
        plots.category_bars(data, folder / TABLE_PNG, title=f"{title} ({tests[0]} test)")
        write_json(folder / "metrics.json", {m: {t: {"score": r[t]["score"]["mean"]} for t in r}
                                             for m, r in results.items()})

    return run_once(out, fingerprint, produce)


def table_frame(path: Path) -> pd.DataFrame:
    return read_parquet(path / TABLE_PARQUET, COMPARISON_SCHEMA).to_pandas()
