"""Image generation for evaluation: one PNG per (prompt, seed), content-addressed and never redone.

Protocol (METHOD.md §8): the pipeline's own defaults for SD 1.4 — PNDM, 50 steps, guidance 7.5,
512×512 — the safety checker off, and an explicit ``torch.Generator`` per (prompt, seed). The initial
latents of every image are drawn from its own CPU generator seeded with ``seed`` and handed to the
pipeline, so an image does not depend on which batch (or device) it was generated in. As in the CAKE
and EMCID evaluation code, the generator is seeded with the seed itself (the same noise for every
prompt at one seed; COCO captions bring their own ``evaluation_seed``).

Layout under ``image_root``::

    <model_hash[:16]>/<image_key>.png     image_key = hash(prompt, seed, sampling settings)

``model_hash`` identifies the weights that produced an image (base model id + revision or folder
hash, plus the hash of the applied edit); it is computed by the caller (see :func:`model_hash`).
The index (Parquet, :data:`INDEX_SCHEMA`) lists prompt, seed, model hash and the path relative to
``image_root``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from tqdm.auto import tqdm

from t2iedit.storage import atomic_path, read_parquet, stable_hash, write_parquet

logger = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema([
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("model_hash", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),  # relative to the image root
])


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings that change the pixels (part of every image key). SD 1.4 defaults."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if self.height % 8 or self.width % 8:
            raise ValueError(f"height/width must be multiples of 8, got {self.height}x{self.width}")


def model_hash(base: str, revision: str | None = None, edit_hash: str | None = None,
               dtype: str = "float32") -> str:
    """Identity of the weights that generate images: base model (hub id + revision, or the content
    hash of a local folder — the caller decides), the applied edit's content hash, if any, and the
    dtype the UNet/VAE/text encoder ran in (float32 adds nothing: keys of float32 images are unchanged)."""
    extra = {} if dtype == "float32" else {"dtype": dtype}
    return stable_hash({"base": base, "revision": revision, "edit": edit_hash, **extra})


def image_key(prompt: str, seed: int, config: SamplingConfig) -> str:
    return stable_hash({"prompt": prompt, "seed": int(seed), **asdict(config)})[:32]


def image_relpath(prompt: str, seed: int, model_hash_: str, config: SamplingConfig) -> str:
    return f"{model_hash_[:16]}/{image_key(prompt, seed, config)}.png"


def initial_latents(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Initial noise of one image, drawn on the CPU from a generator seeded with ``seed`` (so it is
    the same whatever the batch or device). ``shape`` excludes the batch dimension: (C, h, w)."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32)


class PromptEmbeddings:
    """The text-encoder outputs the pipeline would compute itself (``encode_prompt``: padded to the
    tokenizer's length, no clip skip), each computed once per :func:`generate_images` call: a prompt's
    embedding is the same at every seed, and the unconditional ("") one is the same for every image, but
    diffusers re-encodes both in every call (a third of the tiny default's generation time). At most
    ``max_prompts`` are kept (then the cache starts over)."""

    def __init__(self, pipe, guidance: bool, max_prompts: int = 2048):
        self.pipe, self.guidance, self.max_prompts = pipe, guidance, max_prompts
        self.cache: dict[str, torch.Tensor] = {}
        self.uncond: torch.Tensor | None = None

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        return self.pipe.encode_prompt(prompts, self.pipe.unet.device, 1, False)[0]

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            if len(self.cache) + len(missing) > self.max_prompts:
                self.cache.clear()
                missing = list(dict.fromkeys(prompts))
            self.cache.update(zip(missing, self._encode(missing)))
        cond = torch.stack([self.cache[p] for p in prompts])
        if not self.guidance:
            return cond, None
        if self.uncond is None:
            self.uncond = self._encode([""])  # what encode_prompt pads "" to for the unconditional branch
        return cond, self.uncond.expand(len(prompts), *self.uncond.shape[1:])


def _to_uint8(images: np.ndarray) -> np.ndarray:
    # diffusers' numpy_to_pil rounding, so files match what the pipeline would return as PIL.
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


@torch.no_grad()
def generate_images(
    pipe,
    items: Iterable[tuple[str, int]],
    image_root: str | os.PathLike,
    model_hash_: str,
    config: SamplingConfig = SamplingConfig(),
    batch_size: int = 8,
    progress: bool = True,
) -> pa.Table:
    """Generate the missing images of ``items`` ((prompt, seed) pairs) with ``pipe`` and return the
    index rows of all of them (existing and new), in the order given, duplicates removed.

    Images already on disk are never generated again; each PNG is written atomically right after
    its batch, so an interrupted run resumes where it stopped. ``pipe`` is a diffusers
    ``StableDiffusionPipeline`` on the caller's device (its weights must be the ones ``model_hash_``
    names — this function cannot check that).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    image_root = Path(image_root)
    unique: dict[tuple[str, int], str] = {}
    for prompt, seed in items:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        unique.setdefault((prompt, int(seed)), image_relpath(prompt, int(seed), model_hash_, config))
    todo = [(p, s, rel) for (p, s), rel in unique.items() if not (image_root / rel).exists()]
    logger.info("%d images requested, %d to generate (%s)", len(unique), len(todo), model_hash_[:16])

    if todo:
        latent_shape = (pipe.unet.config.in_channels, config.height // pipe.vae_scale_factor,
                        config.width // pipe.vae_scale_factor)
        device, dtype = pipe.unet.device, pipe.unet.dtype
        embeds = PromptEmbeddings(pipe, config.guidance_scale > 1.0)
        bar = tqdm(total=len(todo), unit="img", disable=not progress, desc="generate")
        start = time.perf_counter()
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            latents = torch.cat([initial_latents(s, latent_shape) for _, s, _ in batch])
            cond, uncond = embeds([p for p, _, _ in batch])
            out = pipe(
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                latents=latents.to(device=device, dtype=dtype),
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
                height=config.height,
                width=config.width,
                output_type="np",
            )
            for (_, _, rel), pixels in zip(batch, _to_uint8(out.images)):
                with atomic_path(image_root / rel) as tmp:
                    Image.fromarray(pixels).save(tmp, format="PNG")
            bar.update(len(batch))
            rate = (i + len(batch)) / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(img_s=f"{rate:.2f}")
        bar.close()
        logger.info("generated %d images at %.2f images/s", len(todo),
                    len(todo) / max(time.perf_counter() - start, 1e-9))

    return pa.table({
        "prompt": [p for p, _ in unique],
        "seed": [s for _, s in unique],
        "model_hash": [model_hash_] * len(unique),
        "path": list(unique.values()),
    }, schema=INDEX_SCHEMA)


def write_index(path: str | os.PathLike, tables: Sequence[pa.Table]) -> Path:
    """Concatenate index tables (e.g. one per batch task), drop duplicate rows, write Parquet."""
    table = pa.concat_tables([t.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA) for t in tables])
    df = table.to_pandas().drop_duplicates(ignore_index=True)
    return write_parquet(path, pa.Table.from_pandas(df, schema=INDEX_SCHEMA, preserve_index=False))


def read_index(path: str | os.PathLike) -> pa.Table:
    return read_parquet(path, INDEX_SCHEMA)


def load_image(image_root: str | os.PathLike, relpath: str) -> Image.Image:
    path = Path(image_root) / relpath
    if not path.exists():
        raise FileNotFoundError(f"image {path} listed in the index is missing")
    with Image.open(path) as im:
        return im.convert("RGB")
