"""Prefect tasks of the image-quality stage (flows/fid.py): FID-5K against COCO val2014 and the CLIP score.

Generation of the caption images reuses ``tasks.evaluate.generate_batch`` / ``merge_index`` (the same
content-addressed image cache and mapped, resumable batches as the generate stage). This module checks
the user-supplied reference inputs — before anything expensive runs — and scores the images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pyarrow as pa
import torch
from prefect import task

from t2iedit import fid as F
from t2iedit.generate import load_image, read_index
from t2iedit.storage import file_sha256, stable_hash, write_json, write_parquet
from tasks.stamps import STAMP_CACHE, run_once

METRICS_JSON, CLIP_SCORES = "metrics.json", "clip_scores.parquet"

CLIP_SCORES_SCHEMA = pa.schema([
    pa.field("case_number", pa.int64(), nullable=False),
    pa.field("coco_id", pa.int64(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),       # the caption's evaluation_seed
    pa.field("image", pa.string(), nullable=False),     # generated PNG, relative to the image root
    pa.field("real_image", pa.string(), nullable=False),  # COCO val2014 file name
    pa.field("clip_cosine", pa.float64(), nullable=False),        # cos(image, caption): the CLIP score's term
    pa.field("clip_score_hessel", pa.float64(), nullable=False),  # max(100 * cos, 0) (Hessel et al.)
])


def reference_images(coco_images: str | os.PathLike | None, coco_ids: Iterable[int]) -> list[Path]:
    """The COCO val2014 files of ``coco_ids`` in order; any problem names params.yaml ``fid.coco_images``."""
    try:
        return F.reference_image_paths(coco_images, coco_ids)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"params.yaml fid.coco_images = {coco_images!r}: {err}") from err


def inception_weights_file(weights: str | os.PathLike | None) -> Path:
    """The FID Inception weight file; a missing one names params.yaml ``fid.inception_weights``."""
    if weights is None or str(weights) == "":
        raise FileNotFoundError(
            f"params.yaml fid.inception_weights is null: FID needs pytorch-fid's {F.FID_WEIGHTS_FILE} "
            "(release 'fid_weights' of mseitzer/pytorch-fid); download it and set the key to its path")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"params.yaml fid.inception_weights = {str(weights)!r}: {path} is not a file "
            f"(expected pytorch-fid's {F.FID_WEIGHTS_FILE})")
    return path


def references_sha256(paths: Sequence[Path]) -> str:
    """Content hash of the reference images actually used (not of the whole val2014 folder)."""
    return stable_hash({p.name: file_sha256(p) for p in paths})


@torch.no_grad()
def caption_cosines(encoder, image_paths: Sequence[Path], captions: Sequence[str],
                    batch_size: int) -> torch.Tensor:
    """cos(image, caption) per caption (n,) float64, loading images one batch at a time (5,000 decoded
    512² images would not fit comfortably in memory). Same embedding as ``t2iedit.fid.clip_score``."""
    cos = []
    for i in range(0, len(image_paths), batch_size):
        images = [load_image(p.parent, p.name) for p in image_paths[i:i + batch_size]]
        img = encoder.encode_images(images)                         # (b, d)
        txt = encoder.encode_texts(list(captions[i:i + batch_size]))  # (b, d)
        cos.append((img * txt).sum(-1).double())
    return torch.cat(cos)


@task(cache_policy=STAMP_CACHE)
def score_fid(out: Path, fingerprint: str, coco_csv: Path, n_captions: int, index: Path,
              image_root: Path, coco_images: str | None, inception_weights: str | None,
              clip_source: str, clip_revision: str | None, image_size: int, batch_size: int,
              extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
              clip_encoder=None) -> Path:
    """``out`` (metrics.json: fid, clip_score = the plain mean cosine with its unit and judge,
    clip_score_hessel, counts) and, beside it, clip_scores.parquet (one row per caption,
    :data:`CLIP_SCORES_SCHEMA`).

    Each caption's generated image is found in the generation ``index`` by (prompt, evaluation_seed),
    its real image by ``coco_id``. ``extractor`` (tests) replaces the FID InceptionV3 loaded from
    ``inception_weights``; ``clip_encoder`` replaces the CLIP model loaded from ``clip_source``.
    """
    scores = Path(out).with_name(CLIP_SCORES)

    def produce(path: Path) -> None:
        caps = F.fid_captions(coco_csv, n_captions)
        real = reference_images(coco_images, caps["coco_id"])
        net = extractor or F.load_fid_inception(inception_weights_file(inception_weights))
        generated = read_index(index).to_pandas().set_index(["prompt", "seed"])["path"]
        rel = []
        for prompt, seed in zip(caps["prompt"], caps["evaluation_seed"]):
            if (prompt, int(seed)) not in generated.index:
                raise KeyError(f"no generated image for caption {prompt!r} (seed {seed}) in {index}")
            rel.append(str(generated.loc[(prompt, int(seed))]))
        fake = [image_root / r for r in rel]

        real_f = F.extract_features(net, real, image_size, batch_size)   # (n, 2048)
        fake_f = F.extract_features(net, fake, image_size, batch_size)   # (n, 2048)
        fid = F.fid_from_features(real_f, fake_f)

        if clip_encoder is None:
            from t2iedit.clip_eval import ClipEncoder

            encoder = ClipEncoder.from_pretrained(clip_source, clip_revision)
        else:
            encoder = clip_encoder
        cos = caption_cosines(encoder, fake, list(caps["prompt"]), batch_size)  # (n,)
        hessel = (100.0 * cos).clamp_min(0)  # Hessel et al. 2021, as t2iedit.fid.clip_score
        write_parquet(scores, pa.table({
            "case_number": caps["case_number"].astype("int64"), "coco_id": caps["coco_id"].astype("int64"),
            "prompt": caps["prompt"], "seed": caps["evaluation_seed"].astype("int64"), "image": rel,
            "real_image": [p.name for p in real], "clip_cosine": cos.numpy(),
            "clip_score_hessel": hessel.numpy(),
        }, schema=CLIP_SCORES_SCHEMA), CLIP_SCORES_SCHEMA)
        # the paper's CLIP score is the plain mean cosine (t2iedit.fid.clip_score, METHOD.md §8)
        write_json(path, {"fid": round(fid, 4), "clip_score": round(float(cos.mean()), 6),
                          "clip_score_unit": F.CLIP_SCORE_UNIT,
                          "clip_judge": getattr(encoder, "name", clip_source),
                          "clip_score_hessel": round(float(hessel.mean()), 4), "n_captions": len(caps),
                          "n_real": len(real), "feature_dim": int(real_f.shape[1])})

    return run_once(out, fingerprint, produce, also=[scores])
