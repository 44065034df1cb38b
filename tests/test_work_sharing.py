"""Work done once (issue 16 item 3) on the tiny preset: each distinct (model, text, seed, sampling)
image is generated once and shared through the indexes — generate's oracle prompts equal to the
prompts, reference texts equal to oracle prompts, duplicate prompts; compare's unedited/oracle images
and, for ``ours`` with the main run's resolved values/edit config, the main run's edit and its images.

- every shared image is byte for byte the image a direct generation of that row gives, and compare
  with sharing (``reuse_main``) gives the images and metrics of compare without it;
- ``flows.plan`` counts exactly the images the stages generate;
- compare loads one pipeline per (process, model, edit), in ``model.dtype``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from t2iedit.edit_data import EVAL_PROMPTS_SCHEMA
from t2iedit.storage import read_parquet, write_parquet
from tasks.model import lock_model

from test_methods_compare import _main_run_outputs, _tiny_dataset

STEPS = 2  # Adam steps of the values: the main run's and compare's ours alike
# one image per pipeline call: on the CPU an image's last bit can depend on its batch neighbours
# (measured here: 2 of 12 edited tiny images differ by 1/255 between batches of 1 and 4), which no
# sharing changes — the content-addressed cache always kept the image of the batch that made it
PARAMS = {
    "values": {"steps": STEPS},
    "edit": {},
    "generate": {"methods": ["edited", "unedited", "oracle", "reference"], "seeds": [0, 1],
                 "reference_images": 2, "batch_size": 1, "task_batches": 5},
    "metrics": {"clip": "tiny"},
    # ours with the main run's resolved config (values.batch_size 32); time: an edit of its own
    "compare": {"methods": ["unedited", "oracle", "ours", "time"], "seeds": [0, 1], "batch_size": 1,
                "method_params": {"ours": {"values": {"steps": STEPS, "log_every": 0}, "value_batch_size": 32}}},
}


def _with_duplicate_prompt(folder: Path) -> None:
    """A second evaluation prompt with the text of another ("A dog"): generated once, indexed twice."""
    for rel in ("data/processed/datasets/eval_prompts.parquet", "data/eval/metrics/thresholds/eval_prompts.parquet"):
        ep = read_parquet(folder / rel).to_pandas()
        dup = ep[ep["prompt"] == "A dog"].iloc[[0]].assign(prompt_id="timed-test-001/specificity/9")
        write_parquet(folder / rel, pd.concat([ep, dup], ignore_index=True), EVAL_PROMPTS_SCHEMA)


class Counter:
    """Counts calls of a module function (``initial_latents``: one per generated image)."""

    def __init__(self, monkeypatch, module, name: str):
        self.n, self.calls, fn = 0, [], getattr(module, name)

        def wrapped(*a, **k):
            self.n += 1
            self.calls.append((a, k))
            return fn(*a, **k)

        monkeypatch.setattr(module, name, wrapped)


@pytest.fixture(scope="module")
def run(prefect_harness, tmp_path_factory):
    """The main run (values, edit, generate flows) and compare with and without sharing, in one
    temporary repo; what each generated and loaded."""
    import t2iedit.generate as G
    import tasks.compare as TC
    import tasks.evaluate as E
    from flows.compare import compare
    from flows.edit import edit
    from flows.generate import generate
    from flows.values import values

    tmp = tmp_path_factory.mktemp("sharing")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    mp = pytest.MonkeyPatch()
    torch.set_num_threads(1)
    os.chdir(tmp)
    try:
        _tiny_dataset(tmp)
        _with_duplicate_prompt(tmp)
        # model.dtype float16: on the CPU it runs float32 (resolve_dtype), but compare must ask for it
        lock_model.fn(tmp / "data/models/lock.json", "fp", "tiny", 0, dtype="float16")
        _main_run_outputs(tmp)
        (tmp / "params.yaml").write_text(yaml.safe_dump(PARAMS))
        noshare = {**PARAMS, "compare": {**PARAMS["compare"], "reuse_main": False}}
        (tmp / "noshare.yaml").write_text(yaml.safe_dump(noshare))
        out = {}
        values(params_file="params.yaml")
        edit(params_file="params.yaml")
        for phase, fn in (("generate", lambda: generate(params_file="params.yaml")),
                          ("compare", lambda: compare(params_file="params.yaml")),
                          ("noshare", lambda: compare(params_file="noshare.yaml", out_dir="data/compare_noshare"))):
            E._PIPE.clear()  # a fresh process: no pipeline resident
            images = Counter(mp, G, "initial_latents")
            loads = Counter(mp, E, "load_pipeline")
            pipes = Counter(mp, TC, "cached_pipeline")
            fn()
            out[phase] = {"images": images.n, "loads": loads.n, "pipes": pipes.calls}
            mp.undo()
        yield tmp, out
    finally:
        mp.undo()
        os.chdir(cwd)
        torch.set_num_threads(threads)


def _bytes(root: Path, rel: str) -> bytes:
    return (root / rel).read_bytes()


def test_shared_images_are_the_images_of_a_direct_generation_of_each_row(run):
    """Every row of every generate index: the bytes a fresh pipeline of that method's model gives
    for that (text, seed) alone (oracle = unedited where the texts agree, the duplicate prompt, the
    reference texts), and one file per distinct key."""
    from flows.generate import GenerateParams, sampling_for
    from t2iedit.edit import EditArtifact, edited
    from t2iedit.generate import SamplingConfig, generate_images, read_index
    from t2iedit.models import load_pipeline
    from tasks.model import locked_model

    tmp, _ = run
    model = locked_model(tmp / "data/models")
    config = SamplingConfig(**sampling_for(model, GenerateParams(**PARAMS["generate"])))
    art = EditArtifact.load(tmp / "data/edit/artifact")
    paths = {}
    for method in PARAMS["generate"]["methods"]:
        index = read_index(tmp / f"data/eval/index/{method}.parquet").to_pandas()
        pipe = load_pipeline(model.source)
        root = tmp / "direct" / method
        parts = {"text_encoder": pipe.text_encoder, "unet": pipe.unet}
        for row in index.itertuples():
            if method == "edited":
                with edited(parts, art, model.preset, model.revision):
                    t = generate_images(pipe, [(row.prompt, row.seed)], root, "direct", config, progress=False)
            else:
                t = generate_images(pipe, [(row.prompt, row.seed)], root, "direct", config, progress=False)
            assert _bytes(tmp / "data/eval/images", row.path) == _bytes(root, t.column("path")[0].as_py()), \
                (method, row.prompt, row.seed)
            paths[(method, row.prompt, row.seed)] = row.path
    for (method, prompt, seed), path in paths.items():  # oracle/reference rows point at the unedited files
        if method != "edited" and ("unedited", prompt, seed) in paths:
            assert path == paths[("unedited", prompt, seed)]
    files = {p for p in (tmp / "data/eval/images").rglob("*.png")}
    assert len(files) == len(set(paths.values()))


def test_compare_with_and_without_sharing_gives_identical_images_and_metrics(run):
    """compare reuse_main true (unedited/oracle/ours from the main run: ours is the main run's edit)
    vs false (everything computed and generated by compare itself): the same bytes per (method,
    prompt, seed) and the same per-image metrics and table."""
    from t2iedit.edit import EditArtifact
    from t2iedit.generate import read_index

    tmp, out = run
    assert not (tmp / "data/compare/edits/ours").exists()  # shared: the main run's artifact
    mine = EditArtifact.load(tmp / "data/compare_noshare/edits/ours")
    main = EditArtifact.load(tmp / "data/edit/artifact")
    assert mine.deltas.keys() == main.deltas.keys() and mine.deltas
    assert all(torch.equal(mine.deltas[k], main.deltas[k]) for k in main.deltas)  # bit for bit
    for method in PARAMS["compare"]["methods"]:
        a = read_index(tmp / f"data/compare/eval/{method}/index.parquet").to_pandas()
        b = read_index(tmp / f"data/compare_noshare/eval/{method}/index.parquet").to_pandas()
        assert list(zip(a["prompt"], a["seed"])) == list(zip(b["prompt"], b["seed"]))
        for pa_, pb in zip(a["path"], b["path"]):
            assert _bytes(tmp / "data/compare/images", pa_) == _bytes(tmp / "data/compare_noshare/images", pb), method
        # every metric equal (the paths differ only in the model key: ours' own artifact has its own manifest)
        pd.testing.assert_frame_equal(
            read_parquet(tmp / f"data/compare/eval/{method}/per_image.parquet").to_pandas().drop(columns="path"),
            read_parquet(tmp / f"data/compare_noshare/eval/{method}/per_image.parquet").to_pandas().drop(columns="path"))
    assert (read_parquet(tmp / "data/compare/table/table.parquet").to_pandas()
            .equals(read_parquet(tmp / "data/compare_noshare/table/table.parquet").to_pandas()))
    # with sharing compare generated only time's images; without, it generated every distinct image
    assert out["compare"]["images"] == len(read_index(tmp / "data/compare/eval/time/index.parquet"))


def test_plan_counts_the_images_the_stages_generate(run):
    """``flows.plan`` (shared) = the images generate and compare made (counted at the generator),
    with and without compare's reuse of the main run."""
    from flows.plan import flat, plan
    from flows.stage import read_params

    tmp, out = run
    edits = read_parquet(tmp / "data/processed/datasets/edits.parquet").to_pandas()
    ep = read_parquet(tmp / "data/processed/datasets/eval_prompts.parquet").to_pandas()
    data = (edits[edits["kind"] == "single"], ep)
    for phase, params in (("compare", "params.yaml"), ("noshare", "noshare.yaml")):
        s = {**flat(read_params(tmp / params)), "model.preset": "tiny"}
        rows = plan(s, share=True, data=data)
        count = lambda stage: sum(r["images"] for r in rows if r["stage"] == stage)  # noqa: E731
        assert count("generate") == out["generate"]["images"]
        assert count("compare/generate") == out[phase]["images"], phase
        # shared: ours is the main run's edit (no values, no latents); not shared: its own, latents too
        assert bool([r for r in rows if r["stage"] == "compare/latents"]) == (phase == "noshare")
        assert bool([r for r in rows if r["stage"] == "compare/values"]) == (phase == "noshare")
    today = plan(s, share=False, data=data)
    assert sum(r["images"] for r in today if r["stage"] == "generate") > out["generate"]["images"]


def test_compare_loads_one_pipeline_per_model_and_edit_in_the_model_dtype(run):
    """With sharing: the unedited float32 pipeline for the edits (TIME; unedited/oracle need none to
    generate) and TIME's edited one; without: + ours' edited one. Evaluations ask for model.dtype."""
    tmp, out = run
    assert out["compare"]["loads"] == 2
    assert out["noshare"]["loads"] == 3  # unedited (edits + unedited/oracle images), ours, time
    evals = [c for c in out["compare"]["pipes"] + out["noshare"]["pipes"] if c[0][3] is not None]
    assert evals and all(c[0][4] == "float16" for c in evals)  # (preset, source, revision, edit, dtype)
