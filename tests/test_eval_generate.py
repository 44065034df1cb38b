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

    def __call__(self, prompt, **kw):
        self.images += len(prompt)
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


def test_rejects_bad_input(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        generate_images(tiny_pipe, [("", 0)], tmp_path, "h", CFG, progress=False)
    with pytest.raises(ValueError, match="multiples of 8"):
        SamplingConfig(height=30)
