"""The ``t2iedit`` command line: continual editing of a model with a user's files of facts.

    t2iedit validate facts.csv            (no model loaded)
    t2iedit edit facts.csv [--preset tiny-minilm] [--store DIR] [--method ours]
    t2iedit list [--facts] [--json]
    t2iedit revert EDIT_ID
    t2iedit export OUT_DIR
    t2iedit generate "a prompt" [--seed 0] [--out image.png]

Every command works on a *store* (``--store``, default ``$T2IEDIT_HOME/<preset>``, ``T2IEDIT_HOME``
defaulting to ``~/.t2iedit``): a :class:`t2iedit.continual.ContinualState` folder holding the base
model's identity, the applied edit batches (ΔW, keys, facts, manifests) and cached preserved-key
statistics. The first ``edit`` creates it on ``--preset`` (default ``tiny-minilm``); later commands read
the preset and model source from it and refuse another base model. For an embedded preset
(``tiny-minilm``, ``tiny``) the base pipeline is built once into ``<store>/base-model`` from ``--seed``.

``edit`` runs the method end to end on the current edited model: preserved-key statistics of the base
model over COCO captions (cached), null-space projector, entities (the file's ``entity`` column, else
the offline heuristic NER), target values (text-only by default; ``--visual`` adds the UNet loss), then
AlphaEdit's sequential closed-form solve with the keys of all earlier batches (METHOD.md §6).

No traceback reaches the user: options are checked before any model loads, every known failure is one
message (exit 1; a bad option exits 2), Ctrl-C prints one line (exit 130) and never leaves a store
half-written (its writes defer SIGINT, and :meth:`ContinualState.open` recovers from a kill), and a
command that fails leaves no new store behind. ``T2IEDIT_DEBUG=1`` shows the traceback of an
unexpected error.
"""

from __future__ import annotations

import logging

from t2iedit.library_warnings import (DIFFUSERS_PIPELINE_LOGGER, QUIET_WARNINGS,  # noqa: F401
                                      TRANSFORMERS_IMPORT_LOGGER, MessageFilter, silence_known_warnings)

silence_known_warnings()  # the CLI's entry module: the imports below emit the first warning

INTERRUPTED_MESSAGE = "interrupted (Ctrl-C): stopped; the store is as it was before this command"


def _interrupted_while_importing(signum, frame):  # Ctrl-C during the seconds of torch/diffusers imports
    import sys

    sys.stderr.write(INTERRUPTED_MESSAGE + "\n")
    os._exit(130)


import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402

_IMPORTING = threading.current_thread() is threading.main_thread() \
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
if _IMPORTING:
    signal.signal(signal.SIGINT, _interrupted_while_importing)

import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator, Optional  # noqa: E402

import torch  # noqa: E402
import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,  # noqa: E402
                           TimeElapsedColumn)

from t2iedit.continual import (STATE_FILE, BaseModelMismatch, ContinualEditor, ContinualState,  # noqa: E402
                               StoreError, base_model_of, preserved_stats)
from t2iedit.edit import MemitSolver  # noqa: E402
from t2iedit.edit_data import DatasetError, coco_captions, load_user_edits  # noqa: E402
from t2iedit.losses import pooled_feature  # noqa: E402
from t2iedit.models import (PRESETS, TextEncoderAdapter, build_preset_pipeline, get_preset,  # noqa: E402
                            load_pipeline)
from t2iedit.projector import MODES as PROJECTOR_MODES, calibrated_rule  # noqa: E402
from t2iedit.prompts import EditRequest  # noqa: E402
from t2iedit.storage import read_json, write_json  # noqa: E402

if _IMPORTING:  # imports done: Ctrl-C is a KeyboardInterrupt again, handled by each command
    signal.signal(signal.SIGINT, signal.default_int_handler)

logger = logging.getLogger(__name__)

app = typer.Typer(name="t2iedit", no_args_is_help=True, add_completion=False,
                  help="Continual knowledge editing of text-to-image diffusion models (validate, edit, list, "
                       "revert, export, generate).")
err = Console(stderr=True)
out = Console()

