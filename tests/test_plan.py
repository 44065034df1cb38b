"""``python -m flows.plan``: UNet evaluations per stage and method of a params set (issue 16 item 3)."""

from __future__ import annotations

from flows.plan import flat, main, paper_settings, plan, report
from flows.stage import read_params

EIGHT = ["oracle", "time", "refact", "emcid", "ours", "ours-no-projector", "ours-no-eata", "ours-no-visual"]


def test_paper_protocol_counts_match_the_arithmetic_of_the_issue(capsys):
    """CAKE, SD-1.4 (50 PNDM steps, CFG: 2 forwards per step), 5 seeds, the main run + compare's 8
    methods, no FID: today 8,436,000 sample-forwards (the issue's 8.45 M) — 11 generations of every
    (prompt, seed), 5 sets of source latents (main + 4 visual methods), 5 value optimisations
    ((200 + 2) × 2 forwards per edit); sharing drops compare's oracle images and the 4 latents."""
    s = {**flat(read_params("params.yaml")), **paper_settings("cake"), "compare.methods": EIGHT,
         "fid.n_captions": 0}
    today, shared = plan(s, share=False), plan(s, share=True)
    gen = [r for r in today if r["stage"] == "generate"]
    images = gen[0]["images"]
    assert images == 7440 and all(r["images"] == images for r in gen)  # 1,488 CAKE prompts × 5 seeds
    n_edits = 100
    total_today = 11 * images * 50 * 2 + 5 * n_edits * 50 * 2 + 5 * n_edits * (200 + 2) * 2
    assert sum(r["sample_forwards"] for r in today) == total_today == 8_436_000
    assert sum(r["sample_forwards"] for r in shared) == total_today - images * 100 - 4 * n_edits * 100
    assert not [r for r in shared if r["stage"] == "compare/latents"]
    table, tot = report(s, with_fid=False)
    assert "| compare/generate | oracle | 7,440 | 744,000 | 0 |" in table
    assert tot["sample_forwards_shared"] == 7_652_000
    assert main(["--no-fid", "-S", "generate.seeds=[0]", "-S", "compare.methods=[ours]"]) == 0
    assert "| generate | edited |" in capsys.readouterr().out
