"""FID arithmetic (identical sets, Gaussian closed forms), COCO subset/reference checks, the
Inception architecture, and the CLIP score on a tiny CLIP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ortho_group

from t2iedit import fid as F

COCO_CSV = Path(__file__).parents[2] / "shared/data/coco/coco_30k.csv"


def _w2_reference(mu1, s1, mu2, s2):
    """Independent closed form of the squared 2-Wasserstein distance between Gaussians:
    tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½) via symmetric eigendecompositions."""
    def psd_sqrt(a):
        w, v = np.linalg.eigh(a)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    r = psd_sqrt(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * psd_sqrt(r @ s2 @ r)))


def test_identical_feature_sets_give_zero():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(300, 16))
    assert abs(F.fid_from_features(f, f.copy())) < 1e-6


def test_diagonal_gaussians_match_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert F.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_general_gaussians_match_independent_reference():
    rng = np.random.default_rng(1)
    d = 8
    q1, q2 = ortho_group.rvs(d, random_state=1), ortho_group.rvs(d, random_state=2)
    s1 = q1 @ np.diag(rng.uniform(0.1, 3, d)) @ q1.T
    s2 = q2 @ np.diag(rng.uniform(0.1, 3, d)) @ q2.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_w2_reference(mu1, s1, mu2, s2), rel=1e-8)


def test_sampled_gaussians_converge_to_population_value():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=(20000, 2))
    b = rng.normal([2.0, 0.0], [2.0, 1.0], size=(20000, 2))
    # population: |mu|^2 = 4, (1 - 2)^2 + (1 - 1)^2 = 1 -> 5
    assert F.fid_from_features(a, b) == pytest.approx(5.0, abs=0.15)


def test_extract_features_with_injected_extractor_orders_and_batches():
    ims = [Image.new("RGB", (40, 30), (10 * i, 0, 0)) for i in range(5)]
    seen = []

    def extractor(x):  # mean red channel as a 1-d feature; records the batch shapes
        seen.append(tuple(x.shape))
        return x[:, 0].mean(dim=(1, 2), keepdim=False)[:, None]

    f = F.extract_features(extractor, ims, image_size=16, batch_size=2)
    assert seen == [(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16)]
    assert f[:, 0] == pytest.approx([10 * i / 255 for i in range(5)], abs=1e-6)
    assert f.dtype == np.float64


def test_fid_captions_fixed_subset():
    if not COCO_CSV.exists():
        pytest.skip("shared/ data not present")
    df = F.fid_captions(COCO_CSV)
    assert len(df) == 5000 and df["coco_id"].is_unique
    assert df.loc[0, "prompt"] == "A bicycle replica with a clock as the front wheel."
    assert int(df.loc[0, "evaluation_seed"]) == 41337 and int(df.loc[0, "coco_id"]) == 203564


def test_reference_images_missing_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="COCO val2014"):
        F.reference_image_paths(None, [1])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        F.reference_image_paths(tmp_path / "nope", [1])
    Image.new("RGB", (8, 8)).save(tmp_path / "COCO_val2014_000000000001.jpg")
    assert F.reference_image_paths(tmp_path, [1])[0].name == "COCO_val2014_000000000001.jpg"
    with pytest.raises(FileNotFoundError, match=r"1 of 2 .*COCO_val2014_000000203564\.jpg"):
        F.reference_image_paths(tmp_path, [1, 203564])


def test_fid_inception_architecture_and_strict_weight_loading(tmp_path):
    model = F.FIDInceptionV3().eval()
    # torchvision Inception3 (1008 classes, no aux head) has 23,850,960 parameters
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    with torch.no_grad():
        out = model(torch.rand(1, 3, 75, 75))
    assert out.shape == (1, 2048) and (out >= 0).all()  # pool3 after ReLU
    weights = tmp_path / F.FID_WEIGHTS_FILE
    torch.save(model.state_dict(), weights)
    loaded = F.load_fid_inception(weights)
    assert torch.equal(loaded.Mixed_7c.branch_pool.conv.weight, model.Mixed_7c.branch_pool.conv.weight)
    state = model.state_dict()
    state.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(state, weights)
    with pytest.raises(RuntimeError, match="Missing key"):
        F.load_fid_inception(weights)
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        F.load_fid_inception(tmp_path / "absent.pth")


def test_clip_score_matches_manual_cosine(tmp_path):
    from t2iedit.clip_eval import ClipEncoder, build_tiny_clip

    enc = ClipEncoder.from_pretrained(build_tiny_clip(tmp_path / "clip"))
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    caps = ["a dog", "a red car", "two cats on a sofa"]
    out = F.clip_score(enc, ims, caps, batch_size=2)
    cos = (enc.encode_images(ims) * enc.encode_texts(caps)).sum(-1).double()
    # the paper's CLIP score is the plain mean cosine (its 0.465), not 100·cos
    assert out["clip_score"] == pytest.approx(cos.mean().item(), abs=1e-6)
    assert -1.0 <= out["clip_score"] <= 1.0 and "cosine" in F.CLIP_SCORE_UNIT
    assert out["clip_score_hessel"] == pytest.approx((100 * cos).clamp_min(0).mean().item(), abs=1e-4)
    assert out["n"] == 3