DEFAULT_PRESET = "tiny-minilm"  # the pipeline's default: a real pretrained text encoder (MiniLM)
METHOD_CHOICES = ("ours", "ours-no-projector", "emcid")
NER_CHOICES = ("auto", "heuristic", "file", "hf", "none")
EMCID_LAMBDA = 4000.0  # EMCID's λ on C0 (TIMED); METHOD.md §7
REPO_ROOT = Path(__file__).resolve().parents[1]
COCO_CANDIDATES = (REPO_ROOT / "data" / "raw" / "coco" / "coco_30k.csv",
                   REPO_ROOT.parent / "shared" / "data" / "coco" / "coco_30k.csv")
FID_HOLDOUT = 5000  # the first 5,000 COCO captions are the FID-5K prompts: never preserved keys


class CliError(Exception):
    """A user-facing error (message printed, exit code 1)."""


class OptionError(CliError):
    """A bad command-line option (exit code 2, like click's usage errors)."""


class ModelLoadError(CliError):
    """The base model could not be loaded (not cached and no hub, a bad folder, ...)."""


EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell convention


def _handle_errors(fn):
    """Every failure as one clear message on stderr and a non-zero exit code, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            err.print(INTERRUPTED_MESSAGE, highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (DatasetError, StoreError, BaseModelMismatch, CliError, FileNotFoundError) as e:
            kind = {DatasetError: "bad edit file", BaseModelMismatch: "base model mismatch",
                    OptionError: "bad option", ModelLoadError: "cannot load the model"}.get(type(e), "error")
            err.print(f"[bold red]{kind}:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2 if isinstance(e, OptionError) else 1) from None
        except Exception as e:  # an unexpected failure: still one message, the traceback on request
            if os.environ.get("T2IEDIT_DEBUG"):
                raise
            err.print(f"[bold red]error:[/] unexpected {type(e).__name__}: {escape(str(e))} (T2IEDIT_DEBUG=1 shows "
                      f"the traceback; please report it)", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    return wrapper


# --------------------------------------------------------------------------------------------------
# Store, model and progress helpers
# --------------------------------------------------------------------------------------------------
def home() -> Path:
    return Path(os.environ.get("T2IEDIT_HOME", Path.home() / ".t2iedit")).expanduser()


def store_dir(store: Optional[Path], preset: Optional[str]) -> Path:
    return Path(store).expanduser().resolve() if store else home() / (preset or DEFAULT_PRESET)


@dataclass
class Session:
    """A loaded model bound to its store. For a store that does not exist yet the state lives in
    memory until :meth:`persist` (called right before the first batch is written), so a command that
    fails before that leaves no store behind."""

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

    def persist(self) -> None:
        if self.state.folder is None:
            self.editor.state = ContinualState.create(self.folder, self.state.base, self.state.settings)


def report_recovery(state: ContinualState) -> None:
    """Tell the user what :meth:`ContinualState.open` repaired after an interrupted run."""
    for line in state.recovered:
        err.print(f"[yellow]recovered:[/] {escape(line)}", highlight=False, soft_wrap=True)


def open_store(folder: Path, preset: Optional[str] = None, missing_ok: bool = False) -> Optional[ContinualState]:
    """The store in ``folder`` (recovered if a run was killed), checked against ``preset`` if given."""
    if not (folder / STATE_FILE).exists():
        if missing_ok:
            return None
        raise StoreError(f"{folder}: no edits yet (no continual-editing store); run `t2iedit edit FILE` "
                         f"first or pass --store")
    state = ContinualState.open(folder)
    report_recovery(state)
    stored = state.settings.get("preset")
    if preset is not None and stored != preset:
        raise BaseModelMismatch(f"the edits in {folder} were made on base model {stored!r} "
                                f"({state.base.describe()}), refusing to use them with preset {preset!r}")
    return state


def _build_embedded(folder: Path, preset: str, seed: int) -> Path:
    """An embedded preset's base pipeline in ``<store>/base-model``, built whole or not at all."""
    base = folder / "base-model"
    if not (base / "model_index.json").exists():
        tmp = folder / ".base-model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_preset_pipeline(preset, tmp, seed=seed)
        shutil.rmtree(base, ignore_errors=True)
        tmp.rename(base)
    return base


def _model_source(folder: Path, preset_name: str, source: Optional[str], seed: int) -> tuple[str, Optional[str]]:
    preset = get_preset(preset_name)
    if source:
        path = Path(source).expanduser()
        return (str(path.resolve()) if path.exists() else source), (None if path.exists() else preset.revision)
    if preset.tiny:
        return str(_build_embedded(folder, preset_name, seed)), None
    return preset.repo_id, preset.revision


