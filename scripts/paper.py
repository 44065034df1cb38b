"""The settings of one of the paper's tables and what running them costs (``scripts/paper.sh``).

``python scripts/paper.py TABLE --dry-run`` prints every parameter the table is run with, the
per-dataset baseline settings, and the images and UNet evaluations per stage and method — counted by
``t2iedit.methods.compare.count_work`` with ``t2iedit.protocol`` (whose ``generation_items`` the generate
stage builds its work list with; each distinct image once, ``protocol.Ledger``) from the dataset
files alone: no model is loaded. ``--dvc-args`` prints the ``dvc exp run -S`` arguments, one per line.

TABLE: ``timed`` | ``road`` (the paper's Table 2) | ``cake`` (Table 3). The settings (METHOD.md §8):
SD-1.4, every edit of the test split at once, 5 seeds, 200 value steps, dslim/bert-large-NER, CAKE's
shipped thresholds and the ViT-bigG judge (also for the CLIP score), FID-5K; the baselines' per-dataset
settings come from the dataset (``t2iedit.methods.per_dataset``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


BIGG = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
SEEDS = [0, 1, 2, 3, 4]
TABLES = {"timed": "the paper's Table 2 (TIMED)", "road": "the paper's Table 2 (RoAD)",
          "cake": "the paper's Table 3 (CAKE)"}
COMPARE_METHODS = ["unedited", "oracle", "time", "refact", "emcid", "ours", "ours-no-projector",
                   "ours-no-eata", "ours-no-visual"]
SD_STEPS, SD_GUIDANCE = 50, 7.5  # SD-1.4's sampling (t2iedit.models PRESETS["sd-v1-4"], METHOD.md §8)


def settings(table: str, coco_images: str | None = None, inception_weights: str | None = None) -> dict[str, Any]:
    """params.yaml keys (dotted) → the value the table is run with."""
    if table not in TABLES:
        raise SystemExit(f"paper: TABLE must be one of {', '.join(TABLES)}, not {table!r}")
    return {
        "model.preset": "sd-v1-4", "model.source": None,
        "datasets.name": table, "datasets.split": "test", "datasets.max_edits": None,
        "datasets.conflict_policy": "keep_all",
        "ner.backend": "hf", "ner.model": "dslim/bert-large-NER",
        "values.steps": 200, "values.alpha": 0.11, "values.latent_images": 1, "values.latent_steps": None,
        "generate.methods": ["edited", "unedited", "oracle"], "generate.seeds": SEEDS,
        "generate.num_inference_steps": None, "generate.guidance_scale": SD_GUIDANCE,
        "metrics.thresholds": "shipped", "metrics.sigma": "2sigma", "metrics.clip": BIGG,
        "compare.methods": COMPARE_METHODS, "compare.seeds": SEEDS,
        # compare's ours optimises its values in the values stage's batches (values.batch_size 32; the
        # method's own default is 16): it is then the main run's edit, whose images compare reuses
        "compare.method_params": {"ours": {"value_batch_size": 32}},
        "compare.sampling": {"num_inference_steps": None, "guidance_scale": None}, "compare.reuse_main": True,
        "fid.method": "edited", "fid.n_captions": 5000, "fid.clip_score_model": BIGG,
        "fid.sampling": {"num_inference_steps": None, "guidance_scale": SD_GUIDANCE},
        "fid.coco_images": coco_images, "fid.inception_weights": inception_weights,
    }


def yaml_value(v: Any) -> str:
    """A value as ``dvc exp run -S`` parses it (YAML flow style)."""
    import yaml

    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def dataset(table: str, split: str = "test"):
    """The table's edit set as the prepare_datasets stage builds it (every edit, keep_all)."""
    from t2iedit.edit_data.benchmarks import load_cake, load_road, load_timed

    load = {"timed": load_timed, "road": load_road, "cake": load_cake}[table]
    es = load(REPO / "data" / "raw", split)
    return es.edits.to_pandas(), es.eval_prompts.to_pandas()


def plan(table: str, s: dict[str, Any]) -> dict[str, Any]:
    """Images and UNet evaluations per stage and method (:func:`t2iedit.methods.compare.count_work`)."""
    from flows.plan import flat, main_config
    from flows.stage import read_params
    from t2iedit.methods.compare import count_work

    edits, ep = dataset(table, s["datasets.split"])
    full = {**flat(read_params(str(REPO / "params.yaml"))), **s}  # dvc exp run -S overlays params.yaml
    return count_work(edits, ep, s, default_steps=SD_STEPS, main_config=main_config(full), preset="sd-v1-4")


def dataset_defaults(table: str) -> dict[str, Any] | None:
    try:
        from t2iedit.methods.per_dataset import dataset_defaults as dd
    except ImportError:
        return None
    return dd(table, "sd-v1-4")


def dry_run(table: str, coco_images: str | None, inception_weights: str | None) -> str:
    s = settings(table, coco_images, inception_weights)
    p = plan(table, s)
    out = [f"# scripts/paper.sh {table} --dry-run: {TABLES[table]}", "",
           "## Parameters (dvc exp run -S, over params.yaml)", ""]
    out += [f"    {k}={yaml_value(v)}" for k, v in s.items()]
    dd = dataset_defaults(table)
    if dd is not None:
        out += ["", "Per-dataset baseline settings (from the dataset, t2iedit.methods.per_dataset):", ""]
        out += [f"    {m}: {yaml_value(v)}" for m, v in dd.items()]
    out += ["", f"Dataset: {p['n_edits']} single edits applied at once"
            + (f" (+{p['n_composite']} composite pairs, evaluated only)" if p["n_composite"] else "")
            + f", {p['n_prompts']} evaluation prompts; SD-1.4 sampling {SD_STEPS} PNDM steps, guidance "
            f"{SD_GUIDANCE} (classifier-free: 2 sample-forwards per step and image).", "",
            "## Work (t2iedit.protocol; `shared`: images the main run already generated)", "",
            "| stage | method | images | UNet sample-forwards | UNet calls (batched) | shared |",
            "|---|---|---:|---:|---:|---:|"]
    out += [f"| {r['stage']} | {r['method']} | {r['images']:,} | {r['sample_forwards']:,} | "
            f"{r['unet_calls']:,} | {r['shared']:,} |" for r in p["rows"]]
    t = p["total"]
    out += [f"| **total** | | **{t['images']:,}** | **{t['sample_forwards']:,}** | **{t['unet_calls']:,}** | "
            f"{t['shared']:,} |", ""]
    if not (coco_images and inception_weights):
        out += ["FID-5K needs COCO_IMAGES (COCO val2014 folder) and INCEPTION_WEIGHTS (pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth) in the environment of the real run.", ""]
    out += ["No model was loaded. Run it: scripts/paper.sh " + table]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import os

    ap = argparse.ArgumentParser(prog="scripts/paper.py", description=__doc__.splitlines()[0])
    ap.add_argument("table", choices=sorted(TABLES))
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true")
    mode.add_argument("--dvc-args", action="store_true")
    a = ap.parse_args(argv)
    coco, weights = os.environ.get("COCO_IMAGES"), os.environ.get("INCEPTION_WEIGHTS")
    if a.dry_run:
        print(dry_run(a.table, coco, weights))
    else:
        for k, v in settings(a.table, coco, weights).items():
            print(f"{k}={yaml_value(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
