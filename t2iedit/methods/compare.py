"""The comparison of methods: edit requests from the dataset table, which prompts each method is
evaluated on, and the results table in the layout of the paper's Tables 2/3 (rows = methods, the
Oracle — ``unedited`` on the test prompts — first; columns = categories + Score, mean ± std over seeds;
the threshold test is the headline table, the two-class test the second)."""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd
import pyarrow as pa

from t2iedit import protocol as P
from t2iedit.metrics import CATEGORY_ORDER, DISPLAY, ROW_LABELS, TESTS, paper_rows
from t2iedit.prompts import EditRequest

COMPARISON_SCHEMA = pa.schema([
    pa.field("method", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),       # row label of the paper layout ("Oracle (unedited)")
    pa.field("test", pa.string(), nullable=False),        # threshold (headline) | binary
    pa.field("category", pa.string(), nullable=False),    # Efficacy … Specificity, Score
    pa.field("mean", pa.float64(), nullable=False),       # success rate in %, mean over seeds
    pa.field("std", pa.float64(), nullable=False),        # std over seeds (ddof=1; 0 for one seed)
    pa.field("n_seeds", pa.int64(), nullable=False),
])


def requests_from_edits(edits: pd.DataFrame) -> list[EditRequest]:
    """The edits to apply: rows of kind ``single`` (CAKE composites are evaluation-only), with the
    dataset's entity (if any, and if it occurs in the source) as an EATA character span."""
    out = []
    for row in edits[edits["kind"] == "single"].itertuples(index=False):
        spans: tuple[tuple[int, int], ...] = ()
        entity = getattr(row, "entity", None)
        if isinstance(entity, str) and entity and entity.lower() in row.source.lower():
            start = row.source.lower().index(entity.lower())
            spans = ((start, start + len(entity)),)
        old = getattr(row, "old", None)  # RoAD's Old: ReFACT's contrast text (BASELINES.md)
        out.append(EditRequest(row.edit_id, row.source, row.target, spans,
                               old if isinstance(old, str) and old else None))
    if not out:
        raise ValueError("the edit table has no single edits")
    return out


def prompt_column(oracle_prompts: bool) -> str:
    """The eval-prompt column a method's images are generated from (the oracle row uses the
    dataset's oracle prompts, falling back to the prompt where there is none)."""
    return "oracle_prompt" if oracle_prompts else "prompt"


def comparison_table(results: Mapping[str, Mapping[str, Mapping]]) -> pa.Table:
    """``{method: {test: metrics.summarize(...)}}`` → long table (:data:`COMPARISON_SCHEMA`): the
    headline test first, rows in the paper's order (:func:`t2iedit.metrics.paper_rows`)."""
    rows = []
    for test in TESTS:
        for method in paper_rows(results):
            if test not in results[method]:
                continue
            s = results[method][test]
            n = len(s.get("seeds", [])) or 1
            label = ROW_LABELS.get(method, method)
            for c in CATEGORY_ORDER:
                if c in s["categories"]:
                    e = s["categories"][c]
                    rows.append((method, label, test, DISPLAY[c], e["mean"], e["std"], n))
            rows.append((method, label, test, "Score", s["score"]["mean"], s["score"]["std"], n))
    cols = list(zip(*rows)) if rows else [[]] * len(COMPARISON_SCHEMA)
    return pa.table(dict(zip(COMPARISON_SCHEMA.names, map(list, cols))), schema=COMPARISON_SCHEMA)


