"""The ``t2iedit`` command line: continual editing of a model with a user's files of facts.

    t2iedit edit facts.csv [--preset tiny] [--store DIR] [--method ours]
    t2iedit list [--facts] [--json]
    t2iedit revert EDIT_ID
    t2iedit export OUT_DIR
    t2iedit generate "a prompt" [--seed 0] [--out image.png]

Every command works on a *store* (``--store``, default ``$T2IEDIT_HOME/<preset>``, ``T2IEDIT_HOME``
defaulting to ``~/.t2iedit``): a :class:`t2iedit.continual.ContinualState` folder holding the base
model's identity, the applied edit batches (ΔW, keys, facts, manifests) and cached preserved-key
statistics. The first ``edit`` creates it on ``--preset``; later commands read the preset and model
source from it and refuse another base model. For the ``tiny`` preset the base pipeline is built once
into ``<store>/base-model`` from ``--seed``.

``edit`` runs the method end to end on the current edited model: preserved-key statistics of the base
model over COCO captions (cached), null-space projector, entities (the file's ``entity`` column, else
the offline heuristic NER), target values (text-only by default; ``--visual`` adds the UNet loss), then
AlphaEdit's sequential closed-form solve with the keys of all earlier batches (METHOD.md §6).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from t2iedit.continual import (BaseModelMismatch, ContinualEditor, ContinualState, StoreError, base_model_of,
                               preserved_stats)
from t2iedit.edit_data import DatasetError, coco_captions, load_user_edits
from t2iedit.edit import MemitSolver
from t2iedit.storage import write_json
from t2iedit.models import PRESETS, TextEncoderAdapter, build_tiny_pipeline, get_preset, load_pipeline
from t2iedit.prompts import EditRequest

logger = logging.getLogger(__name__)

app = typer.Typer(name="t2iedit", no_args_is_help=True, add_completion=False,
                  help="Continual knowledge editing of text-to-image diffusion models (edit, list, revert, "
                       "export, generate).")
err = Console(stderr=True)
out = Console()

METHOD_CHOICES = ("ours", "ours-no-projector", "emcid")
NER_CHOICES = ("auto", "heuristic", "file", "hf", "none")
EMCID_LAMBDA = 4000.0  # EMCID's λ on C0 (TIMED); METHOD.md §7
REPO_ROOT = Path(__file__).resolve().parents[1]
COCO_CANDIDATES = (REPO_ROOT / "data" / "raw" / "coco" / "coco_30k.csv",
                   REPO_ROOT.parent / "shared" / "data" / "coco" / "coco_30k.csv")
FID_HOLDOUT = 5000  # the first 5,000 COCO captions are the FID-5K prompts: never preserved keys


class CliError(Exception):
    """A user-facing error (message printed, exit code 1)."""


def _handle_errors(fn):
    """Print the known error kinds as one clear line on stderr and exit non-zero."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DatasetError, StoreError, BaseModelMismatch, CliError, FileNotFoundError) as e:
            kind = {DatasetError: "bad edit file", BaseModelMismatch: "base model mismatch"}.get(type(e), "error")
            err.print(f"[bold red]{kind}:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    return wrapper


# --------------------------------------------------------------------------------------------------
# Store, model and progress helpers
# --------------------------------------------------------------------------------------------------
def home() -> Path:
    return Path(os.environ.get("T2IEDIT_HOME", Path.home() / ".t2iedit")).expanduser()


def store_dir(store: Optional[Path], preset: Optional[str]) -> Path:
    return Path(store).expanduser().resolve() if store else home() / (preset or "tiny")


@dataclass
class Session:
    """A loaded model bound to its store."""

    folder: Path
    preset: str
    source: str
    revision: Optional[str]
    pipe: object
    adapter: TextEncoderAdapter
    editor: ContinualEditor

    @property
    def state(self) -> ContinualState:
        return self.editor.state


def _model_source(folder: Path, preset_name: str, source: Optional[str], seed: int) -> tuple[str, Optional[str]]:
    preset = get_preset(preset_name)
    if source:
        path = Path(source).expanduser()
        return (str(path.resolve()) if path.exists() else source), (None if path.exists() else preset.revision)
    if preset.tiny:
        base = folder / "base-model"
        if not (base / "model_index.json").exists():
            build_tiny_pipeline(base, seed=seed)
        return str(base), None
    return preset.repo_id, preset.revision


def _device(device: Optional[str]) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def open_session(store: Optional[Path], preset: Optional[str], source: Optional[str] = None, seed: int = 0,
                 device: Optional[str] = None, create: bool = False) -> Session:
    """Open (or with ``create`` make) the store and load its base model with the edits applied.

    ``preset``/``source`` given for an existing store must agree with it (else
    :class:`BaseModelMismatch`); the loaded weights are checked against the store's base hash.
    """
    folder = store_dir(store, preset)
    exists = (folder / "state.json").exists()
    if not exists and not create:
        raise StoreError(f"{folder}: no edits yet (no continual-editing store); run `t2iedit edit FILE` first"
                         + ("" if store else " or pass --store"))
    state = ContinualState.open(folder) if exists else None
    if state is not None:
        stored = state.settings.get("preset")
        if preset is not None and stored != preset:
            raise BaseModelMismatch(f"the edits in {folder} were made on base model {stored!r} "
                                    f"({state.base.describe()}), refusing to use them with preset {preset!r}")
        preset = stored
        seed = int(state.settings.get("seed", seed))
        source = source or state.settings.get("source")
    preset = preset or "tiny"
    if preset not in PRESETS:
        raise CliError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = get_preset(preset)
    src, revision = _model_source(folder, preset, source, seed)
    pipe = load_pipeline(src, revision)
    pipe.to(_device(device))
    adapter = TextEncoderAdapter(pipe.text_encoder, p.text_layer_template, p.text_block_template)
    if state is None:
        state = ContinualState.create(folder, base_model_of(adapter, preset, p.revision),
                                      {"preset": preset, "source": src, "seed": seed,
                                       "edit_layers": list(p.edit_layers), "value_layer": p.value_layer})
    editor = ContinualEditor(state, adapter, {"text_encoder": pipe.text_encoder})
    return Session(folder, preset, src, revision, pipe, adapter, editor)


@contextlib.contextmanager
def progress() -> Iterator[Progress]:
    with Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=False) as bar:
        yield bar


