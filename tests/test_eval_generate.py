"""Generation cache and batch independence on the tiny pipeline (real diffusers code, 32 px, 4 steps)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from t2iedit.generate import (
    SamplingConfig, generate_images, image_relpath, model_hash, read_index, write_index,
)

CFG = SamplingConfig(num_inference_steps=4, height=32, width=32)


class CountingPipe:
    """Wraps a pipeline and counts the images it is asked for."""

    def __init__(self, pipe):
        self.pipe, self.images = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompt=None, **kw):
        self.images += len(prompt) if prompt is not None else len(kw["prompt_embeds"])
        return self.pipe(prompt=prompt, **kw)


def _pixels(root, rel):
    return np.asarray(Image.open(root / rel))


def test_second_call_generates_nothing_and_index_roundtrips(tiny_pipe, tmp_path):
    pipe = CountingPipe(tiny_pipe)
    mh = model_hash("tiny", None, None)
    items = [("a dog", 0), ("a dog", 1), ("a red car", 0), ("a dog", 0)]  # one duplicate
    t1 = generate_images(pipe, items, tmp_path, mh, CFG, batch_size=2, progress=False)
    assert pipe.images == 3 and t1.num_rows == 3
    mtimes = {p: (tmp_path / p).stat().st_mtime_ns for p in t1.column("path").to_pylist()}
    t2 = generate_images(pipe, items + [("a cat", 4)], tmp_path, mh, CFG, batch_size=2, progress=False)
    assert pipe.images == 4  # only the new (prompt, seed)
    assert {p: (tmp_path / p).stat().st_mtime_ns for p in mtimes} == mtimes
    assert t2.slice(0, 3).equals(t1)
    assert all(p.startswith(mh[:16] + "/") for p in t2.column("path").to_pylist())
    idx = read_index(write_index(tmp_path / "index.parquet", [t1, t2]))
    assert idx.num_rows == 4 and set(idx.column("seed").to_pylist()) == {0, 1, 4}
    # a different model (or sampling setting) never reuses these files
    assert image_relpath("a dog", 0, model_hash("tiny", None, "edit"), CFG) != t1.column("path")[0].as_py()
    assert image_relpath("a dog", 0, mh, SamplingConfig(4, 7.0, 32, 32)) != t1.column("path")[0].as_py()


def test_image_independent_of_batch_composition(tiny_pipe, tmp_path):
    mh = model_hash("tiny")
    alone = generate_images(tiny_pipe, [("a bowl of bananas", 3)], tmp_path / "a", mh, CFG,
                            batch_size=1, progress=False)
    mixed = generate_images(tiny_pipe, [("a painting of a bear", 0), ("a bowl of bananas", 3),
                                        ("a bowl of bananas", 4)], tmp_path / "b", mh, CFG,
                            batch_size=3, progress=False)
    a = _pixels(tmp_path / "a", alone.column("path")[0].as_py())
    b = _pixels(tmp_path / "b", mixed.column("path")[1].as_py())
    c = _pixels(tmp_path / "b", mixed.column("path")[2].as_py())
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(b, c)  # the seed matters


def test_cached_prompt_embeddings_give_the_pipelines_own_images(tiny_pipe, tmp_path):
    """generate_images encodes each prompt once and "" once (PromptEmbeddings) instead of letting the
    pipeline re-encode both per call: the embeddings are the pipeline's own encode_prompt outputs and a
    batch-of-one image is bit-identical to the pipeline called with the prompt text."""
    import torch

    from t2iedit.generate import PromptEmbeddings, initial_latents

    prompts = ["a dog", "a red car", "a dog"]
    emb = PromptEmbeddings(tiny_pipe, guidance=True)
    cond, uncond = emb(prompts)
    ref_cond, ref_uncond = tiny_pipe.encode_prompt(prompts, "cpu", 1, True)
    torch.testing.assert_close(cond, ref_cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uncond, ref_uncond, rtol=1e-5, atol=1e-6)
    assert len(emb.cache) == 2 and emb(["a dog"])[0].shape == (1, *ref_cond.shape[1:])
    assert PromptEmbeddings(tiny_pipe, guidance=False)(["a dog"])[1] is None
    small = PromptEmbeddings(tiny_pipe, guidance=False, max_prompts=2)
    small(["a", "b"])
    torch.testing.assert_close(small(["b", "c"])[0], tiny_pipe.encode_prompt(["b", "c"], "cpu", 1, False)[0])

    table = generate_images(tiny_pipe, [("a red car", 5)], tmp_path, model_hash("tiny"), CFG, batch_size=1,
                            progress=False)
    shape = (tiny_pipe.unet.config.in_channels, 32 // tiny_pipe.vae_scale_factor, 32 // tiny_pipe.vae_scale_factor)
    direct = tiny_pipe(prompt=["a red car"], latents=initial_latents(5, shape), num_inference_steps=4,
                       guidance_scale=CFG.guidance_scale, height=32, width=32, output_type="np").images[0]
    expected = (np.clip(direct, 0.0, 1.0) * 255).round().astype(np.uint8)
    assert np.array_equal(_pixels(tmp_path, table.column("path")[0].as_py()), expected)


def test_rejects_bad_input(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        generate_images(tiny_pipe, [("", 0)], tmp_path, "h", CFG, progress=False)
    with pytest.raises(ValueError, match="multiples of 8"):
        SamplingConfig(height=30)


def _tiny_artifact(pipe, folder):
    """A real-shaped edit of the tiny pipeline: random float64 ΔW on two text-encoder fc2 layers."""
    import torch

    from t2iedit.edit import EditArtifact, EditManifest, module_key
    from t2iedit.models import TextEncoderAdapter

    adapter = TextEncoderAdapter(pipe.text_encoder)
    g = torch.Generator().manual_seed(0)
    deltas = {module_key("text_encoder", adapter.module_name(l)):
              0.05 * torch.randn(adapter.layer(l).weight.shape, generator=g, dtype=torch.float64)
              for l in (0, 2)}
    return EditArtifact(deltas, EditManifest("ours", "tiny", None, "abc", (0, 2), 2)).save(folder)


def test_one_pipeline_per_process_gives_the_images_of_a_fresh_pipeline(tiny_dir, tiny_pipe, tmp_path):
    """issue 16 item 3: mapped batches reuse the process's pipeline (loaded once per model and edit,
    the edit applied for good) and produce the same PNGs as loading a fresh pipeline per batch with
    the edit applied for the call (the old generate_batch)."""
    import t2iedit.models as models_mod
    import tasks.evaluate as ev
    from t2iedit.edit import EditArtifact, edited

    artifact = _tiny_artifact(tiny_pipe, tmp_path / "artifact")
    sampling = {"num_inference_steps": 3, "guidance_scale": 7.5, "height": 32, "width": 32}
    loads = []
    real_load = ev.load_pipeline
    ev.load_pipeline = lambda *a, **k: loads.append(a) or real_load(*a, **k)
    try:
        ev._PIPE.clear()
        items = [("a dog", 0), ("a red car", 1), ("a cat on a mat", 0), ("a dog", 1)]
        for art, name in ((None, "plain"), (artifact, "edit")):
            for b, chunk in enumerate((items[:2], items[2:])):  # two mapped batches of one method
                ev.generate_batch.fn(tmp_path / name / f"{b}.parquet", f"fp{b}", "tiny", str(tiny_dir), None,
                                     art, chunk, tmp_path / f"cached_{name}", "mh", sampling, 2)
        assert len(loads) == 2  # once per (model, edit), not once per batch
        assert ev.cached_pipeline("tiny", str(tiny_dir), None, artifact)[0] is \
            ev.cached_pipeline("tiny", str(tiny_dir), None, artifact)[0]
    finally:
        ev.load_pipeline = real_load
        ev._PIPE.clear()
    cfg = SamplingConfig(**sampling)
    fresh = models_mod.load_pipeline(tiny_dir)
    generate_images(fresh, items, tmp_path / "fresh_plain", "mh", cfg, batch_size=2, progress=False)
    parts = {"text_encoder": fresh.text_encoder, "unet": fresh.unet}
    with edited(parts, EditArtifact.load(artifact), "tiny", None):
        generate_images(fresh, items, tmp_path / "fresh_edit", "mh", cfg, batch_size=2, progress=False)
    for name in ("plain", "edit"):
        rels = sorted(p.relative_to(tmp_path / f"fresh_{name}") for p in (tmp_path / f"fresh_{name}").rglob("*.png"))
        assert len(rels) == 4
        for rel in rels:
            assert np.array_equal(_pixels(tmp_path / f"cached_{name}", rel), _pixels(tmp_path / f"fresh_{name}", rel))
    rel = rels[0]
    assert not np.array_equal(_pixels(tmp_path / "fresh_plain", rel), _pixels(tmp_path / "fresh_edit", rel))


def test_height_width_and_dtype_are_honoured_and_keyed(tiny_pipe, tiny_dir, tmp_path, caplog):
    """issue 16 items 1–2: generate.height/width (null: the model's own size) reach the pixels and the
    image key; the dtype is part of the images' model identity; on the CPU a half dtype runs float32."""
    import logging

    import torch

    from flows.stage import generate_hw
    from t2iedit.models import native_size, resolve_dtype
    from tasks.model import LockedModel, image_size

    model = LockedModel("tiny", str(tiny_dir), None, "id")
    assert native_size(tiny_dir) == (32, 32) == image_size(model)
    assert image_size(model, 16, None) == (16, 32) and image_size(model, 24, 40) == (24, 40)
    params = tmp_path / "params.yaml"
    params.write_text("generate:\n  height: 12\n")
    with pytest.raises(ValueError, match="generate.height must be a multiple of 8"):
        generate_hw(params)
    params.write_text("generate:\n  height: 16\n  width: null\n")
    assert generate_hw(params) == (16, None)

    cfg = SamplingConfig(num_inference_steps=2, height=16, width=24)
    t = generate_images(tiny_pipe, [("a dog", 0)], tmp_path, "mh", cfg, progress=False)
    with Image.open(tmp_path / t.column("path")[0].as_py()) as im:
        assert im.size == (24, 16)  # (width, height)
    assert image_relpath("a dog", 0, "mh", cfg) != image_relpath("a dog", 0, "mh", CFG)

    assert model_hash("m", None, None) == model_hash("m", None, None, "float32")  # float32 keys unchanged
    assert len({model_hash("m", None, None, d) for d in ("float32", "float16", "bfloat16")}) == 3
    with caplog.at_level(logging.WARNING, logger="t2iedit.models"):
        assert resolve_dtype("float16", "cpu") == "float32" and resolve_dtype("bfloat16", "cpu") == "float32"
    assert "the CPU stays float32" in caplog.text
    assert resolve_dtype("float16", torch.device("cuda", 0)) == "float16"
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        resolve_dtype("float64", "cpu")
