"""What an evaluation protocol generates, counted without loading a model (METHOD.md §8).

One place answers "which (text, seed) pairs does method X generate?" — the generate stage builds its
work list with :func:`generation_items`, and the dry runs (``scripts/paper.sh --dry-run``,
``python -m flows.plan``) count images and UNet evaluations with the same function
(:func:`count_work`: per stage and method, for a params set), so a count cannot drift from what the
pipeline does.

Generation methods of the main pipeline (``generate.methods``):

- ``edited`` / ``unedited``: the evaluation prompts (``prompt``), with / without the edit;
- ``oracle``: the unedited model on each prompt's oracle prompt (``oracle_prompt``, else ``prompt``);
- ``reference``: the unedited model on each prompt's evaluation text (``eval_text``; prompts without
  one have no threshold) at seeds ``0..n−1`` — CAKE's threshold images (Hengrui-Gu/T2IKnowledgeEditing
  init_Bootstrap_evaluation.py:164-169: ``test_eval`` generated for ``seed in range(num_seeds)``,
  ``num_seeds`` = ``--evaluation_seeds`` = 50, arguments.py:16), independent of the evaluation seeds.

UNet evaluations: a diffusers ``StableDiffusionPipeline`` call runs the UNet once per scheduler step
on the whole batch, doubled in the batch dimension under classifier-free guidance
(``guidance_scale > 1``). ``sample_forwards`` counts per-image UNet forwards (images × steps × 2);
``unet_calls`` counts the batched calls (⌈images / batch⌉ × steps).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

PROMPT_COLUMN = {"edited": "prompt", "unedited": "prompt", "oracle": "oracle_prompt",
                 "reference": "eval_text"}
GENERATE_METHODS = tuple(PROMPT_COLUMN)
CAKE_REFERENCE_IMAGES = 50  # images per evaluation text (arguments.py:16 --evaluation_seeds)


def method_texts(eval_prompts: pd.DataFrame, method: str) -> list[str]:
    """The texts a generation method feeds to the model, one per evaluation prompt (in order;
    ``reference`` skips prompts without an evaluation text)."""
    if method not in PROMPT_COLUMN:
        raise ValueError(f"unknown generation method {method!r}; choose from {list(PROMPT_COLUMN)}")
    col = PROMPT_COLUMN[method]
    if method == "reference":
        return eval_prompts[col].dropna().tolist()
    if col == "prompt":
        return eval_prompts["prompt"].tolist()
    return eval_prompts[col].fillna(eval_prompts["prompt"]).tolist()


def method_seeds(method: str, seeds: Sequence[int], reference_images: int) -> list[int]:
    """Seeds of a method's images: the evaluation seeds, or ``0..reference_images−1`` (CAKE) for the
    threshold reference."""
    return list(range(reference_images)) if method == "reference" else [int(s) for s in seeds]


def generation_items(eval_prompts: pd.DataFrame, method: str, seeds: Sequence[int],
                     reference_images: int = 0) -> list[tuple[str, int]]:
    """The distinct (text, seed) pairs a method generates, in order (an image is keyed by its text
    and seed, so duplicate texts are generated once)."""
    texts = method_texts(eval_prompts, method)
    return list(dict.fromkeys((t, s) for t in texts for s in method_seeds(method, seeds, reference_images)))


def cfg_factor(guidance_scale: float) -> int:
    """2 under classifier-free guidance (diffusers: ``guidance_scale > 1``), else 1."""
    return 2 if guidance_scale > 1.0 else 1


def sample_forwards(n_images: int, steps: int, guidance_scale: float) -> int:
    """Per-image UNet forwards of generating ``n_images`` images."""
    return n_images * steps * cfg_factor(guidance_scale)


def unet_calls(n_images: int, steps: int, batch_size: int) -> int:
    """Batched UNet calls of generating ``n_images`` images ``batch_size`` prompts at a time."""
    return math.ceil(n_images / batch_size) * steps if n_images else 0


def value_forwards(n_edits: int, steps: int, visual: bool) -> int:
    """Per-sample UNet forwards of the target-value optimisation (t2iedit.values): with the visual
    loss, every evaluation of the loss (the initial one, each Adam step, the final one) runs the UNet
    on the edited source and on the frozen target, once per edit; text-only: none."""
    return (steps + 2) * 2 * n_edits if visual else 0


def value_calls(batches: Iterable[int], steps: int, visual: bool) -> int:
    """Batched UNet calls of the value optimisation, ``batches`` = edits per optimised batch."""
    return sum((steps + 2) * 2 for b in batches if b) if visual else 0


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
        rows.append({"stage": stage, "method": method, "images": n, "sample_forwards": sample_forwards(n, st, g),
                     "unet_calls": unet_calls(n, st, batch), "shared": len(items) - n})

    main_items: set = set()
    for m in s["generate.methods"]:
        items = generation_items(eval_prompts, m, s["generate.seeds"],
                                 s.get("generate.reference_images", CAKE_REFERENCE_IMAGES))
        gen("generate", m, items)
        if m in ("unedited", "oracle"):
            main_items |= set(items)
    latent_steps = s["values.latent_steps"] or default_steps
    k = s["values.latent_images"]
    batches = [min(values_batch, n_edits - i) for i in range(0, n_edits, values_batch)]
    rows.append({"stage": "values", "method": "source latents", "images": n_edits * k,
                 "sample_forwards": sample_forwards(n_edits * k, latent_steps, guidance),
                 "unet_calls": sum(unet_calls(b * k, latent_steps, 8) for b in batches), "shared": 0})
    rows.append({"stage": "values", "method": f"ours ({s['values.steps']} Adam steps)", "images": 0,
                 "sample_forwards": value_forwards(n_edits, s["values.steps"], True),
                 "unet_calls": value_calls(batches, s["values.steps"], True), "shared": 0})
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
                         "sample_forwards": value_forwards(n_edits, values.steps, True)
                         + sample_forwards(new_lat, config.latent_steps or default_steps, guidance),
                         "unet_calls": value_calls(vb, values.steps, True), "shared": 0})
        items = generation_items(eval_prompts, "oracle" if method.oracle_prompts else "edited", s["compare.seeds"])
        share = name in ("unedited", "oracle") and s["compare.reuse_main"] and same_sampling
        gen("compare/generate", name, items, sum(it not in main_items for it in items) if share else None,
            batch=compare_batch)
    gen("fid", s["fid.method"], [None] * s["fid.n_captions"],
        st=s["fid.sampling"]["num_inference_steps"] or default_steps, g=s["fid.sampling"]["guidance_scale"])
    total = {c: sum(r[c] for r in rows) for c in ("images", "sample_forwards", "unet_calls", "shared")}
    return {"n_edits": n_edits, "n_composite": int((edits["kind"] == "composite").sum()),
            "n_prompts": len(eval_prompts), "rows": rows, "total": total}