@contextlib.contextmanager
def stage(bar: Progress, description: str, total: int = 1) -> Iterator[int]:
    task = bar.add_task(description, total=total)
    yield task
    bar.update(task, completed=total)


def _coco(corpus: Optional[Path]) -> Path:
    if corpus is not None:
        if not Path(corpus).exists():
            raise CliError(f"{corpus}: corpus file not found")
        return Path(corpus)
    for path in COCO_CANDIDATES:
        if path.exists():
            return path
    raise CliError(f"no COCO caption file at {[str(p) for p in COCO_CANDIDATES]}; pass --corpus")


def _requests(edit_set, ner: str) -> list[EditRequest]:
    """One request per row with its entity spans: the file's ``entity`` column and/or an NER backend."""
    from t2iedit import ner as N

    rows = edit_set.edits.to_pylist()
    ids, sources = [r["edit_id"] for r in rows], [r["source"] for r in rows]
    if ner in ("auto", "file"):
        spans = N.spans_by_edit(N.entities_table(N.dataset_entities(ids, sources, [r["entity"] for r in rows])))
        if ner == "auto":
            missing = [i for i, r in enumerate(rows) if not r["entity"]]
            found = N.heuristic_entities([ids[i] for i in missing], [sources[i] for i in missing])
            spans.update(N.spans_by_edit(N.entities_table(found)))
    elif ner == "heuristic":
        spans = N.spans_by_edit(N.entities_table(N.heuristic_entities(ids, sources)))
    elif ner == "hf":
        tagger = N.load_hf_tagger()
        spans = N.spans_by_edit(N.entities_table(N.hf_entities(tagger, ids, sources)))
    else:
        spans = {}
    return [EditRequest(r["edit_id"], r["source"], r["target"], spans.get(r["edit_id"], ())) for r in rows]


