"""The report stage: report.md leads with what is real and the text-space table, then the image
metrics and one before/after grid per edit titled with the edit and followed by its prompts; the
Prefect artifact ``eval-report`` embeds every picture (the UI cannot follow relative links)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pandas as pd
import yaml
from PIL import Image

from t2iedit.storage import write_json, write_parquet, write_text

EDITS = ["e0", "e1", "e2"]
TABLE = ("# Metrics title\n\n## threshold test\n\n"
         "| method | Efficacy | Score |\n|---|---|---|\n| edited | 80.0 | 70.0 |\n")
TEXT_SPACE = {
    "unedited": {"efficacy": 0.0, "generality": 0.0, "kgemap": None, "compo": None, "specificity": 100.0,
                 "entity_drift": 0.0, "caption_drift": 0.0, "binary": {}},
    "ours": {"efficacy": 90.0, "generality": 70.0, "kgemap": None, "compo": None, "specificity": 80.0,
             "entity_drift": 0.0123, "caption_drift": 0.0011, "binary": {}},
    "ours-no-eata": {"efficacy": 95.0, "generality": 75.0, "kgemap": None, "compo": None,
                     "specificity": 70.0, "entity_drift": 0.0456, "caption_drift": 0.0012, "binary": {}},
}


def _inputs(root: Path, preset: str = "tiny-minilm", text_space: bool = True) -> None:
    """What the upstream stages leave behind, for three edits with one seed: distinct solid images."""
    ep = pd.DataFrame([{"edit_id": e, "category": c, "prompt": f"{c} prompt of {e}"}
                       for e in EDITS for c in ("efficacy", "generality", "specificity")])
    write_parquet(root / "data/processed/datasets/eval_prompts.parquet", ep)
    write_parquet(root / "data/processed/datasets/edits.parquet", pd.DataFrame(
        [{"edit_id": e, "kind": "single", "source": f"source {e}", "target": f"target {e}"} for e in EDITS]))
    write_json(root / "data/models/lock.json", {"preset": preset, "source": "x", "revision": None,
                                                "files": {}})
    images = root / "data/eval/images"
    for method, shade in (("unedited", 40), ("edited", 200)):
        rows = []
        for i, prompt in enumerate(ep["prompt"]):
            rel = f"{method}/{i}.png"
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (shade, i * 10, 0)).save(images / rel)
            rows.append({"prompt": prompt, "seed": 3, "path": rel})
        write_parquet(root / f"data/eval/metrics/{method}/per_image.parquet", pd.DataFrame(rows))
    summary = root / "data/eval/metrics/summary"
    summary.mkdir(parents=True)
    bars = pd.DataFrame([{"method": m, "category": c, "mean": v, "std": 1.0, "test": "threshold"}
                         for m, v in (("unedited", 10.0), ("edited", 80.0))
                         for c in ("Efficacy", "Specificity", "Score")])
    bars.to_csv(summary / "categories.csv", index=False)
    write_text(summary / "table.md", TABLE)
    if text_space:
        from t2iedit.text_space import markdown_table

        write_json(root / "data/text_space/summary/metrics.json", TEXT_SPACE)
        write_text(root / "data/text_space/summary/table.md", markdown_table(TEXT_SPACE, "Text space"))


def _params(root: Path, methods=("edited", "unedited"), grids: int = 2) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump({
        "generate": {"methods": list(methods)}, "report": {"grids": grids, "title": "Tiny run"},
        "metrics": {"clip": "tiny"}}))


def test_report_leads_with_what_is_real_and_the_text_space(prefect_harness, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.report import report

    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path)
    _params(tmp_path)
    out = report(params_file="params.yaml")

    assert sorted(p.name for p in (out / "grids").iterdir()) == ["e0.png", "e1.png"]  # the first 2 edits
    for png in [out / "categories.png", out / "text_space.png", *(out / "grids").iterdir()]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = (out / "report.md").read_text()
    head = md.splitlines()[:4]
    assert head[0] == "# Tiny run (`tiny-minilm`)" and "# Metrics title" not in md  # one title
    assert "What is real" in head[2] and "pretrained MiniLM" in head[2]
    assert "smoke test" in head[3] and "random" in head[3]
    # the text-space table comes first, then the image metrics
    assert md.index("## Text space") < md.index("## Image metrics") < md.index("## Before / after")
    assert "| ours | 90.0 | 70.0 | 80.0 | 0.0123 | 0.0011 |" in md
    # the α = 0 ablation's entity drift beside ours
    assert "ours, α > 0): **0.0123**; without it (ours-no-eata, α = 0): **0.0456**" in md
    assert TABLE.partition("\n")[2].strip() in md
    # each grid: titled with the edit, followed by the prompts of its rows
    for e in ("e0", "e1"):
        block = md[md.index(f"### {e}: source {e} → target {e}"):]
        assert f"![{e}: source {e} → target {e}](grids/{e}.png)" in block
        assert (f"1. efficacy: “efficacy prompt of {e}”\n2. generality: “generality prompt of {e}”\n"
                f"3. specificity: “specificity prompt of {e}”") in block
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links == ["text_space.png", "categories.png", "grids/e0.png", "grids/e1.png"]
    assert all((out / link).is_file() for link in links)

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["eval-report"])))
    assert arts and arts[-1].type == "markdown"
    data = arts[-1].data
    srcs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", data)
    assert len(srcs) == len(links) and all(s.startswith("data:image/png;base64,") for s in srcs)
    for link, src in zip(links, srcs):  # each embedded picture is the file's bytes
        assert base64.b64decode(src.partition(",")[2]) == (out / link).read_bytes()
    assert re.sub(r"\(data:image/png;base64,[^)]+\)", "()", data) == re.sub(r"\]\([^)]+\.png\)", "]()", md)


def test_report_says_when_nothing_is_real(prefect_harness, tmp_path, monkeypatch):
    from flows.report import report

    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path, preset="tiny", text_space=False)
    _params(tmp_path)
    md = (report(params_file="params.yaml") / "report.md").read_text()
    assert "Nothing here is a trained model" in md.splitlines()[2]
    assert "## Text space" not in md


def test_report_without_the_edited_method_has_no_grids(prefect_harness, tmp_path, monkeypatch):
    from flows.report import report

    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path)
    _params(tmp_path, methods=("unedited",))
    out = report(params_file="params.yaml")
    md = (out / "report.md").read_text()
    assert "Before / after" not in md and not (out / "grids").exists()
    assert re.findall(r"\]\(([^)]+)\)", md) == ["text_space.png", "categories.png"]


def test_embed_images_leaves_missing_files_and_other_links(tmp_path):
    from tasks.report import embed_images

    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    md = "![a](a.png) ![b](missing.png) [doc](docs/METHOD.md)"
    out = embed_images(md, tmp_path)
    assert out.startswith("![a](data:image/png;base64,") and "![b](missing.png) [doc](docs/METHOD.md)" in out
