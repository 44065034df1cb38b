"""CLIP image/text encoders for evaluation, loaded through transformers' ``CLIPModel``.

The paper's classifier is open_clip's ViT-bigG-14 (laion2b_s39b_b160k); its transformers port on the
hub is ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`` (:data:`DEFAULT_CLASSIFIER`). The CLIP score of
the image-quality table is a plain mean cosine of a ViT-bigG-class judge (the paper's 0.465; ViT-L/14
cosines on SD-1.4 COCO images are ~0.26–0.31, METHOD.md §8), so :data:`DEFAULT_CLIP_SCORE_MODEL` is
the same bigG port.

Preprocessing is done here, not by ``CLIPProcessor`` (whose default backend needs torchvision): the
open_clip / OpenAI recipe — resize the shorter side to the model's input size with bicubic
resampling, center-crop, scale to [0, 1], normalise with OpenAI's mean/std (which both models use).
Features are L2-normalised, so ``a @ b.T`` is the cosine similarity.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

logger = logging.getLogger(__name__)

DEFAULT_CLASSIFIER = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
DEFAULT_CLIP_SCORE_MODEL = DEFAULT_CLASSIFIER
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_images(images: Sequence[Image.Image], size: int,
                      mean: Sequence[float] = OPENAI_MEAN,
                      std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """PIL images → normalised pixel tensor (n, 3, size, size)."""
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out.append(np.asarray(im, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)  # (n, 3, size, size)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


class ClipEncoder:
    """A ``CLIPModel`` with its tokenizer: normalised image and text embeddings (float32, CPU)."""

    def __init__(self, model, tokenizer, image_size: int | None = None,
                 mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD,
                 name: str = "clip"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = image_size or model.config.vision_config.image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.name = name

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, revision: str | None = None,
                        torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        tokenizer_source: str | os.PathLike | None = None) -> "ClipEncoder":
        """Load a CLIP model from a hub id (pinned ``revision``) or a local folder."""

        from t2iedit.models import _hub_kwargs

        kw = _hub_kwargs(source, revision)
        model = CLIPModel.from_pretrained(str(source), dtype=torch_dtype, **kw).to(device)
        tok_src = tokenizer_source or source
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_src), **_hub_kwargs(tok_src, revision))
        return cls(model, tokenizer, name=str(source))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """(n, d) L2-normalised image embeddings."""
        feats = []
        for i in range(0, len(images), batch_size):
            pixels = preprocess_images(images[i:i + batch_size], self.image_size, self.mean, self.std)
            pixels = pixels.to(self.device, dtype=self.model.dtype)
            emb = _pooled(self.model.get_image_features(pixel_values=pixels))
            feats.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(feats) if feats else torch.empty(0, self.model.config.projection_dim)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(n, d) L2-normalised text embeddings (texts are used as given; lower-case them first
        where the protocol says so)."""
        feats = []
        max_len = self.model.config.text_config.max_position_embeddings
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(list(texts[i:i + batch_size]), padding="max_length",
                                 max_length=max_len, truncation=True, return_tensors="pt")
            emb = _pooled(self.model.get_text_features(
                input_ids=tok.input_ids.to(self.device),
                attention_mask=tok.attention_mask.to(self.device)))
            feats.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(feats) if feats else torch.empty(0, self.model.config.projection_dim)


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def build_tiny_clip(folder: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny randomly initialised ``CLIPModel`` (real 49,408-token vocabulary, vendored tokenizer)
    saved with ``save_pretrained`` — the classifier of the tiny preset and of tests."""

    from t2iedit.models import load_tokenizer

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    logger.info("built tiny CLIP (seed %d) in %s", seed, folder)
    return folder