def _parse_layers(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise CliError(f"--layers must be comma-separated integers, got {text!r}") from None


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------
StoreOpt = typer.Option(None, "--store", help="store folder (default $T2IEDIT_HOME/<preset>, ~/.t2iedit/<preset>)")
PresetOpt = typer.Option(None, "--preset", help=f"model preset ({', '.join(PRESETS)}); default tiny, or the store's")
SourceOpt = typer.Option(None, "--source", help="load the base model from this folder / hub id instead of the preset's")
DeviceOpt = typer.Option(None, "--device", help="cpu | cuda (default: cuda when available)")


@app.command()
@_handle_errors
def edit(
    file: Path = typer.Argument(..., help="CSV (header source,target[,entity]) or YAML list of facts"),
    preset: Optional[str] = PresetOpt,
    store: Optional[Path] = StoreOpt,
    method: str = typer.Option("ours", "--method", help=f"one of {', '.join(METHOD_CHOICES)}"),
    source: Optional[str] = SourceOpt,
    seed: int = typer.Option(0, "--seed", help="seed of the tiny model's weights (new stores only)"),
    name: Optional[str] = typer.Option(None, "--name", help="name of the edit batch (default: the file's stem)"),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="caption CSV of preserved texts (column prompt)"),
    corpus_size: int = typer.Option(2000, "--corpus-size", help="captions sampled for the preserved keys K0"),
    corpus_seed: int = typer.Option(0, "--corpus-seed"),
    projector_mode: str = typer.Option("relative", "--projector-mode", help="relative | absolute | rank"),
    projector_value: float = typer.Option(1.0e-2, "--projector-value"),
    ner: str = typer.Option("auto", "--ner", help="auto (file's entity column, else heuristic) | heuristic | "
                                                  "file | hf (dslim/bert-large-NER, needs the hub) | none"),
    steps: int = typer.Option(200, "--steps", help="target-value optimisation steps (paper: 200)"),
    lr: float = typer.Option(0.2, "--lr"),
    alpha: float = typer.Option(0.11, "--alpha", help="EATA weight (paper 0.11)"),
    visual: bool = typer.Option(False, "--visual/--text-only",
                                help="add the UNet noise-prediction loss (slow on CPU; paper λ = 0.01)"),
    beta: float = typer.Option(1.0, "--beta", help="β of the sequential solve"),
    layers: Optional[str] = typer.Option(None, "--layers", help="edited layers, e.g. 0,1,2 (default: preset's)"),
    value_batch_size: int = typer.Option(16, "--value-batch-size"),
    device: Optional[str] = DeviceOpt,
):
    """Edit the model with a file of facts: one new batch, solved so earlier batches stay intact."""
    from t2iedit.values import (ValueConfig, VisualInputs, compute_target_values, concat_results,
                                ddpm_scheduler_for, generate_source_latents, weighted_config)

    if method not in METHOD_CHOICES:
        raise CliError(f"--method must be one of {', '.join(METHOD_CHOICES)}, got {method!r}")
    if ner not in NER_CHOICES:
        raise CliError(f"--ner must be one of {', '.join(NER_CHOICES)}, got {ner!r}")
    file = Path(file)
    if not file.exists():
        raise CliError(f"{file}: edit file not found")
    edit_set = load_user_edits(file)  # validated before any model is loaded
    requests = _requests(edit_set, ner)
    layer_override = _parse_layers(layers)
    with progress() as bar:
        with stage(bar, "loading model"):
            session = open_session(store, preset, source, seed, device, create=True)
        p = get_preset(session.preset)
        edit_layers = layer_override or tuple(session.state.settings.get("edit_layers", p.edit_layers))
        value_layer = int(session.state.settings.get("value_layer", p.value_layer))
        tok = session.pipe.tokenizer
        with stage(bar, f"preserved keys ({corpus_size} captions) + projector"):
            texts = coco_captions(_coco(corpus), corpus_size, corpus_seed,
                                  holdout_first=FID_HOLDOUT).column("text").to_pylist()
            stats = preserved_stats(session.editor, tok, texts, edit_layers, mode=projector_mode,
                                    value=projector_value, moments=(method == "emcid"),
                                    cache_dir=session.folder / "stats")
        if method == "emcid":
            cfg = (weighted_config("emcid", alpha=0.0, steps=steps, lr=lr) if visual
                   else ValueConfig(alpha=0.0, lambda_visual=0.0, steps=steps, lr=lr))
        else:
            # the default weighting of the paper's λ = 0.01 (values.DEFAULT_WEIGHTING, METHOD.md §5)
            cfg = (weighted_config(alpha=alpha, steps=steps, lr=lr) if visual
                   else ValueConfig(alpha=alpha, lambda_visual=0.0, steps=steps, lr=lr))
        vis = None
        if visual:
            with stage(bar, "source images for the visual loss"):
                latents = generate_source_latents(session.pipe, [r.edit_id for r in requests],
                                                  [r.source for r in requests], seed=0,
                                                  num_inference_steps=p.num_inference_steps)
                vis = VisualInputs(session.pipe.unet, ddpm_scheduler_for(session.pipe), latents)
        parts = []
        with stage(bar, f"target values ({len(requests)} facts, {steps} steps)", total=len(requests)) as task:
            for i in range(0, len(requests), value_batch_size):
                chunk = requests[i:i + value_batch_size]
                sub = None if vis is None else VisualInputs(vis.unet, vis.noise_scheduler,
                                                            vis.latents[i:i + value_batch_size])
                parts.append(compute_target_values(tok, session.pipe.text_encoder, session.adapter.block(value_layer),
                                                   chunk, cfg, sub, value_layer))
                bar.update(task, advance=len(chunk))
        values = concat_results(parts)
        with stage(bar, f"closed-form solve ({method}, layers {list(edit_layers)})"):
            solver = None
            if method == "emcid":
                moments = stats.moments
                solver = lambda _kp: MemitSolver(moments={l: moments[l] for l in edit_layers},  # noqa: E731
                                                 lam=EMCID_LAMBDA)
            config = {"method": method, "values": asdict(cfg), "beta": beta, "layers": list(edit_layers),
                      "value_layer": value_layer, "corpus_size": corpus_size, "corpus_seed": corpus_seed,
                      "projector": [projector_mode, projector_value], "ner": ner}
            batch = session.editor.apply_batch(
                requests, values.z, tok, layers=edit_layers, value_layer=value_layer,
                projectors=None if method != "ours" else stats.projectors, beta=beta, solver=solver,
                sequential=method != "emcid", templates=cfg.templates, method=method, config=config,
                name=name or file.stem,
                extra={"file": str(file.resolve()), "projectors": stats.metrics,
                       "value_losses": {k: float(v.mean()) for k, v in values.losses.items()}})
        with stage(bar, "text-space check"):
            success = _text_success(session, requests)
    out.print(f"applied [bold]{batch.edit_id}[/]: {batch.n_edits} facts from {file.name} "
              f"({method}, layers {list(edit_layers)}); store {session.folder}", highlight=False)
    out.print(f"text-space efficacy of this batch: {success:.0%}  ·  batches applied: "
              f"{len(session.state.batches)}  ·  accumulated keys per layer: "
              f"{next(iter(session.state.key_counts().values()), 0)}", highlight=False)


