"""The comparison of methods: edit requests from the dataset table, which prompts each method is
evaluated on, and the results table in the layout of the paper's Tables 2/3 (rows = methods, the
Oracle — ``unedited`` on the test prompts — first; columns = categories + Score, mean ± std over seeds;
the threshold test is the headline table, the two-class test the second)."""

from __future__ import annotations

import dataclasses
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


def resolved_ours(config: Any, preset: str) -> Any:
    """An ``OursConfig`` with every default that depends on the preset filled in and what cannot
    change a number normalised (``values.log_every``; the latent settings without the visual loss)."""
    from t2iedit.models import get_preset

    pre = get_preset(preset)
    visual = config.values.lambda_visual > 0
    return dataclasses.replace(
        config, values=dataclasses.replace(config.values, log_every=0),
        layers=tuple(config.layers) if config.layers is not None else tuple(pre.edit_layers),
        value_layer=config.value_layer if config.value_layer is not None else pre.value_layer,
        latent_images=config.latent_images if visual else 0, latent_seed=config.latent_seed if visual else 0,
        latent_steps=(config.latent_steps or pre.num_inference_steps) if visual else None)


def main_run_config(values: Mapping[str, Any], edit: Mapping[str, Any], preset: str) -> Any:
    """The ``OursConfig`` that computes what the main run's ``values`` and ``edit`` stages compute
    (params.yaml ``values`` / ``edit``, resolved as those stages resolve them: ``pooling`` null = the
    preset's, ``layers`` sorted, the source latents at ``values.seed``), or None where there is no such
    config (the edit's key templates differ from the values' templates; ``compute_ours`` uses one list).

    Tested: with this config ``compute_ours`` gives the main run's ΔW bit for bit
    (tests/test_work_sharing.py), so a comparison may take the main run's edit and images for it."""
    from t2iedit.methods.ours import OursConfig
    from t2iedit.models import get_preset
    from t2iedit.values import weighted_config

    if list(edit["templates"]) != list(values["templates"]):
        return None
    pre = get_preset(preset)
    vc = weighted_config(values["weighting"], lam=values["lambda_visual"], alpha=values["alpha"],
                         steps=values["steps"], lr=values["lr"], clamp_factor=values["clamp"],
                         weight_decay=values["weight_decay"], templates=tuple(values["templates"]),
                         pooling=values["pooling"] or pre.pooling, seed=values["seed"])
    layers = edit["layers"] if edit["layers"] is not None else pre.edit_layers
    return resolved_ours(OursConfig(
        values=vc, layers=tuple(sorted(layers)), value_layer=edit["value_layer"], use_projector=True,
        beta=float(edit["beta"]), value_batch_size=int(values["batch_size"]),
        latent_images=int(values["latent_images"]), latent_seed=int(values["seed"]),
        latent_steps=values["latent_steps"], entity_keys=edit["entity_keys"],
        entity_keys_form=edit["entity_keys_form"]), preset)


def shares_main_edit(method: Any, config: Any, main_config: Any, preset: str) -> bool:
    """Whether a compared method computes exactly the main run's edit: one of the ``ours`` family
    whose resolved config equals :func:`main_run_config` (checked, never assumed)."""
    from t2iedit.methods.ours import OursConfig, compute_ours

    fn = getattr(method.fn, "func", method.fn)
    return (main_config is not None and fn is compute_ours and isinstance(config, OursConfig)
            and resolved_ours(config, preset) == main_config)


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
               generate_batch: int = 8, values_batch: int = 32, compare_batch: int = 8,
               main_config: Any = None, preset: str = "sd-v1-4") -> dict[str, Any]:
    """Images and UNet evaluations per stage and method of a params set, without a model: what the
    stages generate (:class:`t2iedit.protocol.Ledger`), each distinct image once.

    ``edits`` / ``eval_prompts``: the prepared tables; ``s``: dotted params.yaml keys → values (the
    ``generate``, ``values``, ``compare`` and ``fid`` keys ``scripts/paper.py settings`` lists);
    ``default_steps``: the preset's sampling steps (SD: 50); ``main_config``: :func:`main_run_config` of
    the main run's values/edit params (None: no compared method is the main run's edit). Rows: generate
    per method (``shared``: images an earlier method of the same model already generated — an oracle
    prompt equal to the prompt), the values stage (source latents, the optimisation), compare per method
    (its values — visual-loss methods, from the main run's latents when their settings match; none for
    a method that is the main run's edit — and its images, ``shared`` = those the main run's images or
    an earlier compared method of the same model already hold), FID.
    """
    from t2iedit.methods import build_config, get_method

    n_edits = int((edits["kind"] == "single").sum())
    steps = s["generate.num_inference_steps"] or default_steps
    guidance = s["generate.guidance_scale"]
    rows: list[dict[str, Any]] = []
    ledger = P.Ledger()

    def gen(stage: str, method: str, items: list, n_new: int | None = None, st: int = steps,
            g: float = guidance, batch: int = generate_batch) -> None:
        n = len(items) if n_new is None else n_new
        rows.append({"stage": stage, "method": method, "images": n, "sample_forwards": P.sample_forwards(n, st, g),
                     "unet_calls": P.unet_calls(n, st, batch), "shared": len(items) - n})

    for m in s["generate.methods"]:
        items = P.generation_items(eval_prompts, m, s["generate.seeds"],
                                   s.get("generate.reference_images", P.CAKE_REFERENCE_IMAGES))
        gen("generate", m, items, len(ledger.new("main", P.MODEL_IDENTITY[m], (steps, guidance), items)))
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
    csamp = (cs["num_inference_steps"] or default_steps, cs["guidance_scale"] or guidance)
    reuse = s["compare.reuse_main"]
    for name in s["compare.methods"]:
        method = get_method(name)
        config = build_config(method, s["compare.method_params"].get(name))
        values = getattr(config, "values", None)
        main_edit = reuse and shares_main_edit(method, config, main_config, preset)
        if values is not None and values.lambda_visual > 0 and not main_edit:
            main_latents = (reuse and config.latent_seed == 0 and config.latent_images == k
                            and (config.latent_steps or default_steps) == latent_steps)
            vb = [min(config.value_batch_size, n_edits - i) for i in range(0, n_edits, config.value_batch_size)]
            new_lat = 0 if main_latents else n_edits * config.latent_images
            rows.append({"stage": "compare/values", "method": name, "images": new_lat,
                         "sample_forwards": P.value_forwards(n_edits, values.steps, True)
                         + P.sample_forwards(new_lat, config.latent_steps or default_steps, guidance),
                         "unet_calls": P.value_calls(vb, values.steps, True), "shared": 0})
        items = P.generation_items(eval_prompts, "oracle" if method.oracle_prompts else "edited", s["compare.seeds"])
        identity = ("edited" if main_edit else "unedited" if name in ("unedited", "oracle") else f"compare:{name}")
        new = ledger.new("compare", identity, csamp, items, also=("main",) if reuse else ())
        gen("compare/generate", name, items, len(new), batch=compare_batch)
    gen("fid", s["fid.method"], [None] * s["fid.n_captions"],
        st=s["fid.sampling"]["num_inference_steps"] or default_steps, g=s["fid.sampling"]["guidance_scale"])
    total = {c: sum(r[c] for r in rows) for c in ("images", "sample_forwards", "unet_calls", "shared")}
    return {"n_edits": n_edits, "n_composite": int((edits["kind"] == "composite").sum()),
            "n_prompts": len(eval_prompts), "rows": rows, "total": total}
