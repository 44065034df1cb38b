"""Batched vs per-edit target-value optimisation: wall time for 100 edits, same run, same settings.

Both sides call the library the way the pipeline could: ``compute_target_values`` once with all edits
(one padded forward/backward per step over edits × templates) versus once per edit in a Python loop.
Text-only mode (λ = 0; the UNet is not involved), the same number of Adam steps on both sides, the
CAKE facts as prompts (entities from the dataset). Encoders: the tiny preset's CLIP text encoder and
a CLIP text encoder with Stable Diffusion 1.4's configuration (ViT-L/14: 12 layers, 768 wide), both
with random weights (speed does not depend on the weights).

Run: ``python bench/bench_values_batched.py [--edits 100] [--steps 5]`` → bench/results/values_batched.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

import torch

from t2iedit.io import write_json
from t2iedit.models import TINY_CONFIG, TextEncoderAdapter, get_preset, load_tokenizer
from t2iedit.ner import dataset_entities
from t2iedit.prompts import EditRequest
from t2iedit.values import ValueConfig, compute_target_values, compute_target_values_batched

ROOT = Path(__file__).resolve().parents[1]
CAKE = ROOT.parent / "shared" / "data" / "CAKE" / "CAKE.json"
RESULTS = ROOT / "bench" / "results" / "values_batched.json"

logger = logging.getLogger("bench_values_batched")

ENCODERS = {
    "tiny": dict(hidden_size=TINY_CONFIG["text_hidden"], intermediate_size=TINY_CONFIG["text_intermediate"],
                 num_hidden_layers=TINY_CONFIG["text_layers"], num_attention_heads=TINY_CONFIG["text_heads"]),
    # CompVis/stable-diffusion-v1-4 text_encoder/config.json (CLIP ViT-L/14 text tower)
    "sd-v1-4": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
}
VALUE_LAYER = {"tiny": get_preset("tiny").value_layer, "sd-v1-4": get_preset("sd-v1-4").value_layer}


def build_encoder(name: str, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                         **ENCODERS[name]))
    return model.eval()


def cake_requests(n: int) -> list[EditRequest]:
    import json

    rows = json.loads(CAKE.read_text(encoding="utf-8"))["single_edit"]
    rows = [rows[i % len(rows)] for i in range(n)]
    ids = [f"e{i:03d}" for i in range(n)]
    srcs = [r["edit_prompt"].format(r["entity"]) for r in rows]
    spans = {e.edit_id: ((e.start, e.end),) for e in dataset_entities(ids, srcs, [r["entity"] for r in rows])}
    return [EditRequest(i, s, r["target"], spans[i]) for i, s, r in zip(ids, srcs, rows)]


def time_one(name: str, requests: list[EditRequest], steps: int) -> dict:
    tok = load_tokenizer()
    model = build_encoder(name)
    block = TextEncoderAdapter(model).block(VALUE_LAYER[name])
    cfg = ValueConfig(lambda_visual=0.0, steps=steps, log_every=0)
    t0 = time.perf_counter()
    batched = compute_target_values_batched(tok, model, block, requests, cfg, batch_size=len(requests))
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    singles = [compute_target_values(tok, model, block, [r], cfg) for r in requests]
    t_single = time.perf_counter() - t0
    z_single = torch.cat([s.z for s in singles])
    diff = float((z_single - batched.z).abs().max() / batched.z.abs().max())
    res = {"encoder": name, "n_edits": len(requests), "steps": steps, "value_layer": VALUE_LAYER[name],
           "config": ENCODERS[name], "batched_s": t_batched, "per_edit_s": t_single,
           "speedup": t_single / t_batched, "max_rel_diff_z": diff}
    logger.info("%s: batched %.1f s, per-edit %.1f s, speed-up %.1f×, max rel diff %.1e",
                name, t_batched, t_single, res["speedup"], diff)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    reqs = cake_requests(args.edits)
    rows = [time_one(name, reqs, args.steps) for name in args.encoders]
    write_json(args.out, {"results": rows, "machine": {
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "device": "cpu"}})
    print("| encoder | edits | steps | batched (s) | per-edit (s) | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['encoder']} | {r['n_edits']} | {r['steps']} | {r['batched_s']:.1f} | "
              f"{r['per_edit_s']:.1f} | {r['speedup']:.1f}× |")


if __name__ == "__main__":
    main()
