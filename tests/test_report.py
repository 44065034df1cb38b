"""The report stage: per-category bars, before/after grids of the first edits and report.md (the
metrics table plus the pictures), published as the Prefect artifact ``eval-report``."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import yaml
from PIL import Image

from t2iedit.storage import write_parquet, write_text

EDITS = ["e0", "e1", "e2"]
TABLE = ("# Metrics title\n\n## threshold test\n\n"
         "| method | Efficacy | Score |\n|---|---|---|\n| edited | 80.0 | 70.0 |\n")


def _inputs(root: Path) -> None:
    """What generate and metrics leave behind, for three edits with one seed: distinct solid images."""
    ep = pd.DataFrame([{"edit_id": e, "category": c, "prompt": f"{c} prompt of {e}"}
                       for e in EDITS for c in ("efficacy", "generality", "specificity")])
    write_parquet(root / "data/processed/datasets/eval_prompts.parquet", ep)
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


def test_report_pictures_markdown_and_prefect_artifact(prefect_harness, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.report import report

    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "generate": {"methods": ["edited", "unedited"]}, "report": {"grids": 2, "title": "Tiny run"}}))
    out = report(params_file="params.yaml")

    assert sorted(p.name for p in (out / "grids").iterdir()) == ["e0.png", "e1.png"]  # the first 2 edits
    for png in [out / "categories.png", *(out / "grids").iterdir()]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = (out / "report.md").read_text()
    assert md.startswith("# Tiny run\n") and "# Metrics title" not in md  # one title: the report's
    assert TABLE.partition("\n")[2].strip() in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links == ["categories.png", "grids/e0.png", "grids/e1.png"]
    assert all((out / link).is_file() for link in links)

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["eval-report"])))
    assert arts and arts[-1].type == "markdown" and arts[-1].data == md


def test_report_without_the_edited_method_has_no_grids(prefect_harness, tmp_path, monkeypatch):
    from flows.report import report

    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"generate": {"methods": ["unedited"]},
                                                          "report": {}}))
    out = report(params_file="params.yaml")
    md = (out / "report.md").read_text()
    assert "Before / after" not in md and not (out / "grids").exists()
    assert re.findall(r"\]\(([^)]+)\)", md) == ["categories.png"]

