"""GPU benchmark at SD-1.4 size (random weights built on the machine from the real configs; no download).

    python bench/bench_gpu.py [--out bench/results/gpu.json]        # one GPU, made to finish < 10 min
    python bench/bench_gpu.py --toy --out /tmp/gpu_toy.json          # CPU, toy scale (the test runs this)

Measures, in one run:
- generation images/s at 512² (PNDM, 50 steps, guidance 7.5): ``t2iedit.generate.generate_images`` at
  batch 1/8/16 in float32, float16 and bfloat16, against a naive per-prompt diffusers loop in float32
  (``pipe(prompt, generator=…)`` once per image) — the same prompts and seeds; the float32 batched
  images are compared with the naive ones (max |Δ| in 0..255);
- target values, 100 edits × 200 Adam steps with the visual loss (the UNet at 64² latents): the
  batched call (``compute_target_values_batched``, 32 edits per batch as params.yaml values.batch_size)
  vs once per edit; the per-edit side runs ``--per-edit-sample`` edits and is extrapolated linearly
  (recorded as such);
- key statistics (``collect_second_moment``, layers 0..10) tokens/s over COCO captions;
- peak GPU memory of each part (``torch.cuda.max_memory_allocated``).
Targets (issue 16): half-precision batched generation ≥ 3× the naive float32 loop in images/s;
batched values ≥ 5× per-edit. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_data (also when loaded by path)

from t2iedit.generate import SamplingConfig, generate_images, initial_latents  # noqa: E402
from t2iedit.keys import collect_second_moment  # noqa: E402
from t2iedit.models import (DTYPES, TextEncoderAdapter, build_sd14_pipeline, build_tiny_pipeline,  # noqa: E402
                            load_pipeline)
from t2iedit.storage import write_json  # noqa: E402
from bench_data import cake_requests  # noqa: E402

COCO = ROOT / "data" / "raw" / "coco" / "coco_30k.csv"
CAKE = ROOT / "data" / "raw" / "CAKE" / "CAKE.json"

FULL = dict(side=512, steps=50, images=16, batches=(1, 8, 16), naive_images=8, dtypes=("float32", "float16", "bfloat16"),
            edits=100, value_steps=200, value_batch=32, per_edit_sample=4, captions=2000, layers=list(range(11)))
TOY = dict(side=32, steps=2, images=4, batches=(1, 2), naive_images=2, dtypes=("float32", "float16"),
           edits=4, value_steps=2, value_batch=2, per_edit_sample=2, captions=16, layers=[0, 2, 4])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def prompts(n: int) -> list[str]:
    import pandas as pd

    return pd.read_csv(COCO)["prompt"].astype(str).tolist()[:n]


def naive_loop(pipe, items, cfg: SamplingConfig) -> np.ndarray:
    """The plain diffusers way: one call per prompt, its own generator; the initial noise is drawn
    exactly as ``generate_images`` draws it (so the images must agree)."""
    shape = (pipe.unet.config.in_channels, cfg.height // pipe.vae_scale_factor, cfg.width // pipe.vae_scale_factor)
    out = []
    for p, s in items:
        lat = initial_latents(s, shape).to(pipe.unet.device, pipe.unet.dtype)
        img = pipe(prompt=p, latents=lat, num_inference_steps=cfg.num_inference_steps,
                   guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width, output_type="np").images
        out.append((np.clip(img[0], 0, 1) * 255).round().astype(np.uint8))
    return np.stack(out)


def bench_generation(pipe, s: dict, device: torch.device, scratch: Path) -> dict:
    from PIL import Image

    cfg = SamplingConfig(num_inference_steps=s["steps"], guidance_scale=7.5, height=s["side"], width=s["side"])
    items = [(p, i) for i, p in enumerate(prompts(s["images"]))]
    res: dict = {"side": s["side"], "steps": s["steps"], "scheduler": type(pipe.scheduler).__name__, "runs": []}
    pipe.to(device=device, dtype=torch.float32)
    naive_items = items[:s["naive_images"]]
    naive_loop(pipe, naive_items[:1], SamplingConfig(1, 7.5, s["side"], s["side"]))  # warm-up
    peak_reset(device)
    sync(device)
    t = time.perf_counter()
    naive = naive_loop(pipe, naive_items, cfg)
    sync(device)
    dt = time.perf_counter() - t
    res["naive_float32"] = {"images": len(naive_items), "seconds": dt, "images_per_s": len(naive_items) / dt,
                            "peak_gib": peak_gib(device)}
    for dtype in s["dtypes"]:
        if device.type != "cuda" and dtype != "float32" and not s.get("cpu_half", False):
            res["runs"].append({"dtype": dtype, "skipped": "the CPU stays float32 (t2iedit.models.resolve_dtype)"})
            continue
        pipe.to(device=device, dtype=DTYPES[dtype])
        for batch in s["batches"]:
            root = scratch / f"{dtype}-b{batch}"
            generate_images(pipe, items[:batch], scratch / "warm", f"w{dtype}{batch}",
                            SamplingConfig(1, 7.5, s["side"], s["side"]), batch_size=batch, progress=False)
            peak_reset(device)
            sync(device)
            t = time.perf_counter()
            index = generate_images(pipe, items, root, "mh", cfg, batch_size=batch, progress=False)
            sync(device)
            dt = time.perf_counter() - t
            row = {"dtype": dtype, "batch": batch, "images": len(items), "seconds": dt,
                   "images_per_s": len(items) / dt, "peak_gib": peak_gib(device)}
            if dtype == "float32":
                ours = np.stack([np.asarray(Image.open(root / r)) for r in index.column("path").to_pylist()
                                 [:len(naive_items)]])
                row["max_abs_diff_vs_naive"] = int(np.abs(ours.astype(int) - naive.astype(int)).max())
            res["runs"].append(row)
    pipe.to(device=device, dtype=torch.float32)
    best_half = max((r["images_per_s"] for r in res["runs"] if r.get("dtype") != "float32" and "images_per_s" in r),
                    default=None)
    res["half_batched_vs_naive_float32"] = (best_half / res["naive_float32"]["images_per_s"]
                                            if best_half else None)
    res["target"] = "half-precision batched >= 3x the naive float32 per-prompt loop"
    return res


def bench_values(pipe, s: dict, device: torch.device, value_layer: int) -> dict:
    from t2iedit.values import (VisualInputs, compute_target_values, compute_target_values_batched,
                                ddpm_scheduler_for, generate_source_latents, weighted_config)

    reqs = cake_requests(CAKE, s["edits"])
    pipe.to(device=device, dtype=torch.float32)  # value optimisation: the text encoder stays float32
    lat = generate_source_latents(pipe, [r.edit_id for r in reqs], [r.source for r in reqs], 0, 1,
                                  num_inference_steps=min(s["steps"], 10), height=s["side"],
                                  width=s["side"])  # L_V's inputs (not timed): 10 steps are enough
    visual = VisualInputs(pipe.unet, ddpm_scheduler_for(pipe), lat.to(device))
    cfg = weighted_config(steps=s["value_steps"])  # the paper's α, λ (visual loss on)
    adapter = TextEncoderAdapter(pipe.text_encoder)
    block = adapter.block(value_layer)
    tok = pipe.tokenizer
    peak_reset(device)
    sync(device)
    t = time.perf_counter()
    compute_target_values_batched(tok, pipe.text_encoder, block, reqs, cfg, s["value_batch"], visual, value_layer)
    sync(device)
    batched = time.perf_counter() - t
    k = s["per_edit_sample"]
    sync(device)
    t = time.perf_counter()
    for i in range(k):
        compute_target_values(tok, pipe.text_encoder, block, reqs[i:i + 1], cfg,
                              VisualInputs(visual.unet, visual.noise_scheduler, visual.latents[i:i + 1]), value_layer)
    sync(device)
    per = (time.perf_counter() - t) * len(reqs) / k
    return {"edits": len(reqs), "steps": s["value_steps"], "visual_loss": True, "batch": s["value_batch"],
            "batched_s": batched, "per_edit_s_extrapolated": per, "per_edit_sample_edits": k,
            "batched_vs_per_edit": per / batched, "peak_gib": peak_gib(device), "target": "batched >= 5x per-edit"}


def bench_statistics(pipe, s: dict, device: torch.device) -> dict:
    adapter = TextEncoderAdapter(pipe.text_encoder)
    texts = prompts(s["captions"])
    tok = pipe.tokenizer
    n_tokens = sum(len(i) for i in tok(texts, truncation=True, max_length=77)["input_ids"])
    pipe.text_encoder.to(device=device, dtype=torch.float32)
    peak_reset(device)
    sync(device)
    t = time.perf_counter()
    m = collect_second_moment(adapter, tok, texts, s["layers"], batch_size=64, progress=False)
    sync(device)
    dt = time.perf_counter() - t
    assert all(v.count == n_tokens for v in m.values())
    return {"captions": len(texts), "tokens": n_tokens, "layers": s["layers"], "seconds": dt,
            "tokens_per_s": n_tokens / dt, "peak_gib": peak_gib(device)}


PARTS = ("generation", "values", "statistics")  # what --parts picks from, in this order by default


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="CPU toy scale: the tiny pipeline, a few images and steps")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    ap.add_argument("--parts", default=",".join(PARTS))
    a = ap.parse_args(argv)
    unknown = set(a.parts.split(",")) - set(PARTS)
    if unknown:
        ap.error(f"--parts: unknown {sorted(unknown)} ({', '.join(PARTS)})")
    s = TOY if a.toy else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not a.toy else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    import tempfile

    start = time.perf_counter()
    result: dict = {"toy": a.toy, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "platform": platform.platform(),
                    "model": "tiny preset (random)" if a.toy else "SD-1.4 architecture, random weights (seed 0)"}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        if a.toy:
            pipe, value_layer = load_pipeline(build_tiny_pipeline(Path(tmp) / "tiny")), 4
        else:
            pipe, value_layer = build_sd14_pipeline(None, seed=0, device=device), 10
        benches = {"generation": lambda: bench_generation(pipe, s, device, Path(tmp) / "images"),
                   "values": lambda: bench_values(pipe, s, device, value_layer),
                   "statistics": lambda: bench_statistics(pipe, s, device)}
        for part in a.parts.split(","):
            result[part] = benches[part]()
            print(json.dumps(result[part]), flush=True)
            # written after each part: a run stopped at the device's time limit keeps what it measured
            write_json(a.out, {**result, "finished": False, "wall_s": time.perf_counter() - start})
    result["finished"] = True
    result["wall_s"] = time.perf_counter() - start
    write_json(a.out, result)
    print(f"wrote {a.out} in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