@torch.no_grad()
def _text_success(session: Session, requests: list[EditRequest]) -> float:
    """Share of facts whose source's [EOS] feature is now nearer the target's (unedited) feature
    than its own unedited feature."""
    from t2iedit.metrics import eos_features

    tok, te = session.pipe.tokenizer, session.pipe.text_encoder
    after = eos_features(tok, te, [r.source for r in requests])
    with session.editor.at_base():
        src = eos_features(tok, te, [r.source for r in requests])
        tgt = eos_features(tok, te, [r.target for r in requests])
    return float(((after - tgt).norm(dim=1) < (after - src).norm(dim=1)).float().mean())


@app.command("list")
@_handle_errors
def list_(
    store: Optional[Path] = StoreOpt,
    preset: Optional[str] = PresetOpt,
    facts: bool = typer.Option(False, "--facts", help="also list every fact of every batch"),
    as_json: bool = typer.Option(False, "--json", help="print the manifests as JSON"),
):
    """List the edit batches applied to the store's model, with their manifests."""
    folder = store_dir(store, preset)
    state = ContinualState.open(folder)
    if preset is not None and state.settings.get("preset") != preset:
        raise BaseModelMismatch(f"the edits in {folder} were made on base model "
                                f"{state.settings.get('preset')!r}, not preset {preset!r}")
    if as_json:
        doc = {"store": str(folder), "base": asdict(state.base), "batches": [
            {"edit_id": b.edit_id, "manifest": asdict(b.manifest), "files": state.files(b.edit_id),
             "facts": [asdict(r) for r in b.requests]} for b in state.batches]}
        out.print_json(json.dumps(doc, default=str))
        return
    out.print(f"store {folder}  ·  base {state.base.describe()}", highlight=False)
    table = Table("#", "edit id", "method", "facts", "layers", "created", "K_p before", "ΔW sha256")
    for i, b in enumerate(state.batches, start=1):
        cont = b.manifest.extra.get("continual", {})
        kp = cont.get("prior_key_counts", {})
        table.add_row(str(i), b.edit_id, b.manifest.method, str(b.n_edits),
                      ",".join(map(str, b.manifest.layers)), b.manifest.created_at,
                      str(max(kp.values(), default=0)),
                      state.files(b.edit_id).get("deltas.safetensors", "")[:12])
    out.print(table)
    if not state.batches:
        out.print("no edits applied")
    if facts:
        for b in state.batches:
            for r in b.requests:
                out.print(f"  {b.edit_id}  {r.source!r} → {r.target!r}", highlight=False)


