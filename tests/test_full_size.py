"""The real model's architecture through the whole pipeline (issue 16 item 5).

SD-1.4's text encoder built offline from its real config (random weights, ``build_sd14_pipeline``),
saved with ``save_pretrained`` and used through ``model.source`` with preset ``sd-v1-4``, then
``dvc repro`` of the default pipeline in a temporary copy of this tree: the edit must touch exactly
fc2 of text-encoder layers 0..10 (value layer 10) and the edited images must differ from the
unedited ones. ``test_full_text_encoder_tiny_unet``: the CI variant (the full-size text encoder with
the tiny UNet/VAE). ``test_full_sd14_architecture``: every component at full size with a small
``sample_size`` (slow).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from tests.test_pipeline_dvc import BIN, copy_worktree, set_param, sh, stage_env

SMALL = {  # the smallest run that still exercises every stage of the default pipeline
    "model.preset": "sd-v1-4", "datasets.name": "cake", "datasets.max_edits": 2,
    "corpus.size": 64, "statistics.shard_size": 64, "statistics.heldout_texts": 64,
    "values.steps": 2, "values.latent_steps": 2, "values.batch_size": 4,
    # text_space measures unedited, ours and the one method that only re-solves (no value optimisation;
    # DVC needs its persist output data/text_space/edits); the other four beside them (each re-optimising
    # its values and re-solving 11 layers at width 3,072) took > 14 min of the run: compare's tests cover them
    "text_space.methods": ["ours-no-projector"], "text_space.method_params": {}, "text_space.captions": 8,
    "generate.seeds": [0], "generate.num_inference_steps": 2, "generate.reference_images": 2,
    # two tasks at a time: the projector's 11 float64 eighs of 3,072² (~40 CPU-s each, most of the run)
    # scale better two at once than one on two MKL threads (one at a time: 534 s; Prefect's default of
    # all 11 at once oversubscribes the CPU and holds ~6 GB); no result depends on the runner
    "runner.max_workers": 2,
}


def _run(tmp_path, prefect_harness, tiny_unet: bool, sample_size: int | None):
    from t2iedit.edit import EditArtifact
    from t2iedit.generate import read_index
    from t2iedit.models import build_sd14_pipeline

    root = copy_worktree(tmp_path / "repo")
    source = build_sd14_pipeline(tmp_path / "sd14", seed=0, sample_size=sample_size, tiny_unet=tiny_unet)
    for key, value in {**SMALL, "model.source": str(source)}.items():
        set_param(root, key, value)
    env = stage_env(prefect_harness, tmp_path / "cache")
    sh([str(BIN / "dvc"), "repro", "-q"], root, env, timeout=3600)

    art = EditArtifact.load(root / "data" / "edit" / "artifact")
    layers = sorted(int(m.group(1)) for k in art.deltas
                    if (m := re.fullmatch(r"text_encoder:(?:text_model\.)?encoder\.layers\.(\d+)\.mlp\.fc2", k)))
    assert layers == list(range(11)) and len(art.deltas) == 11, sorted(art.deltas)
    assert all(d.shape == (768, 3072) and d.abs().max() > 0 for d in art.deltas.values())
    images = root / "data" / "eval" / "images"
    idx = {m: read_index(root / "data" / "eval" / "index" / f"{m}.parquet").to_pandas() for m in ("edited", "unedited")}
    pairs = idx["edited"].merge(idx["unedited"], on=["prompt", "seed"], suffixes=("_e", "_u"))
    assert len(pairs) > 0
    differ = [not np.array_equal(np.asarray(Image.open(images / a)), np.asarray(Image.open(images / b)))
              for a, b in zip(pairs["path_e"], pairs["path_u"])]
    assert any(differ), "the edit changed no image"


# slow (outside the README's `pytest`), run by .ci/run on every commit: 4 min wall on 2 quiet cores
# (2026-12-08; 13.5 min on a loaded machine of this workplace, 2026-12-01)
@pytest.mark.slow
def test_full_text_encoder_tiny_unet(tmp_path, prefect_harness):
    """CI variant: SD-1.4's full text encoder (12 × 768, edits 0..10) with the tiny UNet/VAE."""
    _run(tmp_path, prefect_harness, tiny_unet=True, sample_size=None)


@pytest.mark.slow
def test_full_sd14_architecture(tmp_path, prefect_harness):
    """Every component at SD-1.4's size (860 M-parameter UNet), latents 8 × 8 (64 px)."""
    _run(tmp_path, prefect_harness, tiny_unet=False, sample_size=8)
