"""Image quality: FID-5K on COCO val2014 and the CLIP score (METHOD.md §8; a plain mean cosine).

FID features come from the FID variant of InceptionV3 (the TensorFlow 2015-12-05 graph, pool3,
2048-d). Every maintained PyTorch port (pytorch-fid, torch-fidelity, clean-fid) depends on
torchvision, which this project cannot install (it would pull another torch), so the network is
defined here, layer for layer as pytorch-fid defines it (torchvision's Inception3 with pytorch-fid's
FIDInceptionA/C/E_1/E_2 blocks), and it loads pytorch-fid's weight file
``pt_inception-2015-12-05-6726825d.pth`` (release ``fid_weights`` of mseitzer/pytorch-fid) from a path
the user gives — nothing is downloaded. Inputs are RGB in [0, 1]; like pytorch-fid the network
resizes them to 299×299 (bilinear) and scales them to [-1, 1].

Reference images: COCO val2014 files ``COCO_val2014_{coco_id:012d}.jpg`` in a user folder. Real and
generated images are center-cropped to a square and resized (bicubic) to ``image_size`` (the
generation resolution) before the network, so both sets go through the same resampling.

The Fréchet distance is computed in float64 with ``scipy.linalg.sqrtm``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch import nn

logger = logging.getLogger(__name__)

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
COCO_FILE_TEMPLATE = "COCO_val2014_{:012d}.jpg"
FID_SUBSET_SIZE = 5000


# --- COCO captions and reference images ----------------------------------------------------------

def fid_captions(coco_csv: str | os.PathLike, n: int = FID_SUBSET_SIZE) -> pd.DataFrame:
    """The fixed FID subset: the first ``n`` rows of ``coco_30k.csv`` (file order), with columns
    ``case_number, prompt, evaluation_seed, coco_id``."""
    df = pd.read_csv(coco_csv)
    need = {"case_number", "prompt", "evaluation_seed", "coco_id"}
    if not need <= set(df.columns):
        raise ValueError(f"{coco_csv}: expected columns {sorted(need)}, got {list(df.columns)}")
    if len(df) < n:
        raise ValueError(f"{coco_csv} has {len(df)} captions, fewer than the {n} requested")
    df = df.iloc[:n][["case_number", "prompt", "evaluation_seed", "coco_id"]].copy()
    df["prompt"] = df["prompt"].astype(str).str.strip()
    return df.reset_index(drop=True)


def reference_image_paths(folder: str | os.PathLike | None, coco_ids: Iterable[int]) -> list[Path]:
    """Paths of the real COCO val2014 images; a missing folder or any missing file is an error that
    names what is missing (FID is never silently skipped)."""
    if folder is None or str(folder) == "":
        raise FileNotFoundError(
            "FID needs the real COCO val2014 images: set the folder holding "
            "COCO_val2014_<id>.jpg files (e.g. params.yaml fid.coco_images)")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"COCO val2014 image folder {folder} does not exist")
    paths = [folder / COCO_FILE_TEMPLATE.format(int(i)) for i in coco_ids]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} COCO val2014 images are missing from {folder}, "
            f"e.g. {missing[:5]}")
    return paths


def load_square(path_or_image: str | os.PathLike | Image.Image, size: int) -> Image.Image:
    """Center-crop to a square and resize to ``size`` (bicubic), RGB."""
    if isinstance(path_or_image, Image.Image):
        im = path_or_image.convert("RGB")
    else:
        with Image.open(path_or_image) as f:
            im = f.convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im if s == size else im.resize((size, size), Image.BICUBIC)


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size → (n, 3, H, W) float in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# --- Fréchet distance ----------------------------------------------------------------------------

def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) (ddof=1, as pytorch-fid) in float64."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features,
                   dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (n >= 2, d) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) in float64 (Heusel et al. 2017).

    If the product is singular, ``eps·I`` is added to both covariances (as pytorch-fid does); a
    numerically complex square root with a non-negligible imaginary part is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        logger.warning("singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


@torch.no_grad()
def extract_features(extractor: Callable[[torch.Tensor], torch.Tensor],
                     images: Iterable[str | os.PathLike | Image.Image], image_size: int,
                     batch_size: int = 50, device: str | torch.device = "cpu") -> np.ndarray:
    """Features (n, d) float64 of images (paths or PIL), each center-cropped and resized to
    ``image_size`` then passed as [0, 1] RGB batches to ``extractor``."""
    feats, batch = [], []

    def flush():
        x = to_tensor([load_square(b, image_size) for b in batch]).to(device)
        feats.append(extractor(x).double().cpu().numpy())
        batch.clear()

    for item in images:
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not feats:
        raise ValueError("no images")
    return np.concatenate(feats)


# --- CLIP score ----------------------------------------------------------------------------------

CLIP_SCORE_UNIT = "mean cosine similarity (not 100·cos)"


def clip_score(encoder, images: Sequence[Image.Image], captions: Sequence[str],
               batch_size: int = 32) -> dict[str, float]:
    """The paper's CLIP score: the plain mean over captions of ``cos(image, caption)``
    (:data:`CLIP_SCORE_UNIT`; the paper's 0.465 is such a mean cosine of a ViT-bigG-class judge,
    METHOD.md §8). Also Hessel et al.'s ``max(100 · cos, 0)`` mean as ``clip_score_hessel`` (the
    torchmetrics convention; not what the paper reports). ``encoder`` is a
    :class:`t2iedit.clip_eval.ClipEncoder`."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    cos = []
    for i in range(0, len(images), batch_size):
        img = encoder.encode_images(list(images[i:i + batch_size]))
        txt = encoder.encode_texts(list(captions[i:i + batch_size]))
        cos.append((img * txt).sum(-1).double())
    c = torch.cat(cos)
    return {"clip_score": float(c.mean()), "clip_score_hessel": float((100.0 * c).clamp_min(0).mean()),
            "n": int(c.numel())}


# --- InceptionV3 for FID (architecture of torchvision's Inception3 + pytorch-fid's blocks) --------

class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool(x):
    # The TF graph's average pools exclude the padding (pytorch-fid's FIDInception* blocks).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool=False``: FIDInceptionE_1 (avg pool without padding); ``True``: FIDInceptionE_2
    (the TF graph's last block uses a max pool — a bug in the original that FID keeps)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                else _avg_pool(x))
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 returning pool3 features (n, 2048); parameter names match pytorch-fid's weight
    file (torchvision's Inception3 names, 1008-way ``fc`` kept so the file loads strictly)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused for FID; present in the weight file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, 3, H, W) RGB in [0, 1] → (n, 2048)."""
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_fid_inception(weights: str | os.PathLike) -> FIDInceptionV3:
    """The FID InceptionV3 with pytorch-fid's weights loaded strictly from ``weights`` (the file
    ``pt_inception-2015-12-05-6726825d.pth``); eval mode."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"FID Inception weights {weights} not found: download pytorch-fid's "
            f"{FID_WEIGHTS_FILE} (release 'fid_weights') and point params.yaml fid.inception_weights "
            f"at it")
    model = FIDInceptionV3()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
