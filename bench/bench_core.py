"""Benchmark of the editing core at SD 1.4's text-encoder size (random weights, no download).

    python bench/bench_core.py [--captions 256] [--batch-size 64] [--round-size 128] [--repeats 3] [--out ...]

Measures, in one run on this machine:
- key collection (second moments of fc2 inputs, layers 0..10) on COCO captions: our collector
  (length-sorted batches of equal-length prompts, no padding, forward stopped at layer 10's fc2 input, each
  distinct token prefix's key once with its count, keys buffered per layer up to 4,096 rows, one
  float32 SYRK per buffer, merged in float64) vs a naive one (every prompt padded to 77, full 12-layer forward, every token's
  float64 ``kᵀk`` update), producing the same moments (max relative difference reported); forward and
  moment-update time are reported separately (ours' moment update includes gathering the kept keys
  into its buffer; the naive side's mask gather counts as forward);
- the null-space projector of one layer (3072 × 3072 eigh, float64);
- the closed-form solve (paper eq. 7) for 100 and 1,000 edits over 11 layers (projector excluded);
- peak RSS.
Not a test: numbers depend on the machine and its load (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import t2iedit.keys as keys_mod  # noqa: E402
from t2iedit.storage import write_json  # noqa: E402
from t2iedit.keys import SecondMoment, collect_second_moment  # noqa: E402
from t2iedit.models import TextEncoderAdapter, load_tokenizer  # noqa: E402
from t2iedit.projector import null_space_projector  # noqa: E402
from t2iedit.solve import null_space_update  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco" / "coco_30k.csv"
LAYERS = list(range(11))  # EMCID's edited layers of SD 1.4 (value layer 10)

# CLIP ViT-L/14 text encoder as configured in CompVis/stable-diffusion-v1-4/text_encoder/config.json
SD14_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                        projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)


class _TimedMoment(SecondMoment):
    """SecondMoment that adds up the time spent in ``update`` (the moment-update share of a run)."""

    seconds = 0.0

    def update(self, keys, *args, **kwargs):
        start = time.perf_counter()
        out = super().update(keys, *args, **kwargs)
        _TimedMoment.seconds += time.perf_counter() - start
        return out


class _TimedKeyBuffer(keys_mod._KeyBuffer):
    """Our collector's key buffer, timed as moment update (buffering, float32 SYRKs, float64 merges
    and the final mirror; ``fold`` runs only inside ``add`` and ``moments``)."""

    def add(self, *args, **kwargs):
        start = time.perf_counter()
        super().add(*args, **kwargs)
        _TimedMoment.seconds += time.perf_counter() - start

    def moments(self, *args, **kwargs):
        start = time.perf_counter()
        out = super().moments(*args, **kwargs)
        _TimedMoment.seconds += time.perf_counter() - start
        return out


class _NaiveMoment(_TimedMoment):
    """The straightforward update: every key cast to float64, ``Σ += kᵀk`` (the full product)."""

    def update(self, keys):
        start = time.perf_counter()
        k = keys.detach().to(torch.float64)
        self.sum.addmm_(k.T, k)
        self.count += k.shape[0]
        _TimedMoment.seconds += time.perf_counter() - start
        return self


def naive_collect(adapter, tokenizer, texts, layers, batch_size):
    """The straightforward collector: pad every prompt to 77, run all 12 layers, mask padding."""
    moments = {layer: _NaiveMoment(adapter.layer(layer).in_features) for layer in layers}
    with torch.inference_mode(), adapter.capture(layers) as rec:
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(texts[s:s + batch_size], padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt")
            adapter.run(**enc)
            mask = enc["attention_mask"].bool()
            for layer in layers:
                moments[layer].update(rec["keys"][layer][mask])
    return moments


def _blas_threads() -> dict:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {}
    return {Path(i["filepath"]).name: i["num_threads"] for i in threadpool_info()}


def timed(fn, *args, **kwargs):
    _TimedMoment.seconds = 0.0
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    total = time.perf_counter() - start
    return out, total, _TimedMoment.seconds


def _interleaved(adapter, tokenizer, texts, round_size, batch_size, naive_first=False):
    """Both collectors over ``texts`` in rounds of ``round_size`` captions, interleaved: (our merged
    moments, the naive ones, the seconds of each side and of its moment update)."""
    moments = {"ours": {}, "naive": {}}
    times = {"ours_s": 0.0, "naive_s": 0.0, "ours_moment_update_s": 0.0, "naive_moment_update_s": 0.0}
    sides = {"ours": lambda chunk: collect_second_moment(adapter, tokenizer, chunk, LAYERS,
                                                         batch_size=batch_size, progress=False),
             "naive": lambda chunk: naive_collect(adapter, tokenizer, chunk, LAYERS, batch_size)}
    order = ["naive", "ours"] if naive_first else ["ours", "naive"]
    for s in range(0, len(texts), round_size):
        chunk = texts[s:s + round_size]
        for side in order:
            part, t, u = timed(sides[side], chunk)
            times[f"{side}_s"] += t
            times[f"{side}_moment_update_s"] += u
            acc = moments[side]
            moments[side] = {l: acc[l].merge(part[l]) if l in acc else part[l] for l in LAYERS}
    return moments["ours"], moments["naive"], times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--round-size", type=int, default=128, help="captions per interleaved round")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the captions (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    ap.add_argument("--skip-projector-solve", action="store_true", help="key collection only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "core.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:  # scipy's BLAS (our CPU float32 SYRK) has its own thread pool, limited only once loaded
        import scipy.linalg.blas  # noqa: F401
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass

    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**SD14_TEXT_CONFIG)).eval()
    adapter = TextEncoderAdapter(model)
    tokenizer = load_tokenizer()
    texts = pd.read_csv(COCO)["prompt"].astype(str).tolist()[: args.captions]
    n_tokens = sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=77)["input_ids"])
    result: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "blas_threads": _blas_threads(),
                    "load_average_start": os.getloadavg()},
        "model": "CLIPTextModel, SD 1.4 text-encoder config, random weights (seed 0)",
    }

    # ---- key collection: ours vs naive (same captions, same moment update) ----
    # Interleaved rounds: both collectors run under the same load; each round's moments are merged
    # (SecondMoment.merge), as workers' would be. The whole pass runs --repeats times, the order of the
    # two sides alternating per repeat; the ratio reported is the median over repeats (min and max kept).
    keys_mod.SecondMoment = _TimedMoment  # time the update inside our collector too
    key_buffer = keys_mod._KeyBuffer
    keys_mod._KeyBuffer = _TimedKeyBuffer
    runs = []
    try:
        for rep in range(args.repeats):
            ours, naive, times = _interleaved(adapter, tokenizer, texts, args.round_size, args.batch_size,
                                              naive_first=bool(rep % 2))
            times["speedup_end_to_end"] = times["naive_s"] / times["ours_s"]
            runs.append(times)
            print(f"repeat {rep}: ours {times['ours_s']:.1f} s, naive {times['naive_s']:.1f} s, "
                  f"{times['speedup_end_to_end']:.2f}x", flush=True)
    finally:
        keys_mod.SecondMoment = SecondMoment
        keys_mod._KeyBuffer = key_buffer
    max_rel_diff = max(float((ours[l].moment() - naive[l].moment()).norm() / naive[l].moment().norm())
                       for l in LAYERS)
    # entrywise: the largest entry error relative to the largest entry (the projector's eigh sees both)
    max_entry_diff = max(float((ours[l].moment() - naive[l].moment()).abs().max()
                               / naive[l].moment().abs().max()) for l in LAYERS)
    assert all(ours[l].count == naive[l].count == n_tokens for l in LAYERS)
    # the median repeat (the lower of the two middle ones for an even count: no rounding up)
    med = sorted(runs, key=lambda r: r["speedup_end_to_end"])[(len(runs) - 1) // 2]
    ratios = [r["speedup_end_to_end"] for r in runs]
    result["key_collection"] = {
        "captions": len(texts), "tokens": n_tokens, "mean_tokens_per_caption": n_tokens / len(texts),
        "layers": LAYERS, "batch_size": args.batch_size, "round_size": args.round_size,
        "repeats": runs,
        # the median repeat's numbers (both sides from the same repeat)
        "ours_s": med["ours_s"], "naive_s": med["naive_s"],
        "ours_tokens_per_s": n_tokens / med["ours_s"], "naive_tokens_per_s": n_tokens / med["naive_s"],
        "speedup_end_to_end": med["speedup_end_to_end"],
        "speedup_end_to_end_min": min(ratios), "speedup_end_to_end_max": max(ratios),
        "ours_moment_update_s": med["ours_moment_update_s"],
        "naive_moment_update_s": med["naive_moment_update_s"],
        "ours_forward_s": med["ours_s"] - med["ours_moment_update_s"],
        "naive_forward_s": med["naive_s"] - med["naive_moment_update_s"],
        "speedup_forward": ((med["naive_s"] - med["naive_moment_update_s"])
                            / (med["ours_s"] - med["ours_moment_update_s"])),
        # load-independent: token positions × transformer layers each collector pushes through the model
        # (ours batches equal-length prompts: the positions it forwards are the real tokens)
        "forward_work_ratio": (len(texts) * 77 * 12) / (n_tokens * 11),
        "max_relative_moment_difference": max_rel_diff,  # max over layers of ||C_ours - C_naive||_F / ||C_naive||_F
        "max_entry_difference_relative_to_max_entry": max_entry_diff,
        "target": ">= 5x (median over repeats)",
        "ours": ("equal-length batches (no padding), stop after layer 10, prefix dedup, keys buffered "
                 "to 4096 rows, float32 SYRK per buffer merged in float64"),
        "naive": "pad to 77, 12 layers, float64 k^T k per batch",
    }
    print(json.dumps(result["key_collection"], indent=1), flush=True)

    if args.skip_projector_solve:
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["machine"]["load_average_end"] = os.getloadavg()
        write_json(args.out, result)
        print(f"wrote {args.out}")
        return

    # ---- projector of one layer (3072 x 3072 eigh, float64) ----
    C0 = ours[LAYERS[-1]].moment()
    start = time.perf_counter()
    proj = null_space_projector(C0, "rank", 2048)
    t_proj = time.perf_counter() - start
    result["projector"] = {"dim": C0.shape[0], "seconds_per_layer": t_proj,
                           "seconds_11_layers_estimate": 11 * t_proj}
    print(json.dumps(result["projector"]), flush=True)

    # ---- closed-form solve (eq. 7), 11 layers, projector excluded ----
    g = torch.Generator().manual_seed(0)
    result["solve"] = {}
    for n in (100, 1000):
        K1 = torch.rand(n, 3072, generator=g, dtype=torch.float64)  # fc2 inputs are mostly >= 0
        R = torch.randn(n, 768, generator=g, dtype=torch.float64)
        start = time.perf_counter()
        for _layer in LAYERS:
            delta = null_space_update(K1, R, proj.P)  # (768, 3072)
        t = time.perf_counter() - start
        result["solve"][str(n)] = {"edits": n, "layers": len(LAYERS), "seconds": t,
                                   "form": "push_through (n < d_in)", "target": "< 60 s",
                                   "delta_shape": list(delta.shape)}
        print(json.dumps(result["solve"][str(n)]), flush=True)

    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["machine"]["load_average_end"] = os.getloadavg()
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