@app.command()
@_handle_errors
def revert(
    edit_id: str = typer.Argument(..., help="the batch to remove (its id or a unique prefix, e.g. 002)"),
    store: Optional[Path] = StoreOpt,
    preset: Optional[str] = PresetOpt,
):
    """Remove one edit batch exactly (its ΔW and its keys); later batches keep theirs."""
    folder = store_dir(store, preset)
    state = ContinualState.open(folder)
    if preset is not None and state.settings.get("preset") != preset:
        raise BaseModelMismatch(f"the edits in {folder} were made on base model "
                                f"{state.settings.get('preset')!r}, not preset {preset!r}")
    report = state.revert(edit_id)
    out.print(f"reverted [bold]{report.removed.edit_id}[/] ({report.removed.n_edits} facts); "
              f"{len(state.batches)} batches remain", highlight=False)
    for later, per_layer in report.later_shift.items():
        worst = max(per_layer.values(), default=0.0)
        out.print(f"  {later}: its outputs at its own keys move by up to {worst:.1%} of its update "
                  f"(‖ΔW_removed K‖ / ‖ΔW K‖)" + ("  [yellow]consider re-applying its facts[/]" if worst > 0.25 else ""),
                  highlight=False)


@app.command()
@_handle_errors
def export(
    out_dir: Path = typer.Argument(..., help="new folder for the edited diffusers pipeline"),
    store: Optional[Path] = StoreOpt,
    preset: Optional[str] = PresetOpt,
    source: Optional[str] = SourceOpt,
):
    """Save the edited pipeline as a diffusers folder (StableDiffusionPipeline.from_pretrained)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CliError(f"{out_dir}: exists and is not empty")
    with progress() as bar:
        with stage(bar, "loading model"):
            session = open_session(store, preset, source, device="cpu")
        with stage(bar, f"saving to {out_dir}"):
            session.pipe.save_pretrained(out_dir, safe_serialization=True)
            write_json(out_dir / "t2iedit_edits.json", {
                "base": asdict(session.state.base), "store": str(session.folder),
                "batches": [{"edit_id": b.edit_id, "manifest": asdict(b.manifest),
                             "files": session.state.files(b.edit_id)} for b in session.state.batches]})
    out.print(f"exported {len(session.state.batches)} edit batches on {session.preset} to {out_dir}",
              highlight=False)


@app.command()
@_handle_errors
def generate(
    prompt: str = typer.Argument(...),
    seed: int = typer.Option(0, "--seed"),
    out_path: Path = typer.Option(Path("t2iedit.png"), "--out", help="PNG path"),
    steps: Optional[int] = typer.Option(None, "--steps", help="denoising steps (default: the preset's)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="guidance scale (default: the preset's)"),
    unedited: bool = typer.Option(False, "--unedited", help="generate with the base model (for comparison)"),
    store: Optional[Path] = StoreOpt,
    preset: Optional[str] = PresetOpt,
    source: Optional[str] = SourceOpt,
    device: Optional[str] = DeviceOpt,
):
    """Generate an image from the edited model (seeded, the preset's sampling settings)."""
    with progress() as bar:
        with stage(bar, "loading model"):
            session = open_session(store, preset, source, device=device)
        p = get_preset(session.preset)
        with stage(bar, f"generating {prompt!r}"):
            ctx = session.editor.at_base() if unedited else contextlib.nullcontext()
            gen = torch.Generator(device="cpu").manual_seed(seed)
            with ctx:
                image = session.pipe(prompt, generator=gen, num_inference_steps=steps or p.num_inference_steps,
                                     guidance_scale=p.guidance_scale if guidance is None else guidance,
                                     height=p.resolution, width=p.resolution).images[0]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
    out.print(f"wrote {out_path} ({'unedited' if unedited else f'{len(session.state.batches)} edit batches'}, "
              f"seed {seed})", highlight=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
