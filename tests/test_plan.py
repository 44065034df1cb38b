"""``python -m flows.plan``: UNet evaluations per stage and method of a params set (issue 16 item 3)."""

from __future__ import annotations

from flows.plan import flat, main, paper_settings, plan, report
from flows.stage import read_params

EIGHT = ["oracle", "time", "refact", "emcid", "ours", "ours-no-projector", "ours-no-eata", "ours-no-visual"]


def test_paper_protocol_counts_match_the_arithmetic_of_the_issue(capsys):
    """CAKE, SD-1.4 (50 PNDM steps, CFG: 2 forwards per step), 5 seeds, the main run + compare's 8
    methods, no FID: today 8,436,000 sample-forwards (the issue's 8.45 M) — 11 generations of every
    (prompt, seed), 5 sets of source latents (main + 4 visual methods), 5 value optimisations
    ((200 + 2) × 2 forwards per edit). Shared (each distinct image once): generate's oracle images of
    the 300 × 5 − 60 (text, seed) pairs whose oracle prompt is the prompt (the unedited images), compare's
    oracle images (the main run's), the 4 latents (the main run's) and compare's ours — with the paper's
    ``value_batch_size`` 32 its resolved config is the main run's: its edit, values and images."""
    s = {**flat(read_params("params.yaml")), **paper_settings("cake"), "compare.methods": EIGHT,
         "fid.n_captions": 0}
    today, shared = plan(s, share=False), plan(s, share=True)
    gen = [r for r in today if r["stage"] == "generate"]
    images = gen[0]["images"]
    assert images == 7440 and all(r["images"] == images for r in gen)  # 1,488 CAKE prompts × 5 seeds
    n_edits = 100
    total_today = 11 * images * 50 * 2 + 5 * n_edits * 50 * 2 + 5 * n_edits * (200 + 2) * 2
    assert sum(r["sample_forwards"] for r in today) == total_today == 8_436_000
    oracle_is_prompt = 1440  # CAKE: 300 prompts whose oracle prompt is the prompt, 12 of them duplicates
    assert [r["images"] for r in shared if r["stage"] == "generate"] == [images, images, images - oracle_is_prompt]
    assert sum(r["sample_forwards"] for r in shared) == (total_today - images * 100 - 4 * n_edits * 100
                                                         - oracle_is_prompt * 100 - images * 100
                                                         - n_edits * 202 * 2)
    assert not [r for r in shared if r["stage"] == "compare/latents"]
    assert not [r for r in shared if r["stage"] == "compare/values" and r["method"] == "ours"]
    table, tot = report(s, with_fid=False)
    assert "| compare/generate | oracle | 7,440 | 744,000 | 0 |" in table
    assert "| compare/generate | ours | 7,440 | 744,000 | 0 |" in table
    assert tot["sample_forwards_shared"] == 6_723_600
    # the main run's edit is checked, not assumed: compare's ours with its own batch size (16) is not it
    other = {**s, "compare.method_params": {}}
    assert [r for r in plan(other, share=True) if r["stage"] == "compare/values" and r["method"] == "ours"]
    assert main(["--no-fid", "-S", "generate.seeds=[0]", "-S", "compare.methods=[ours]"]) == 0
    assert "| generate | edited |" in capsys.readouterr().out
