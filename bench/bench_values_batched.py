"""Batched vs per-edit target-value optimisation: wall time for 100 edits, same run, same settings.

Both sides call the library the way the pipeline could: ``compute_target_values`` once with all edits
(one padded forward/backward per step over edits × templates) versus once per edit in a Python loop.
Each step runs only the encoder blocks after the value layer, from states cached once (issue 4); the
batched side is also timed with the full-forward path (every step runs the whole encoder with δ hooked
in at the value layer — what the library does for encoders without a known tail, and did for all
before issue 4), to measure what the tail-only forward saves. ``setup`` is the same call with 0 steps (tokenisation,
z0, targets, cached states, initial and final loss): the rest of a call is the steps, and
``step_ratio`` = per-edit step time / batched step time is the ratio a long run (200 steps) tends to;
``tail_step_speedup`` likewise compares the steps of the two batched paths (same setup).

Text-only mode (λ = 0; the UNet is not involved), the same number of Adam steps on all sides, the CAKE
facts as prompts (entities from the dataset). Encoders: the tiny preset's CLIP text encoder and a CLIP
text encoder with Stable Diffusion 1.4's configuration (ViT-L/14: 12 layers, 768 wide, value layer 10),
both with random weights (speed does not depend on the weights). ``--threads 1 2`` repeats everything
per torch intra-op thread count (1 is the default: the fastest for the small per-edit matmuls on a
loaded 2-core machine, and what the other benchmarks use).

20 steps by default (5 until issue 4): with the tail-only forward a step of the full-size encoder takes
~1.5 s against ~18 s of setup, so 5 steps left the step times within timing noise.

Run: ``python bench/bench_values_batched.py [--edits 100] [--steps 20] [--threads 1 2]``
→ bench/results/values_batched.json.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import time
from pathlib import Path
from unittest import mock

import torch

from t2iedit import values
from t2iedit.storage import write_json
from t2iedit.models import TINY_CONFIG, TextEncoderAdapter, get_preset, load_tokenizer
from t2iedit.prompts import EditRequest
from t2iedit.values import ValueConfig, compute_target_values, compute_target_values_batched, prepare_rows

from bench_data import cake_requests

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


@contextlib.contextmanager
def full_forward():
    """The library's path for encoders without a known tail: every step runs the whole encoder."""
    with mock.patch.object(values, "encoder_tail", lambda model, block: None):
        yield


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def time_one(name: str, requests: list[EditRequest], steps: int, threads: int, reference: bool) -> dict:
    torch.set_num_threads(threads)
    tok = load_tokenizer()
    model = build_encoder(name)
    block = TextEncoderAdapter(model).block(VALUE_LAYER[name])
    cfg = ValueConfig(lambda_visual=0.0, steps=steps, log_every=0)
    setup = ValueConfig(lambda_visual=0.0, steps=0, log_every=0)
    batch = lambda c: compute_target_values_batched(tok, model, block, requests, c, batch_size=len(requests))  # noqa: E731
    single = lambda c: [compute_target_values(tok, model, block, [r], c) for r in requests]  # noqa: E731
    compute_target_values(tok, model, block, requests[:1], cfg)  # warm-up (lazy inits), not timed
    t_batched, batched = timed(lambda: batch(cfg))
    t_setup, _ = timed(lambda: batch(setup))
    t_single, singles = timed(lambda: single(cfg))
    t_single_setup, _ = timed(lambda: single(setup))
    mask = prepare_rows(tok, model, requests, cfg.templates, sd_conditioning=False).attention_mask
    res = {"encoder": name, "threads": threads, "n_edits": len(requests), "steps": steps,
           "value_layer": VALUE_LAYER[name], "config": ENCODERS[name],
           "rows": int(mask.shape[0]), "padded_length": int(mask.shape[1]),
           "real_token_fraction": float(mask.float().mean()),
           "batched_s": t_batched, "batched_setup_s": t_setup, "per_edit_s": t_single,
           "per_edit_setup_s": t_single_setup, "speedup": t_single / t_batched,
           "step_ratio": (t_single - t_single_setup) / (t_batched - t_setup),
           "max_rel_diff_z": rel_diff(torch.cat([s.z for s in singles]), batched.z)}
    if reference:
        with full_forward():
            t_full, full = timed(lambda: batch(cfg))
        res.update(batched_full_forward_s=t_full, tail_speedup=t_full / t_batched,
                   tail_step_speedup=(t_full - t_setup) / (t_batched - t_setup),
                   max_rel_diff_z_full_forward=rel_diff(full.z, batched.z))
    logger.info("%s, %d thread(s): batched %.1f s (setup %.1f s), per-edit %.1f s (setup %.1f s), ratio %.1f×, "
                "steps only %.1f×; full-forward batched %s", name, threads, t_batched, t_setup, t_single,
                t_single_setup, res["speedup"], res["step_ratio"],
                f"{res['batched_full_forward_s']:.1f} s" if reference else "not run")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the batched full-forward timing")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    reqs = cake_requests(CAKE, args.edits)
    rows = [time_one(name, reqs, args.steps, t, args.reference) for name in args.encoders for t in args.threads]
    write_json(args.out, {"results": rows, "machine": {
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "device": "cpu"}})
    print("| encoder | threads | edits | steps | batched (s) | setup | per-edit (s) | setup | ratio | steps only "
          "| batched, full forward (s) | tail speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        full = (f"{r['batched_full_forward_s']:.1f} | {r['tail_speedup']:.1f}×"
                if "tail_speedup" in r else "– | –")
        print(f"| {r['encoder']} | {r['threads']} | {r['n_edits']} | {r['steps']} | {r['batched_s']:.1f} | "
              f"{r['batched_setup_s']:.1f} | {r['per_edit_s']:.1f} | {r['per_edit_setup_s']:.1f} | "
              f"{r['speedup']:.1f}× | {r['step_ratio']:.1f}× | {full} |")


if __name__ == "__main__":
    main()