def _device(device: Optional[str]) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(src: str, revision: Optional[str], device: str):
    try:
        pipe = load_pipeline(src, revision)
        pipe.to(device)
    except Exception as e:  # hub unreachable, not cached, a bad folder, an unknown device ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300].rstrip(".")
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = ("" if Path(src).exists() else
                f" It is not in the Hugging Face cache{' and HF_HUB_OFFLINE is set' if offline else ''} or the hub "
                f"cannot be reached: download it once with network access, or pass --source with a local "
                f"save_pretrained folder.")
        raise ModelLoadError(f"{src}" + (f" @ {revision}" if revision else "") + f": {type(e).__name__}: "
                             f"{first}.{hint}") from None
    return pipe


def open_session(store: Optional[Path], preset: Optional[str], source: Optional[str] = None, seed: int = 0,
                 device: Optional[str] = None, create: bool = False) -> Session:
    """Open (with ``create``: or prepare, see :class:`Session`) the store and load its base model with
    the edits applied.

    ``preset``/``source`` given for an existing store must agree with it (else
    :class:`BaseModelMismatch`); the loaded weights are checked against the store's base hash.
    """
    folder = store_dir(store, preset)
    state = open_store(folder, preset, missing_ok=create)
    if state is not None:
        preset = state.settings.get("preset")
        seed = int(state.settings.get("seed", seed))
        source = source or state.settings.get("source")
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise OptionError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = get_preset(preset)
    src, revision = _model_source(folder, preset, source, seed)
    pipe = _load(src, revision, _device(device))
    pipe.set_progress_bar_config(disable=True)  # the denoising steps: one progress display per command
    adapter = TextEncoderAdapter(pipe.text_encoder, p.text_layer_template, p.text_block_template)
    if state is None:  # in memory until the first batch is written (Session.persist)
        state = ContinualState.in_memory(base_model_of(adapter, preset, p.revision),
                                         {"preset": preset, "source": src, "seed": seed,
                                          "edit_layers": list(p.edit_layers), "value_layer": p.value_layer})
    editor = ContinualEditor(state, adapter, {"text_encoder": pipe.text_encoder})
    return Session(folder, preset, src, revision, pipe, adapter, editor)


@contextlib.contextmanager
def progress() -> Iterator[Progress]:
    """The one progress display of every command: a line per stage with its elapsed time, a bar where
    the stage has countable work (the value optimisation counts Adam steps)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # their tqdm bars (weights, shards, components,
    transformers.utils.logging.disable_progress_bar()  # denoising steps) would interleave with this one
    with Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=False) as bar:
        try:
            yield bar
        except BaseException:  # the error message is what matters then, not a half-finished bar
            bar.live.transient = True
            raise


@contextlib.contextmanager
def stage(bar: Progress, description: str, total: int = 1) -> Iterator[int]:
    task = bar.add_task(description, total=total)
    yield task
    bar.update(task, completed=total)


def _coco(corpus: Optional[Path]) -> Path:
    if corpus is not None:
        if not Path(corpus).exists():
            raise OptionError(f"--corpus: {corpus}: file not found")
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
        try:
            tagger = N.load_hf_tagger()
        except Exception as e:  # the hub model is not cached / unreachable
            raise ModelLoadError(f"--ner hf: {N.DEFAULT_HF_MODEL}: {type(e).__name__}: "
                                 f"{(str(e).strip().splitlines() or [''])[0][:300]}; use --ner auto "
                                 f"(offline) or download it once with network access") from None
        spans = N.spans_by_edit(N.entities_table(N.hf_entities(tagger, ids, sources)))
    else:
        spans = {}
    return [EditRequest(r["edit_id"], r["source"], r["target"], spans.get(r["edit_id"], ())) for r in rows]


def _parse_layers(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        layers = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise OptionError(f"--layers must be comma-separated integers, got {text!r}") from None
    if not layers:
        raise OptionError(f"--layers: no layer in {text!r}")
    if len(set(layers)) != len(layers):
        raise OptionError(f"--layers: a layer is repeated in {text!r}")
    return tuple(sorted(layers))


@dataclass(frozen=True)
class EditOptions:
    """``edit``'s options once checked (:func:`check_edit_options`), before any model is loaded."""

    preset: str
    layers: Optional[tuple[int, ...]]
    value_layer: int
    projector_mode: str    # the null-space rule: the options', else the preset's calibrated one
    projector_value: float


