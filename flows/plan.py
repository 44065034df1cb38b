"""``python -m flows.plan``: the UNet evaluations a params set costs, per stage and method, without
loading a model.

    python -m flows.plan [--params params.yaml] [--paper cake|timed|road] [-S key=value ...]

Reads params.yaml (``--paper TABLE``: overlaid with ``scripts/paper.py``'s settings of that table, the
paper protocol; ``-S``: further dotted overrides, YAML values) and the dataset files under data/raw,
and prints, per stage and method, the images, the per-image UNet forwards (``sample_forwards``:
images × steps × 2 under classifier-free guidance, plus the visual loss's forwards of the value
optimisation) and the batched UNet calls — counted with ``t2iedit.protocol``, the functions the
generate stage builds its work list with. Two columns: ``today`` without any sharing (every method
generates all of its (text, seed) pairs, compare regenerates the unedited/oracle images and every
visual method's source latents: the state issue 16 measured, 8.45 M sample-forwards for the CAKE
protocol) and ``shared``: what the stages generate now, each distinct (model, text, seed, sampling)
image once (:func:`plan`).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import yaml

from flows.stage import PARAMS_FILE, read_params
from t2iedit import protocol

REPO = Path(__file__).resolve().parents[1]
RAW = REPO / "data" / "raw"


def flat(params: dict[str, Any]) -> dict[str, Any]:
    """``{"generate": {"seeds": …}}`` → ``{"generate.seeds": …}`` (one level, as ``dvc exp run -S``)."""
    return {f"{sec}.{k}": v for sec, body in params.items() if isinstance(body, dict) for k, v in body.items()}


def paper_settings(table: str) -> dict[str, Any]:
    """``scripts/paper.py``'s ``settings(table)`` (the paper protocol's params overrides)."""
    spec = importlib.util.spec_from_file_location("_paper", REPO / "scripts" / "paper.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.settings(table)


def dataset(s: dict[str, Any]):
    """(single edits, evaluation prompts) of ``datasets.name``/``split``; ``datasets.max_edits``: the
    first N single edits and their prompts (the composite partners the dataset stage adds are not
    counted: a plan of a capped run is a lower bound)."""
    from t2iedit.edit_data.benchmarks import load_cake, load_road, load_timed

    name = s.get("datasets.name", "cake")
    loaders = {"timed": load_timed, "road": load_road, "cake": load_cake}
    if name not in loaders:
        raise SystemExit(f"flows.plan: datasets.name {name!r} is not a benchmark ({', '.join(loaders)})")
    es = loaders[name](RAW, s.get("datasets.split", "test"))
    edits, ep = es.edits.to_pandas(), es.eval_prompts.to_pandas()
    singles = edits[edits["kind"] == "single"] if "kind" in edits else edits
    cap = s.get("datasets.max_edits")
    if cap is not None:
        singles = singles.head(int(cap))
        if "edit_id" in ep:
            ep = ep[ep["edit_id"].isin(set(singles["edit_id"]))]
    return singles, ep


def main_config(s: dict[str, Any]):
    """``t2iedit.methods.compare.main_run_config`` of the params set's ``values`` / ``edit`` sections,
    validated (and defaulted) as the values and edit stages validate them."""
    from flows.edit import EditParams
    from flows.values import ValuesParams
    from t2iedit.methods.compare import main_run_config

    section = lambda name: {k.partition(".")[2]: v for k, v in s.items() if k.startswith(name + ".")}  # noqa: E731
    return main_run_config(ValuesParams(**section("values")).model_dump(mode="json"),
                           EditParams(**section("edit")).model_dump(mode="json"), s.get("model.preset", "tiny"))


def plan(s: dict[str, Any], share: bool, data=None) -> list[dict[str, Any]]:
    """Rows ``{stage, method, images, sample_forwards, unet_calls}`` of the params set ``s`` (dotted keys).

    ``share`` False: every method generates all of its own (text, seed) pairs (the state issue 16
    measured); True: what the stages generate — each distinct (model, text, seed, sampling) image once
    (``t2iedit.protocol.Ledger``: generate's oracle/reference images that are unedited images already,
    compare's images the main run or an earlier compared method of the same model holds, compare's
    ``ours`` = the main run's edit when its resolved config is the main run's). ``data``: (single edits,
    evaluation prompts) instead of the dataset files of ``datasets.name``."""
    from t2iedit.methods import build_config, get_method
    from t2iedit.methods.compare import shares_main_edit
    from t2iedit.models import get_preset

    pre = get_preset(s.get("model.preset", "tiny"))
    singles, ep = data if data is not None else dataset(s)
    n_edits = len(singles)
    steps = s.get("generate.num_inference_steps") or pre.num_inference_steps
    guidance = s.get("generate.guidance_scale", pre.guidance_scale)
    gbatch = int(s.get("generate.batch_size", 8))
    rows: list[dict[str, Any]] = []
    ledger = protocol.Ledger()

    def gen(stage: str, method: str, n: int, st: int = steps, g: float = guidance, batch: int = gbatch):
        rows.append({"stage": stage, "method": method, "images": n,
                     "sample_forwards": protocol.sample_forwards(n, st, g),
                     "unet_calls": protocol.unet_calls(n, st, batch)})

    ref_images = int(s.get("generate.reference_images", protocol.CAKE_REFERENCE_IMAGES))
    for m in s.get("generate.methods", ["edited", "unedited", "oracle"]):
        items = protocol.generation_items(ep, m, s.get("generate.seeds", [0]), ref_images)
        new = ledger.new("main", protocol.MODEL_IDENTITY[m], (steps, guidance), items)
        gen("generate", m, len(new) if share else len(items))
    visual_main = float(s.get("values.lambda_visual", 0.01)) > 0
    latent_steps = s.get("values.latent_steps") or pre.num_inference_steps
    n_lat = n_edits * int(s.get("values.latent_images", 1))
    vbatch = int(s.get("values.batch_size", 32))
    batches = [min(vbatch, n_edits - i) for i in range(0, n_edits, vbatch)]
    if visual_main:
        gen("values", "source latents", n_lat, st=latent_steps, g=pre.guidance_scale)
        rows.append({"stage": "values", "method": f"ours ({s.get('values.steps', 50)} Adam steps)", "images": 0,
                     "sample_forwards": protocol.value_forwards(n_edits, int(s.get("values.steps", 50)), True),
                     "unet_calls": protocol.value_calls(batches, int(s.get("values.steps", 50)), True)})
    csamp = s.get("compare.sampling") or {}
    csteps = csamp.get("num_inference_steps") or pre.num_inference_steps
    cguid = csamp.get("guidance_scale") or pre.guidance_scale
    cbatch = int(s.get("compare.batch_size", 8))
    reuse = share and s.get("compare.reuse_main", True)
    main_cfg = main_config(s) if reuse else None
    for name in s.get("compare.methods", []):
        method = get_method(name)
        config = build_config(method, (s.get("compare.method_params") or {}).get(name))
        main_edit = reuse and shares_main_edit(method, config, main_cfg, pre.name)
        values = getattr(config, "values", None)
        if values is not None and values.lambda_visual > 0 and not main_edit:
            lsteps = getattr(config, "latent_steps", None) or pre.num_inference_steps
            main_latents = (reuse and visual_main and getattr(config, "latent_seed", 0) == s.get("values.seed", 0)
                            and getattr(config, "latent_images", 1) == int(s.get("values.latent_images", 1))
                            and lsteps == latent_steps)
            if not main_latents:
                gen("compare/latents", name, n_edits * getattr(config, "latent_images", 1), st=lsteps,
                    g=pre.guidance_scale)
            vb_size = getattr(config, "value_batch_size", vbatch)
            vb = [min(vb_size, n_edits - i) for i in range(0, n_edits, vb_size)]
            rows.append({"stage": "compare/values", "method": name, "images": 0,
                         "sample_forwards": protocol.value_forwards(n_edits, values.steps, True),
                         "unet_calls": protocol.value_calls(vb, values.steps, True)})
        items = protocol.generation_items(ep, "oracle" if getattr(method, "oracle_prompts", False) else "edited",
                                          s.get("compare.seeds", [0]))
        identity = "edited" if main_edit else "unedited" if name in ("unedited", "oracle") else f"compare:{name}"
        new = ledger.new("compare", identity, (csteps, cguid), items, also=("main",) if reuse else ())
        gen("compare/generate", name, len(new) if share else len(items), st=csteps, g=cguid, batch=cbatch)
    if s.get("fid.n_captions"):
        fs = s.get("fid.sampling") or {}
        gen("fid", s.get("fid.method", "edited"), int(s["fid.n_captions"]),
            st=fs.get("num_inference_steps") or pre.num_inference_steps,
            g=fs.get("guidance_scale", pre.guidance_scale), batch=int(s.get("fid.batch_size", 8)))
    return rows


def report(s: dict[str, Any], with_fid: bool = True) -> tuple[str, dict[str, int]]:
    """The markdown table (today vs shared, per stage and method) and the totals."""
    if not with_fid:
        s = {**s, "fid.n_captions": 0}
    today, shared = plan(s, share=False), plan(s, share=True)
    key = lambda r: (r["stage"], r["method"])  # noqa: E731
    after = {key(r): r for r in shared}
    out = ["| stage | method | images | sample-forwards today | shared | UNet calls today | shared |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in today:
        a = after.get(key(r), {"sample_forwards": 0, "unet_calls": 0})
        out.append(f"| {r['stage']} | {r['method']} | {r['images']:,} | {r['sample_forwards']:,} | "
                   f"{a['sample_forwards']:,} | {r['unet_calls']:,} | {a['unet_calls']:,} |")
    tot = {"sample_forwards_today": sum(r["sample_forwards"] for r in today),
           "sample_forwards_shared": sum(r["sample_forwards"] for r in shared),
           "unet_calls_today": sum(r["unet_calls"] for r in today),
           "unet_calls_shared": sum(r["unet_calls"] for r in shared),
           "compare_sample_forwards_today": sum(r["sample_forwards"] for r in today
                                                if r["stage"].startswith("compare"))}
    out.append(f"| **total** | | | **{tot['sample_forwards_today']:,}** | **{tot['sample_forwards_shared']:,}** "
               f"| **{tot['unet_calls_today']:,}** | **{tot['unet_calls_shared']:,}** |")
    ratio = tot["sample_forwards_shared"] / max(tot["sample_forwards_today"], 1)
    out += ["", f"shared / today = {ratio:.1%} of the sample-forwards; compare is "
            f"{tot['compare_sample_forwards_today'] / max(tot['sample_forwards_today'], 1):.0%} of today's."]
    return "\n".join(out), tot


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"flows.plan: -S expects section.key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=PARAMS_FILE)
    ap.add_argument("--paper", choices=["cake", "timed", "road"], help="overlay the paper protocol of a table")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-fid", action="store_true", help="leave the FID stage out")
    a = ap.parse_args(argv)
    s = copy.deepcopy(flat(read_params(a.params)))
    if a.paper:
        s.update(paper_settings(a.paper))
    s.update(parse_overrides(a.set))
    table, _ = report(s, with_fid=not a.no_fid)
    print(f"# UNet evaluations of {a.params}" + (f" + the paper protocol ({a.paper})" if a.paper else ""))
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
