"""Prefect tasks of the evaluation stages (generate → metrics → report).

Every task takes its output path and fingerprint (STAMP_CACHE + run_once) and loads models inside.
Images live in one content-addressed folder shared by all methods; each generation batch writes its
own small index file, so a killed run keeps every finished batch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from prefect import task

from t2iedit import metrics as M
from t2iedit import plots
from t2iedit.generate import (SamplingConfig, generate_images, image_relpath, model_hash, read_index,
                              write_index)
from t2iedit.storage import read_json, read_parquet, tree_sha256, write_json, write_parquet, write_text
from t2iedit.models import DTYPES, default_device, load_pipeline, resolve_dtype
from tasks.stamps import STAMP_CACHE, run_once
from tasks.model import LockedModel

PER_IMAGE, SUMMARY = "per_image.parquet", "summary.json"
METRICS_JSON, TABLE_MD, CATEGORIES_CSV = "metrics.json", "table.md", "categories.csv"


_CLIP_LOCK = threading.Lock()
_CLIP: dict[tuple[str, str | None], Any] = {}


def clip_encoder(source: str, revision: str | None = None):
    """The classifier (``t2iedit.clip_eval.ClipEncoder``), loaded once per process — the mapped
    scoring batches of a thread runner or a Dask worker share it — on the GPU when there is one."""
    with _CLIP_LOCK:  # also serialises the first import of transformers' CLIP classes
        from t2iedit.clip_eval import ClipEncoder

        key = (str(source), revision)
        if key not in _CLIP:
            _CLIP.clear()  # one classifier resident at a time
            _CLIP[key] = ClipEncoder.from_pretrained(source, revision, device=default_device())
        return _CLIP[key]


def images_key(model: LockedModel, artifact: Path | None = None) -> str:
    """What generated images are keyed by: the locked weights' content plus the applied edit's, and
    the dtype generation runs in here (``model.dtype`` as :func:`t2iedit.models.resolve_dtype`
    resolves it on this machine's device)."""
    return model_hash(model.identity, model.revision, tree_sha256(artifact) if artifact else None,
                      resolve_dtype(model.dtype))


_PIPE_LOCK = threading.Lock()
_PIPE: dict[tuple, tuple[Any, threading.Lock]] = {}


def cached_pipeline(preset: str, source: str, revision: str | None, artifact: Path | None = None,
                    dtype: str = "float32"):
    """(pipeline, lock): the locked model's pipeline, loaded once per worker process (not once per
    mapped task) on :func:`default_device` in :func:`resolve_dtype`'s dtype, with ``artifact``'s
    edit applied for good; one pipeline resident at a time. Hold the lock while calling it (the
    mapped tasks of a thread runner share it).

    The edit is applied to the float32 weights as loaded — ``W ← cast(W + ΔW)``, the sum in float64
    (``t2iedit.edit.apply_edit``) — and only then is the pipeline cast to ``dtype``: the float64 deltas
    are rounded once. The same weights as :func:`t2iedit.edit.edited` on a fresh float32 pipeline."""
    device = default_device()
    eff = resolve_dtype(dtype, device)
    key = (preset, str(source), revision, eff, str(device),
           None if artifact is None else (str(artifact), tree_sha256(artifact)))
    with _PIPE_LOCK:
        if key not in _PIPE:
            _PIPE.clear()  # one pipeline resident at a time
            pipe = load_pipeline(source, revision)  # float32 weights
            if artifact is not None:
                from t2iedit.edit import EditArtifact, apply_edit

                apply_edit({"text_encoder": pipe.text_encoder, "unet": pipe.unet},
                           EditArtifact.load(artifact), preset, revision)
            _PIPE[key] = (pipe.to(device=device, dtype=DTYPES[eff]), threading.Lock())
        return _PIPE[key]


def generate_shared(items: list[tuple[str, int]], image_root: Path, model_hash: str, config: SamplingConfig,
                    batch_size: int, pipeline) -> pa.Table:
    """The index rows of ``items`` under ``image_root``, generating only the images not there yet
    (each distinct key once, ``t2iedit.protocol.Ledger``); ``pipeline()`` → (pipeline, lock) is
    called only when one is missing, so a batch of shared images loads no model."""
    missing = any(not (Path(image_root) / image_relpath(p, s, model_hash, config)).is_file() for p, s in items)
    if not missing:
        return generate_images(None, items, image_root, model_hash, config, batch_size=batch_size, progress=False)
    pipe, lock = pipeline()
    with lock:
        return generate_images(pipe, items, image_root, model_hash, config, batch_size=batch_size)


@task(cache_policy=STAMP_CACHE)
def generate_batch(out: Path, fingerprint: str, preset: str, source: str, revision: str | None,
                   artifact: Path | None, items: list[tuple[str, int]], image_root: Path,
                   model_hash: str, sampling: dict[str, Any], batch_size: int,
                   dtype: str = "float32") -> Path:
    """Images of one batch of (prompt, seed) under ``image_root``; ``out`` = the batch's index. The
    pipeline is the process's :func:`cached_pipeline` (loaded by the first batch of a method that has
    an image to generate: a batch whose images an earlier method of the same model already made —
    oracle prompts equal to the prompts — only writes its index)."""
    def produce(path: Path) -> None:
        config = SamplingConfig(**sampling)
        index = generate_shared(items, image_root, model_hash, config, batch_size,
                                lambda: cached_pipeline(preset, source, revision, artifact, dtype))
        write_index(path, [index])

    return run_once(out, fingerprint, produce)


@task(cache_policy=STAMP_CACHE)
def merge_index(out: Path, fingerprint: str, batches: list[Path]) -> Path:
    return run_once(out, fingerprint, lambda path: write_index(path, [read_index(b) for b in batches]))


def prune_images(image_root: Path, indexes: list[Path]) -> list[Path]:
    """Delete the images under ``image_root`` that none of ``indexes`` lists, and emptied folders.

    The image folder is a ``persist: true`` DVC output (an image is never generated twice), so without
    this it keeps the images of every earlier model, edit and sampling setting: its hash in dvc.lock
    then depends on the history of the workspace, and a clean clone's ``dvc repro`` (which produces
    only this run's images) rewrites the committed lock (issue 18 item 4).
    """
    image_root = Path(image_root)
    keep = {(image_root / p).resolve() for i in indexes for p in read_index(i).column("path").to_pylist()}
    removed = [p for p in sorted(image_root.rglob("*")) if p.is_file() and p.resolve() not in keep]
    for p in removed:
        p.unlink()
    for d in sorted((d for d in image_root.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    return removed


@task(cache_policy=STAMP_CACHE)
def score_batch(out: Path, fingerprint: str, method: str, prompt_column: str, eval_prompts: Path,
                prompt_ids: list[str], index: Path, image_root: Path, clip_source: str,
                clip_revision: str | None, sigma: str, batch_size: int) -> Path:
    """``out``: per-image rows (:data:`metrics.PER_IMAGE_SCHEMA`) of one batch of evaluation prompts
    (``prompt_ids``, every seed of the index), both image tests run by the classifier ``clip_source``."""
    def produce(path: Path) -> None:
        ep = read_parquet(eval_prompts).to_pandas()
        ep = ep[ep["prompt_id"].isin(prompt_ids)]
        if len(ep) != len(set(prompt_ids)):
            raise ValueError(f"{eval_prompts}: {len(set(prompt_ids)) - len(ep)} of the batch's prompt ids "
                             "are not in the evaluation prompts")
        rows = M.evaluate_images(clip_encoder(clip_source, clip_revision), ep,
                                 read_index(index).to_pandas(), image_root, method,
                                 prompt_column=prompt_column, sigma=sigma, batch_size=batch_size)
        write_parquet(path, M.per_image_table(rows), M.PER_IMAGE_SCHEMA)

    return run_once(out, fingerprint, produce)


def write_scores(folder: Path, table: pa.Table) -> None:
    """``folder``/per_image.parquet and summary.json (``{test: metrics.summarize}``)."""
    write_parquet(folder / PER_IMAGE, table, M.PER_IMAGE_SCHEMA)
    rows = table.to_pandas()
    write_json(folder / SUMMARY, {t: M.summarize(rows, f"{t}_success") for t in M.TESTS
                                  if rows[f"{t}_success"].notna().any()})


@task(cache_policy=STAMP_CACHE)
def merge_scores(out: Path, fingerprint: str, batches: list[Path]) -> Path:
    """One method's scored batches (:func:`score_batch`) → ``out``/per_image.parquet, summary.json."""
    return run_once(out, fingerprint, lambda folder: write_scores(
        folder, pa.concat_tables([read_parquet(b, M.PER_IMAGE_SCHEMA) for b in batches])))


THRESHOLD_PROMPTS, THRESHOLDS_JSON = "eval_prompts.parquet", "thresholds.json"


@task(cache_policy=STAMP_CACHE)
def threshold_prompts(out: Path, fingerprint: str, eval_prompts: Path, mode: str,
                      reference: Path | None = None, ddof: int = M.CAKE_DDOF) -> Path:
    """``out``/eval_prompts.parquet: the evaluation prompts with the adaptive thresholds the threshold
    test uses, and ``out``/thresholds.json (which ones, over how many images).

    ``shipped``: the dataset's (CAKE's, computed for SD-1.4 with EVA-CLIP bigG: valid only for that
    model and classifier). ``recompute``: CAKE's recipe — mean − kσ (std with ``ddof``) of this
    classifier's scores of the unedited model's images of each prompt's evaluation text
    (``reference``: their per_image.parquet; ``metrics.thresholds_from_reference``)."""
    def produce(folder: Path) -> None:
        table = read_parquet(eval_prompts)
        ep = table.to_pandas()
        info: dict[str, Any] = {"mode": mode}
        if mode == "recompute":
            th = M.thresholds_from_reference(read_parquet(reference).to_pandas(), ddof)
            ep = M.with_thresholds(ep, th)
            info.update(n_prompts=len(th), n_images=sorted({int(n) for n in th["n_images"]}), ddof=ddof,
                        mean_threshold_2sigma=float(th["threshold_2sigma"].mean()))
        elif mode != "shipped":
            raise ValueError(f"metrics.thresholds must be shipped or recompute, got {mode!r}")
        write_parquet(folder / THRESHOLD_PROMPTS, pa.Table.from_pandas(ep[table.schema.names],
                                                                      schema=table.schema,
                                                                      preserve_index=False))
        write_json(folder / THRESHOLDS_JSON, info)

    return run_once(out, fingerprint, produce)


@task(cache_policy=STAMP_CACHE)
def write_metrics(out: Path, fingerprint: str, summaries: dict[str, Path], text_space: Path | None,
                  title: str, note: str | None = None) -> Path:
    """``out``/metrics.json (for ``dvc metrics``: per method and test, category means and Score),
    table.md (paper layout, one table per test: the threshold test first — the headline — then the
    two-class test; the ``unedited`` row first, labelled "Oracle (unedited)") and categories.csv."""
    def produce(folder: Path) -> None:
        results = {m: read_json(p / SUMMARY) for m, p in summaries.items()}
        metrics: dict[str, Any] = {
            m: {t: {**{c: round(v["mean"], 4) for c, v in r[t]["categories"].items()},
                    "score": round(r[t]["score"]["mean"], 4)} for t in r}
            for m, r in results.items()}
        if text_space is not None:
            metrics["text_space"] = read_json(text_space)
        write_json(folder / METRICS_JSON, metrics)
        md = [f"# {title}", "", *([note, ""] if note else [])]
        frames = []
        for test in M.TESTS:
            sub = {m: results[m][test] for m in M.paper_rows(results) if test in results[m]}
            if sub:
                md.append(M.markdown_table(sub, title=M.TEST_TITLES[test], labels=M.ROW_LABELS))
                frames.append(plots.category_data(sub).assign(test=test))
        write_text(folder / TABLE_MD, "\n".join(md))
        data = pd.concat(frames, ignore_index=True)
        from t2iedit.storage import atomic_path

        with atomic_path(folder / CATEGORIES_CSV) as tmp:
            data.to_csv(tmp, index=False)

    return run_once(out, fingerprint, produce)