def check_edit_options(*, preset: str, settings: dict, method: str, ner: str, steps: int, lr: float,
                       alpha: float, beta: float, corpus_size: int, value_batch_size: int,
                       projector_mode: Optional[str], projector_value: Optional[float],
                       layers: Optional[str]) -> EditOptions:
    """Every option of ``edit`` against its valid range (``settings``: the store's, if it exists).

    Edited layers must lie in 0..value layer: the MEMIT/EMCID spreading (METHOD.md §6) writes the
    residual at the value layer's output, which a later layer cannot change. Neither projector option:
    the preset's calibrated rule (``t2iedit.projector.CALIBRATED``, what the pipeline's ``projector``
    stage uses: tiny-minilm and SD energy 1e-2, ≥ 99 % of the preserved keys' energy protected).
    """
    def bad(message: str) -> None:
        raise OptionError(message)

    if preset not in PRESETS:
        bad(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if method not in METHOD_CHOICES:
        bad(f"--method must be one of {', '.join(METHOD_CHOICES)}, got {method!r}")
    if ner not in NER_CHOICES:
        bad(f"--ner must be one of {', '.join(NER_CHOICES)}, got {ner!r}")
    for name, value, ok, rule in (("--steps", steps, steps >= 1, "at least 1"),
                                  ("--lr", lr, lr > 0, "positive"),
                                  ("--alpha", alpha, alpha >= 0, "0 or more"),
                                  ("--beta", beta, beta > 0, "positive"),
                                  ("--corpus-size", corpus_size, corpus_size >= 1, "at least 1"),
                                  ("--value-batch-size", value_batch_size, value_batch_size >= 1, "at least 1")):
        if not ok:
            bad(f"{name} must be {rule}, got {value}")
    if (projector_mode is None) != (projector_value is None):
        bad("--projector-mode and --projector-value go together: give both, or neither for the preset's "
            "calibrated rule")
    if projector_mode is None:
        projector_mode, projector_value = calibrated_rule(preset)
    if projector_mode not in PROJECTOR_MODES:
        bad(f"--projector-mode must be one of {', '.join(PROJECTOR_MODES)}, got {projector_mode!r}")
    if projector_mode == "rank" and (projector_value < 0 or projector_value != int(projector_value)):
        bad(f"--projector-value: the rank mode takes a whole number of null directions, got {projector_value}")
    if projector_mode == "energy" and not 0 <= projector_value <= 1:
        bad(f"--projector-value: the energy mode takes a fraction in [0, 1], got {projector_value}")
    if projector_value < 0:
        bad(f"--projector-value must be 0 or more, got {projector_value}")
    p = get_preset(preset)
    value_layer = int(settings.get("value_layer", p.value_layer))
    chosen = _parse_layers(layers)
    if chosen is not None:
        outside = [l for l in chosen if not 0 <= l <= value_layer]
        if outside:
            bad(f"--layers: {','.join(map(str, outside))} not in 0..{value_layer} (edited layers must not be "
                f"after the value layer {value_layer} of preset {preset})")
    return EditOptions(preset, chosen, value_layer, projector_mode, float(projector_value))


def load_facts(file: Path):
    """The validated facts file (:func:`load_user_edits`); no model is loaded."""
    file = Path(file)
    if not file.is_file():
        raise CliError(f"{file}: edit file not found")
    return load_user_edits(file)


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------
StoreOpt = typer.Option(None, "--store", help="store folder (default $T2IEDIT_HOME/<preset>, ~/.t2iedit/<preset>)")
PresetOpt = typer.Option(None, "--preset",
                         help=f"model preset ({', '.join(PRESETS)}); default {DEFAULT_PRESET}, or the store's")
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
    projector_mode: Optional[str] = typer.Option(
        None, "--projector-mode", help="energy | relative | absolute | rank (with --projector-value); default: "
                                       "the preset's calibrated rule, as the pipeline (tiny-minilm, SD: energy 1e-2)"),
    projector_value: Optional[float] = typer.Option(None, "--projector-value"),
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
    latent_steps: Optional[int] = typer.Option(None, "--latent-steps",
                                               help="--visual: denoising steps of the source images (default: the preset's)"),
    device: Optional[str] = DeviceOpt,
):
    """Edit the model with a file of facts: one new batch, solved so earlier batches stay intact."""
    if latent_steps is not None and latent_steps < 1:
        raise OptionError(f"--latent-steps must be at least 1, got {latent_steps}")
    folder = store_dir(store, preset)
    existing = open_store(folder, preset, missing_ok=True)
    opts = check_edit_options(
        preset=existing.settings.get("preset") if existing else (preset or DEFAULT_PRESET),
        settings=existing.settings if existing else {}, method=method, ner=ner, steps=steps, lr=lr,
        alpha=alpha, beta=beta, corpus_size=corpus_size, value_batch_size=value_batch_size,
        projector_mode=projector_mode, projector_value=projector_value, layers=layers)
    coco = _coco(corpus)
    file = Path(file)
    edit_set = load_facts(file)  # validated before any model is loaded
    requests = _requests(edit_set, ner)
    new_folder = not folder.exists()
    try:
        batch, session, success = _edit(
            file, folder, opts, requests, method=method, source=source, seed=seed,
            name=name, coco=coco, corpus_size=corpus_size, corpus_seed=corpus_seed,
            ner=ner, steps=steps, lr=lr,
            alpha=alpha, visual=visual, beta=beta, value_batch_size=value_batch_size, device=device,
            latent_steps=latent_steps)
    except BaseException:
        if new_folder and not _holds_batches(folder):  # a failed first edit leaves no store
            shutil.rmtree(folder, ignore_errors=True)
        raise
    out.print(f"applied [bold]{escape(batch.edit_id)}[/]: {batch.n_edits} facts from {escape(file.name)} "
              f"({method}, layers {list(batch.manifest.layers)}); store {session.folder}", highlight=False)
    if method == "ours":  # what the null-space projector protects (METHOD.md §3)
        protected = min(m["protected_energy"] for m in batch.manifest.extra["projectors"].values())
        out.print(f"projector {opts.projector_mode} {opts.projector_value:g}: at least {protected:.1%} of the "
                  f"preserved keys' energy outside the edit's reach at every layer", highlight=False)
    if success is None:
        out.print("interrupted before the text-space check; the batch is applied", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    out.print(f"text-space efficacy of this batch: {success:.0%}  ·  batches applied: "
              f"{len(session.state.batches)}  ·  accumulated keys per layer: "
              f"{next(iter(session.state.key_counts().values()), 0)}", highlight=False)


def _holds_batches(folder: Path) -> bool:
    try:
        return bool(read_json(folder / STATE_FILE)["batches"])
    except (OSError, ValueError, KeyError):
        return False


def _edit(file: Path, store: Path, opts: EditOptions, requests: list[EditRequest], *, method: str,
          source: Optional[str], seed: int, name: Optional[str], coco: Path, corpus_size: int,
          corpus_seed: int, ner: str, steps: int, lr: float,
          alpha: float, visual: bool, beta: float, value_batch_size: int, device: Optional[str],
          latent_steps: Optional[int] = None):
    """The model work of ``edit``, after every option and the file were checked."""
    from t2iedit.values import (DEFAULT_WEIGHTING, PAPER_LAMBDA, VisualInputs, compute_target_values,
                                concat_results, ddpm_scheduler_for, generate_source_latents, weighted_config)

    with progress() as bar:
        with stage(bar, "loading model"):
            session = open_session(store, opts.preset, source, seed, device, create=True)
        p = get_preset(session.preset)
        edit_layers = opts.layers or tuple(session.state.settings.get("edit_layers", p.edit_layers))
        value_layer = opts.value_layer
        tok = session.pipe.tokenizer
        with stage(bar, f"preserved keys ({corpus_size} captions) + projector"):
            texts = coco_captions(coco, corpus_size, corpus_seed,
                                  holdout_first=FID_HOLDOUT).column("text").to_pylist()
            stats = preserved_stats(session.editor, tok, texts, edit_layers, mode=opts.projector_mode,
                                    value=opts.projector_value, moments=(method == "emcid"),
                                    cache_dir=session.folder / "stats")
        # the loss weights through values.weighted_config (METHOD.md §5): text-only is the paper's form
        # with λ = 0 (text 1, EATA α); --visual the default weighting of λ = 0.01; EMCID has no EATA
        a = 0.0 if method == "emcid" else alpha
        common = {"alpha": a, "steps": steps, "lr": lr, "pooling": p.pooling}  # the encoder's own feature
        cfg = (weighted_config("emcid" if method == "emcid" else DEFAULT_WEIGHTING, lam=PAPER_LAMBDA, **common)
               if visual else weighted_config("paper", lam=0.0, **common))
        vis = None
        if visual:
            with stage(bar, "source images for the visual loss"):
                latents = generate_source_latents(session.pipe, [r.edit_id for r in requests],
                                                  [r.source for r in requests], seed=0,
                                                  num_inference_steps=latent_steps or p.num_inference_steps)
                vis = VisualInputs(session.pipe.unet, ddpm_scheduler_for(session.pipe), latents)
        parts = []
        chunks = [requests[i:i + value_batch_size] for i in range(0, len(requests), value_batch_size)]
        label = f"target values ({len(requests)} facts" + (f", {len(chunks)} batches" if len(chunks) > 1 else "")
        with stage(bar, f"{label}): step 0/{cfg.steps}", total=len(chunks) * cfg.steps) as task:
            for c, chunk in enumerate(chunks):
                def tell(done: int, total: int, loss: float, c: int = c) -> None:  # after every Adam step
                    bar.update(task, completed=c * total + done,
                               description=f"{label}): step {done}/{total}, loss {loss:.4g}")

                start = c * value_batch_size
                sub = None if vis is None else VisualInputs(vis.unet, vis.noise_scheduler,
                                                            vis.latents[start:start + len(chunk)])
                parts.append(compute_target_values(tok, session.pipe.text_encoder, session.adapter.block(value_layer),
                                                   chunk, cfg, sub, value_layer, progress=tell))
        values = concat_results(parts)
        with stage(bar, f"closed-form solve ({method}, layers {list(edit_layers)})"):
            solver = None
            if method == "emcid":
                moments = stats.moments
                solver = lambda _kp: MemitSolver(moments={l: moments[l] for l in edit_layers},  # noqa: E731
                                                 lam=EMCID_LAMBDA)
            config = {"method": method, "values": asdict(cfg), "beta": beta, "layers": list(edit_layers),
                      "value_layer": value_layer, "corpus_size": corpus_size, "corpus_seed": corpus_seed,
                      "projector": [opts.projector_mode, opts.projector_value], "ner": ner}
            session.persist()  # the store exists from here on (a new one only now)
            batch = session.editor.apply_batch(
                requests, values.z, tok, layers=edit_layers, value_layer=value_layer,
                projectors=None if method != "ours" else stats.projectors, beta=beta, solver=solver,
                sequential=method != "emcid", templates=cfg.templates, method=method, config=config,
                name=name or file.stem,
                extra={"file": str(file.resolve()), "config": config, "projectors": stats.metrics,
                       "value_losses": {k: float(v.mean()) for k, v in values.losses.items()}})
        try:
            with stage(bar, "text-space check"):
                success = _text_success(session, requests)
        except KeyboardInterrupt:
            success = None
    return batch, session, success


@torch.no_grad()
def _sentence_features(session: Session, texts: list[str]) -> torch.Tensor:
    """The preset's sentence feature (CLIP: [EOS]; MiniLM: the masked mean), (n, d)."""
    tok, te = session.pipe.tokenizer, session.pipe.text_encoder
    device = next(te.parameters()).device
    enc = tok(texts, padding="longest", truncation=True, max_length=tok.model_max_length, return_tensors="pt")
    mask = enc.attention_mask.to(device)
    hidden = te(input_ids=enc.input_ids.to(device), attention_mask=mask).last_hidden_state
    return pooled_feature(hidden, mask, get_preset(session.preset).pooling).float().cpu()


def _text_success(session: Session, requests: list[EditRequest]) -> float:
    """Share of facts whose source's sentence feature is now nearer the target's (unedited) feature
    than its own unedited feature."""
    after = _sentence_features(session, [r.source for r in requests])
    with session.editor.at_base():
        src = _sentence_features(session, [r.source for r in requests])
        tgt = _sentence_features(session, [r.target for r in requests])
    return float(((after - tgt).norm(dim=1) < (after - src).norm(dim=1)).float().mean())


@app.command()
@_handle_errors
def validate(file: Path = typer.Argument(..., help="CSV (header source,target[,entity]) or YAML list of facts")):
    """Check a facts file without loading a model: a one-line summary (exit 0) or every error (exit 1)."""
    edit_set = load_facts(file)
    rows = edit_set.edits.to_pylist()
    with_entity = sum(1 for r in rows if r["entity"])
    out.print(f"{file}: {len(rows)} facts, valid ({with_entity} with an entity)", highlight=False, soft_wrap=True)


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
    state = open_store(folder, preset)
    if as_json:
        doc = {"store": str(folder), "base": asdict(state.base), "batches": [
            {"edit_id": b.edit_id, "manifest": asdict(b.manifest), "files": state.files(b.edit_id),
             "facts": [asdict(r) for r in b.requests]} for b in state.batches]}
        out.print_json(json.dumps(doc, default=str))
        return
    out.print(f"store {folder}  ·  base {state.base.describe()}", highlight=False, soft_wrap=True)
    if not state.batches:
        out.print("no edits applied")
        return
    # Plain aligned columns, never wrapped or cut (soft_wrap): the ids are what `revert` takes, and a
    # table squeezed to a narrow terminal would fold or ellipsise them.
    rows = [("#", "edit id", "method", "facts", "layers", "applied", "K_p before", "ΔW sha256")]
    for i, b in enumerate(state.batches, start=1):
        kp = b.manifest.extra.get("continual", {}).get("prior_key_counts", {})
        rows.append((str(i), b.edit_id, b.manifest.method, str(b.n_edits), ",".join(map(str, b.manifest.layers)),
                     b.manifest.created_at or "-", str(max(kp.values(), default=0)),
                     state.files(b.edit_id).get("deltas.safetensors", "")[:12]))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        out.print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip(), highlight=False,
                  soft_wrap=True, markup=False)
    if facts:
        for b in state.batches:
            for r in b.requests:
                out.print(f"  {b.edit_id}  {r.source!r} → {r.target!r}", highlight=False, soft_wrap=True,
                          markup=False)


