"""Prefect tasks of the prepare_datasets and prepare_corpus stages: verified raw files -> edit set,
preserved-key corpus."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from t2iedit import edit_data as ds
from t2iedit.storage import write_json, write_parquet, write_text
from tasks.stamps import STAMP_CACHE, run_once

EDITS_FILE, EVAL_PROMPTS_FILE = "edits.parquet", "eval_prompts.parquet"
REPORT_JSON, REPORT_MD = "report.json", "report.md"
CORPUS_FILE = "corpus.parquet"


@task(cache_policy=NO_CACHE)  # hashing ~5 MB is cheaper than any cache lookup; must run every time
def verified_raw(raw_dir: Path, manifest: Path, mode: str, download_dir: Path,
                 only: list[str] | None = None) -> Path:
    """The folder of sha256-verified raw files: ``raw_dir`` itself offline, else a fresh download.
    ``only``: the manifest paths to verify/fetch (default: all)."""
    files = ds.read_manifest(manifest)
    if only is not None:
        missing = sorted(set(only) - {f.path for f in files})
        if missing:
            raise ds.DatasetError(f"{manifest}: no entry for {missing}")
        files = [f for f in files if f.path in only]
    if mode == "offline":
        ds.verify_raw(raw_dir, files)
        return raw_dir
    ds.fetch_raw(download_dir, files, mode=mode, vendored=raw_dir)
    return download_dir


@task(cache_policy=STAMP_CACHE)
def prepare_edit_set(out: Path, fingerprint: str, raw_dir: Path, name: str, split: str,
                     user_file: Path | None, conflict_policy: str, max_edits: int | None = None) -> Path:
    """Write ``out``/{edits,eval_prompts}.parquet and the conflict report (json + md)."""
    def produce(folder: Path) -> None:
        edit_set = (ds.load_user_edits(user_file) if name == "user" else ds.load_benchmark(name, raw_dir, split))
        edit_set, report = ds.resolve_conflicts(ds.subset(edit_set, max_edits), conflict_policy)
        report["dataset"], report["split"] = name, (user_file.stem if name == "user" else split)
        report["max_edits"], report["over_77_tokens"] = max_edits, ds.over_length(edit_set)
        ds.write_edit_set(edit_set, folder / EDITS_FILE, folder / EVAL_PROMPTS_FILE)
        write_json(folder / REPORT_JSON, report)
        write_text(folder / REPORT_MD, ds.report_markdown(report, title=f"Dataset {name}/{report['split']}"))

    return run_once(out, fingerprint, produce)


@task(cache_policy=STAMP_CACHE)
def prepare_corpus(out: Path, fingerprint: str, coco_csv: Path, source: str, size: int, seed: int,
                   holdout_first: int, hf: dict | None = None) -> Path:
    """Write ``out``/corpus.parquet: the preserved-key texts (COCO sample or a Hugging Face dataset)."""
    def produce(folder: Path) -> None:
        if source == "coco":
            table = ds.coco_captions(coco_csv, size, seed, holdout_first)
        else:
            table = ds.hf_texts(hf["name"], hf.get("config"), hf["split"], hf["text_field"], size, seed)
        write_parquet(folder / CORPUS_FILE, table, ds.CORPUS_SCHEMA)

    return run_once(out, fingerprint, produce)
