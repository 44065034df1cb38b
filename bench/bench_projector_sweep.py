"""What the null space protects, and what it costs: a sweep of projector rules on the real MiniLM and the
tiny preset, plus the entity-keys table (issue 15 items 2 and 4, METHOD.md §3 and §6).

Per model: CAKE single facts (entities from CAKE's field, as the ``dataset`` NER backend), text-only
target values (``t2iedit.values``, weighting ``paper`` with λ = 0, the same code as the values stage),
then the closed-form multi-layer edit (``t2iedit.edit.compute_multilayer_edit``, paper eq. 7) under
each projector rule. Keys:

- K0: ``--captions`` COCO captions from row 5,000 on (rows 0..4,999 are the FID-5K prompts and never
  used, as ``corpus.holdout_first``), through ``t2iedit.keys.collect_second_moment``;
- held-out: 300 captions from row 29,000 on (outside K0): ``heldout_energy`` of their key moment and
  the text-space held-out drift.

Metrics (text space, ``bench_values_minilm.metrics``: pooled final features, L2-normalised; MiniLM mean
pooling as trained, the tiny CLIP its [EOS] feature): efficacy, generality, specificity (cos), entity
(cos of the entity text), coco (cos of the held-out captions); drift = 1 − cos. Per rule and layer:
null rank, ``protected_energy`` 1 − tr(P C0)/tr(C0) and ``heldout_energy`` (``t2iedit.projector``).

Entity keys (``--entity-table``): none / preserve (nullspace) / preserve (sequential) × α ∈ {0, 0.11}
× projector (the chosen default) on/off; plus the entity prompts' drift (cos of "A photo of <entity>"…).

Run: ``python bench/bench_projector_sweep.py`` → bench/results/projector_sweep.json, projector_sweep.png,
projector_sweep.md (tables). One thread; values cached under --cache (delete it to recompute).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_values_minilm import (BASE_ID, COCO, embed, load_facts, metrics, minilm_folder,  # noqa: E402
                                 requests_for, texts_of)

from t2iedit.edit import NullSpaceSolver, compute_multilayer_edit, edited, entity_prompts  # noqa: E402
from t2iedit.keys import collect_second_moment  # noqa: E402
from t2iedit.models import (BERT_BLOCK_TEMPLATE, BERT_DENSE_TEMPLATE, TextEncoderAdapter,  # noqa: E402
                            build_tiny_pipeline, load_text_encoder)
from t2iedit.projector import eigh_moment, projector_from_eigh, protected_energy  # noqa: E402
from t2iedit.storage import write_json  # noqa: E402
from t2iedit.values import compute_target_values_batched, weighted_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FID_HEAD = 5000      # corpus.holdout_first: the FID-5K prompts
HELD_OUT_START = 29000
logger = logging.getLogger("bench_projector_sweep")

# (mode, value); value "frac" for rank = that fraction of d left null
RULES = [("none", None),
         ("relative", 1.0e-2), ("relative", 1.0e-3), ("relative", 1.0e-4), ("relative", 1.0e-5),
         ("absolute", 2.0e-2), ("absolute", 1.0e-3),
         ("rank", 0.5), ("rank", 0.75),
         ("energy", 1.0e-1), ("energy", 3.0e-2), ("energy", 1.0e-2), ("energy", 3.0e-3), ("energy", 1.0e-3)]
# at α = 0.11 (the default EATA weight) a subset: the old default, AlphaEdit's, and the energy rules
RULES_ALPHA = [("none", None), ("relative", 1.0e-2), ("relative", 1.0e-4), ("absolute", 2.0e-2),
               ("energy", 1.0e-1), ("energy", 3.0e-2), ("energy", 1.0e-2), ("energy", 3.0e-3)]


@dataclasses.dataclass
class Setup:
    name: str
    tokenizer: object
    model: torch.nn.Module
    adapter: TextEncoderAdapter
    layers: tuple[int, ...]
    value_layer: int
    pooling: str


def setup(name: str, workdir: Path) -> Setup:
    if name == "minilm":  # = the tiny-minilm preset's text encoder, layers and pooling
        tok, model = load_text_encoder(minilm_folder(), subfolder=None, tokenizer_subfolder=None)
        return Setup(name, tok, model, TextEncoderAdapter(model, BERT_DENSE_TEMPLATE, BERT_BLOCK_TEMPLATE),
                     (0, 1, 2, 3), 3, "mean")
    if name == "tiny":
        folder = build_tiny_pipeline(workdir / "tiny", seed=0)
        tok, model = load_text_encoder(folder)
        return Setup(name, tok, model, TextEncoderAdapter(model), (0, 1, 2, 3, 4), 4, "eos")
    raise ValueError(name)


@torch.no_grad()
def embed_pooled(s: Setup, texts: list[str], batch_size: int = 128) -> torch.Tensor:
    if s.pooling == "mean":
        return embed(s.model, s.tokenizer, texts, batch_size)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = s.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
        out.append(torch.nn.functional.normalize(s.model(**enc).pooler_output, dim=-1))
    return torch.cat(out)


def values_for(s: Setup, reqs, alpha: float, steps: int, cache: Path) -> torch.Tensor:
    path = cache / f"{s.name}_a{alpha:g}_s{steps}_n{len(reqs)}.pt"
    if path.exists():
        return torch.load(path)
    cfg = weighted_config("paper", lam=0.0, alpha=alpha, steps=steps, pooling=s.pooling, log_every=max(steps, 1))
    t0 = time.perf_counter()
    z = compute_target_values_batched(s.tokenizer, s.model, s.adapter.block(s.value_layer), reqs, cfg,
                                      len(reqs), value_layer=s.value_layer).z
    logger.info("%s values α=%g: %.1f s", s.name, alpha, time.perf_counter() - t0)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(z, path)
    return z


def rule_label(mode: str, value) -> str:
    return "none (P = I)" if mode == "none" else f"{mode} {value:g}"


def build(mode: str, value, eig: tuple[torch.Tensor, torch.Tensor]):
    """The projector of one rule from C0's decomposition (``t2iedit.projector.projector_from_eigh``,
    what ``null_space_projector`` runs after its ``eigh``)."""
    if mode == "none":
        return None
    if mode == "rank":
        value = int(round(value * eig[0].shape[0]))
    return projector_from_eigh(*eig, mode, value)


def evaluate(s: Setup, reqs, z, texts, base, projectors, preserve=(), form="nullspace") -> dict:
    solver = NullSpaceSolver(projectors=projectors, preserve_form=form)
    art = compute_multilayer_edit(s.adapter, s.tokenizer, reqs, z, s.layers, s.value_layer, solver,
                                  method="ours", base_model_id=BASE_ID, base_revision=None,
                                  preserve_prompts=preserve)
    with edited({"text_encoder": s.model}, art, BASE_ID, None):
        now = {k: embed_pooled(s, v) for k, v in texts.items()}
    row = metrics(base, now)
    row["entity_prompts"] = float((now["entity_prompts"] * base["entity_prompts"]).sum(-1).mean())
    row["relative_residual_after"] = art.manifest.extra["relative_residual_after"]
    stats = art.manifest.extra["layer_stats"]
    if preserve:
        row["preserved_keys"] = {k: v["preserved_keys"] for k, v in stats.items()}
    return row


def run_model(name: str, n_facts: int, steps: int, n_captions: int, n_held: int, cache: Path,
              workdir: Path, entity_table: bool, sweep_alphas: tuple[float, ...] = (0.0, 0.11)) -> dict:
    t_start = time.perf_counter()
    s = setup(name, workdir)
    facts = load_facts(n_facts)
    reqs = requests_for(facts)
    with open(COCO, newline="", encoding="utf-8") as f:
        captions = [r["prompt"] for r in csv.DictReader(f)]
    held = captions[HELD_OUT_START:HELD_OUT_START + n_held]
    texts = texts_of(facts, held)
    texts["entity_prompts"] = entity_prompts(reqs)
    base = {k: embed_pooled(s, v) for k, v in texts.items()}

    t0 = time.perf_counter()
    k0 = collect_second_moment(s.adapter, s.tokenizer, captions[FID_HEAD:FID_HEAD + n_captions], s.layers,
                               progress=False)
    kh = collect_second_moment(s.adapter, s.tokenizer, held, s.layers, progress=False)
    C0 = {l: m.moment() for l, m in k0.items()}
    eig = {l: eigh_moment(C) for l, C in C0.items()}
    Ch = {l: m.moment() for l, m in kh.items()}
    logger.info("%s: moments of %d + %d captions in %.1f s", name, n_captions, n_held, time.perf_counter() - t0)

    sweep = []
    for alpha, (mode, value) in [(a, r) for a in sweep_alphas for r in (RULES if a == 0 else RULES_ALPHA)]:
        z = values_for(s, reqs, alpha, steps, cache)
        t0 = time.perf_counter()
        projs = {l: build(mode, value, eig[l]) for l in s.layers}
        layer_rows = {}
        for l in s.layers:
            P = torch.eye(C0[l].shape[0], dtype=torch.float64) if projs[l] is None else projs[l].P
            layer_rows[str(l)] = {"null_rank": C0[l].shape[0] if projs[l] is None else projs[l].null_rank,
                                  "protected_energy": protected_energy(P, C0[l]),
                                  "heldout_energy": protected_energy(P, Ch[l])}
        row = evaluate(s, reqs, z, texts, base, None if mode == "none" else {l: p.P for l, p in projs.items()})
        row.update(rule=rule_label(mode, value), mode=mode, value=value, alpha=alpha, layers=layer_rows,
                   min_protected_energy=min(r["protected_energy"] for r in layer_rows.values()),
                   min_heldout_energy=min(r["heldout_energy"] for r in layer_rows.values()),
                   seconds=time.perf_counter() - t0)
        logger.info("%s α=%g %s: efficacy %.2f, coco cos %.3f, protected ≥ %.4f, held-out ≥ %.4f", name, alpha,
                    row["rule"], row["efficacy"], row["coco"], row["min_protected_energy"], row["min_heldout_energy"])
        sweep.append(row)

    out = {"model": BASE_ID if name == "minilm" else "tiny (seed 0, random CLIP)", "n_facts": len(reqs),
           "steps": steps, "edit_layers": list(s.layers), "value_layer": s.value_layer, "pooling": s.pooling,
           "n_captions": n_captions, "n_held_out": n_held, "dim": s.adapter.key_dim,
           "unedited": metrics(base, base), "sweep": sweep}
    chosen = pick_default(sweep)
    if chosen:
        out["chosen"] = {"rule": chosen["rule"], "mode": chosen["mode"], "value": chosen["value"], "by_alpha": {
            str(r["alpha"]): {k: r[k] for k in ("min_protected_energy", "min_heldout_energy", "efficacy",
                                                "generality", "specificity", "entity", "coco")}
            for r in sweep if r["rule"] == chosen["rule"]}}
    else:
        out["chosen"] = None
    if entity_table and chosen is not None:
        default = (chosen["mode"], chosen["value"])
        projs = {l: build(*default, eig[l]).P for l in s.layers}
        table = []
        for alpha in (0.0, 0.11):
            za = values_for(s, reqs, alpha, steps, cache)
            for use_p in (True, False):
                for keys, form in (("none", None), ("preserve", "nullspace"), ("preserve", "sequential")):
                    t0 = time.perf_counter()
                    row = evaluate(s, reqs, za, texts, base, projs if use_p else None,
                                   preserve=texts["entity_prompts"] if keys == "preserve" else (),
                                   form=form or "nullspace")
                    row.update(alpha=alpha, projector=rule_label(*default) if use_p else "none (P = I)",
                               entity_keys=keys, form=form, seconds=time.perf_counter() - t0)
                    logger.info("%s entity keys %s/%s α=%g P=%s: efficacy %.2f entity %.3f", name, keys, form,
                                alpha, use_p, row["efficacy"], row["entity"])
                    table.append(row)
        out["entity_keys"] = {"projector": rule_label(*default), "n_entity_prompts": len(texts["entity_prompts"]),
                              "rows": table}
    out["seconds"] = time.perf_counter() - t_start
    return out


def pick_default(sweep: list[dict], target: float = 0.99, keep: float = 0.75) -> dict | None:
    """The preset's default rule from the α = 0 rows (the projector's effect alone): among energy rules
    that keep ≥ ``keep`` of the unprojected (P = I) efficacy, the largest value (least constraint) that
    protects ≥ ``target`` of C0's energy at every layer; if none does (the target costs most of the
    efficacy), the smallest value kept (the most protection at an acceptable efficacy). METHOD.md §3."""
    rows = [r for r in sweep if r["alpha"] == 0.0]
    free = next(r["efficacy"] for r in rows if r["mode"] == "none")
    kept = [r for r in rows if r["mode"] == "energy" and r["efficacy"] >= keep * free]
    ok = [r for r in kept if r["min_protected_energy"] >= target - 1e-9]
    if ok:
        return max(ok, key=lambda r: r["value"])
    return min(kept, key=lambda r: r["value"]) if kept else None


def pareto_plot(res: dict, path: Path) -> Path:
    """Efficacy vs held-out drift, one panel per (model, α), one marker per rule family."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(res["models"])
    alphas = sorted({r["alpha"] for m in res["models"].values() for r in m["sweep"]})
    fig = Figure(figsize=(5.5 * len(models), 4.2 * len(alphas)))
    for i, alpha in enumerate(alphas):
        for j, name in enumerate(models):
            m = res["models"][name]
            ax = fig.add_subplot(len(alphas), len(models), i * len(models) + j + 1)
            rows = [r for r in m["sweep"] if r["alpha"] == alpha]
            for mode, marker in (("none", "x"), ("relative", "o"), ("absolute", "s"), ("rank", "^"), ("energy", "D")):
                pts = [r for r in rows if r["mode"] == mode]
                if not pts:
                    continue
                ax.scatter([1 - r["coco"] for r in pts], [r["efficacy"] for r in pts], marker=marker, label=mode)
                for r in pts:
                    ax.annotate(r["rule"].split(" ", 1)[-1], (1 - r["coco"], r["efficacy"]), fontsize=6,
                                xytext=(3, 2), textcoords="offset points")
            ax.set_xscale("symlog", linthresh=1e-3)
            ax.set_xlabel("held-out drift (1 − cos, held-out COCO captions)")
            ax.set_ylabel("efficacy")
            chosen = (m.get("chosen") or {}).get("rule", "-")
            ax.set_title(f"{name}, α = {alpha:g}: {m['n_facts']} CAKE facts; chosen {chosen}", fontsize=9)
            ax.legend(fontsize=7)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def markdown(res: dict) -> str:
    lines = []
    for name, m in res["models"].items():
        if m.get("chosen"):
            lines += [f"**{name}: chosen {m['chosen']['rule']}** — " + "; ".join(
                f"α={a}: efficacy {v['efficacy']:.2f}, protected ≥ {v['min_protected_energy']:.4f}, held-out ≥ "
                f"{v['min_heldout_energy']:.4f}, held-out drift {1 - v['coco']:.4f}" for a, v in m["chosen"]["by_alpha"].items()), ""]
        lines += [f"### {name} ({m['model']}; {m['n_facts']} facts, layers {m['edit_layers']}, d = {m['dim']})", "",
                  "| α | rule | null rank per layer | min protected energy | min held-out energy | efficacy | generality | "
                  "specificity (cos) | entity drift | held-out drift |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["sweep"]:
            ranks = "/".join(str(v["null_rank"]) for v in r["layers"].values())
            lines.append(f"| {r['alpha']:g} | {r['rule']} | {ranks} | {r['min_protected_energy']:.4f} | {r['min_heldout_energy']:.4f} | "
                         f"{r['efficacy']:.2f} | {r['generality']:.2f} | {r['specificity']:.3f} | "
                         f"{1 - r['entity']:.4f} | {1 - r['coco']:.4f} |")
        if "entity_keys" in m:
            lines += ["", f"Entity keys ({m['entity_keys']['n_entity_prompts']} entity prompts; projector "
                      f"{m['entity_keys']['projector']}):", "",
                      "| α | projector | entity_keys | efficacy | generality | specificity (cos) | entity drift | "
                      "entity-prompt drift | held-out drift |", "|---|---|---|---|---|---|---|---|---|"]
            for r in m["entity_keys"]["rows"]:
                keys = r["entity_keys"] + (f" ({r['form']})" if r["form"] else "")
                lines.append(f"| {r['alpha']:g} | {r['projector']} | {keys} | {r['efficacy']:.2f} | {r['generality']:.2f} | "
                             f"{r['specificity']:.3f} | {1 - r['entity']:.4f} | {1 - r['entity_prompts']:.4f} | "
                             f"{1 - r['coco']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "tiny"])
    ap.add_argument("--facts", type=int, default=30)
    ap.add_argument("--tiny-facts", type=int, default=20)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--captions", type=int, default=2000)
    ap.add_argument("--held-out", type=int, default=300)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "t2iedit_projector_sweep")
    ap.add_argument("--no-entity-table", action="store_true")
    ap.add_argument("--sweep-alphas", type=float, nargs="+", default=[0.0, 0.11])
    ap.add_argument("--out", type=Path, default=RESULTS / "projector_sweep.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = {"models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            n = args.facts if name == "minilm" else args.tiny_facts
            res["models"][name] = run_model(name, n, args.steps, args.captions, args.held_out, args.cache,
                                            Path(tmp), not args.no_entity_table, tuple(args.sweep_alphas))
    res["seconds"] = time.perf_counter() - t0
    res["machine"] = {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "python": platform.python_version()}
    write_json(args.out, res)
    pareto_plot(res, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(markdown(res), encoding="utf-8")
    print(markdown(res))


if __name__ == "__main__":
    main()