@app.command()
@_handle_errors
def revert(
    edit_id: str = typer.Argument(..., help="the batch to remove (its id or a unique prefix, e.g. 002)"),
    store: Optional[Path] = StoreOpt,
    preset: Optional[str] = PresetOpt,
):
    """Remove one edit batch exactly (its ΔW and its keys); later batches keep theirs."""
    folder = store_dir(store, preset)
    state = open_store(folder, preset)
    report = state.revert(edit_id)
    out.print(f"reverted [bold]{escape(report.removed.edit_id)}[/] ({report.removed.n_edits} facts); "
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
    height: Optional[int] = typer.Option(None, "--height", help="pixels, multiple of 8 (default: the model's own)"),
    width: Optional[int] = typer.Option(None, "--width", help="pixels, multiple of 8 (default: the model's own)"),
    store: Optional[Path] = StoreOpt,
    preset: Optional[str] = PresetOpt,
    source: Optional[str] = SourceOpt,
    device: Optional[str] = DeviceOpt,
):
    """Generate an image from the edited model (seeded, the preset's sampling settings)."""
    if steps is not None and steps < 1:
        raise OptionError(f"--steps must be at least 1, got {steps}")
    if guidance is not None and guidance < 0:
        raise OptionError(f"--guidance must be 0 or more, got {guidance}")
    for name, v in (("--height", height), ("--width", width)):
        if v is not None and (v < 8 or v % 8):
            raise OptionError(f"{name} must be a positive multiple of 8, got {v}")
    with progress() as bar:
        with stage(bar, "loading model"):
            session = open_session(store, preset, source, device=device)
        p = get_preset(session.preset)
        side = session.pipe.unet.config.sample_size  # the model's own size (t2iedit.models.native_size)
        native = (side * session.pipe.vae_scale_factor,) * 2 if isinstance(side, int) else \
            tuple(x * session.pipe.vae_scale_factor for x in side)
        with stage(bar, f"generating {prompt!r}"):
            ctx = session.editor.at_base() if unedited else contextlib.nullcontext()
            gen = torch.Generator(device="cpu").manual_seed(seed)
            with ctx:
                image = session.pipe(prompt, generator=gen, num_inference_steps=steps or p.num_inference_steps,
                                     guidance_scale=p.guidance_scale if guidance is None else guidance,
                                     height=height or native[0], width=width or native[1]).images[0]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
    out.print(f"wrote {out_path} ({'unedited' if unedited else f'{len(session.state.batches)} edit batches'}, "
              f"seed {seed})", highlight=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