def count_work(edits: pd.DataFrame, eval_prompts: pd.DataFrame, s: Mapping[str, Any], default_steps: int,
               generate_batch: int = 8, values_batch: int = 32, compare_batch: int = 8) -> dict[str, Any]:
    """Images and UNet evaluations per stage and method of a params set, without a model.

    ``edits`` / ``eval_prompts``: the prepared tables; ``s``: dotted params.yaml keys → values (the
    ``generate``, ``values``, ``compare`` and ``fid`` keys ``scripts/paper.py settings`` lists);
    ``default_steps``: the preset's sampling steps (SD: 50). Rows: generate per method, the values
    stage (source latents, the optimisation), compare per method (its values — visual-loss methods,
    from the main run's latents when their settings match — and its images, ``shared`` = those the
    main run's ``unedited`` / ``oracle`` images already hold), FID.
    """
    from t2iedit.methods import build_config, get_method

    n_edits = int((edits["kind"] == "single").sum())
    steps = s["generate.num_inference_steps"] or default_steps
    guidance = s["generate.guidance_scale"]
    rows: list[dict[str, Any]] = []

    def gen(stage: str, method: str, items: list, n_new: int | None = None, st: int = steps,
            g: float = guidance, batch: int = generate_batch) -> None:
        n = len(items) if n_new is None else n_new
        rows.append({"stage": stage, "method": method, "images": n, "sample_forwards": P.sample_forwards(n, st, g),
                     "unet_calls": P.unet_calls(n, st, batch), "shared": len(items) - n})

    main_items: set = set()
    for m in s["generate.methods"]:
        items = P.generation_items(eval_prompts, m, s["generate.seeds"],
                                 s.get("generate.reference_images", P.CAKE_REFERENCE_IMAGES))
        gen("generate", m, items)
        if m in ("unedited", "oracle"):
            main_items |= set(items)
    latent_steps = s["values.latent_steps"] or default_steps
    k = s["values.latent_images"]
    batches = [min(values_batch, n_edits - i) for i in range(0, n_edits, values_batch)]
    rows.append({"stage": "values", "method": "source latents", "images": n_edits * k,
                 "sample_forwards": P.sample_forwards(n_edits * k, latent_steps, guidance),
                 "unet_calls": sum(P.unet_calls(b * k, latent_steps, 8) for b in batches), "shared": 0})
    rows.append({"stage": "values", "method": f"ours ({s['values.steps']} Adam steps)", "images": 0,
                 "sample_forwards": P.value_forwards(n_edits, s["values.steps"], True),
                 "unet_calls": P.value_calls(batches, s["values.steps"], True), "shared": 0})
    cs = s["compare.sampling"]
    same_sampling = (cs["num_inference_steps"] in (None, steps) and cs["guidance_scale"] in (None, guidance))
    for name in s["compare.methods"]:
        method = get_method(name)
        config = build_config(method, s["compare.method_params"].get(name))
        values = getattr(config, "values", None)
        if values is not None and values.lambda_visual > 0:
            main_latents = (s["compare.reuse_main"] and config.latent_seed == 0 and config.latent_images == k
                            and (config.latent_steps or default_steps) == latent_steps)
            vb = [min(config.value_batch_size, n_edits - i) for i in range(0, n_edits, config.value_batch_size)]
            new_lat = 0 if main_latents else n_edits * config.latent_images
            rows.append({"stage": "compare/values", "method": name, "images": new_lat,
                         "sample_forwards": P.value_forwards(n_edits, values.steps, True)
                         + P.sample_forwards(new_lat, config.latent_steps or default_steps, guidance),
                         "unet_calls": P.value_calls(vb, values.steps, True), "shared": 0})
        items = P.generation_items(eval_prompts, "oracle" if method.oracle_prompts else "edited", s["compare.seeds"])
        share = name in ("unedited", "oracle") and s["compare.reuse_main"] and same_sampling
        gen("compare/generate", name, items, sum(it not in main_items for it in items) if share else None,
            batch=compare_batch)
    gen("fid", s["fid.method"], [None] * s["fid.n_captions"],
        st=s["fid.sampling"]["num_inference_steps"] or default_steps, g=s["fid.sampling"]["guidance_scale"])
    total = {c: sum(r[c] for r in rows) for c in ("images", "sample_forwards", "unet_calls", "shared")}
    return {"n_edits": n_edits, "n_composite": int((edits["kind"] == "composite").sum()),
            "n_prompts": len(eval_prompts), "rows": rows, "total": total}
