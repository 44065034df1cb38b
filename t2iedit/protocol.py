"""What an evaluation protocol generates, counted without loading a model (METHOD.md §8).

One place answers "which (text, seed) pairs does method X generate?" — the generate stage builds its
work list with :func:`generation_items`, and the dry runs (``scripts/paper.sh --dry-run``,
``python -m flows.plan``) count images and UNet evaluations with the same function
(per stage and method for a params set: ``t2iedit.methods.compare.count_work``), so a count cannot
drift from what the pipeline does.

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

Work done once (issue 16 item 3): an image is keyed by (model identity — the weights, the applied
edit and the dtype —, text, seed, sampling, size), so every distinct key is generated once and each
method's index points at the shared file. :data:`MODEL_IDENTITY` says which generate methods are the
same model (``unedited``, ``oracle`` and ``reference`` are all the unedited model: an oracle prompt equal
to its prompt, or an evaluation text equal to a prompt at the same seed, is the unedited image);
:class:`Ledger` counts what a run really generates, in the order the stages run.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

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


MODEL_IDENTITY = {"edited": "edited", "unedited": "unedited", "oracle": "unedited", "reference": "unedited"}


class Ledger:
    """The images a run already holds, per image folder: ``(identity, sampling, text, seed)`` keys.

    :meth:`new` returns the items of a request that are not yet in ``root`` (nor in the folders in
    ``also``, which the stage links from: compare's ``reuse_main``) and records them as generated —
    the content-addressed image cache (``t2iedit.generate``) generates exactly these."""

    def __init__(self) -> None:
        self.done: dict[str, set] = {}

    def new(self, root: str, identity: str, sampling: tuple, items: Iterable[tuple[str, int]],
            also: Sequence[str] = ()) -> list[tuple[str, int]]:
        have = self.done.setdefault(root, set())
        seen = [self.done.get(r, set()) for r in also]
        out = []
        for text, seed in dict.fromkeys(items):
            key = (identity, sampling, text, int(seed))
            if key not in have and not any(key in s for s in seen):
                out.append((text, seed))
            have.add(key)
        return out


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

