"""Prefect tasks of the prepare_model stage, and loading the locked model in later stages.

The stage writes ``data/models/lock.json``: which model every later stage uses (preset, hub id or
local folder, revision) and the sha256 of each of its files. The tiny preset's weights are built
under ``data/models/<preset>-seed<seed>/``; a hub preset's weights stay in the Hugging Face cache (the
lock only pins and hashes them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
# Resolve transformers' lazy attributes once, at import (main thread): mapped tasks load models from
# several threads at once, and concurrent first look-ups of its lazy module raise ImportError.
from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer  # noqa: F401

from t2iedit.storage import file_sha256, read_json, stable_hash, write_json
from t2iedit.models import (DTYPES, TextEncoderAdapter, build_preset_pipeline, get_preset,
                            load_text_encoder, native_size, preset_architecture)
from tasks.stamps import STAMP_CACHE, run_once

LOCK_FILE = "lock.json"
# Files a Stable Diffusion pipeline needs (fp32 safetensors only; no .bin, fp16 or EMA copies).
HUB_PATTERNS = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*",
                "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors"]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@task(cache_policy=STAMP_CACHE)
def lock_model(out: Path, fingerprint: str, preset: str, seed: int, source: str | None = None,
               dtype: str = "float32") -> Path:
    """Write the lock file ``out`` (building the tiny pipeline beside it, or resolving the hub
    snapshot at the preset's pinned revision; ``HF_HUB_OFFLINE=1`` uses the cache only). ``source``:
    a local pipeline folder (``save_pretrained``) of the preset's architecture, used instead.
    ``dtype``: ``model.dtype``, what the UNet and VAE (and the text encoder at inference) run in on
    CUDA (:func:`t2iedit.models.resolve_dtype`); the weights on disk stay float32."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    def produce(path: Path) -> None:
        pre = get_preset(preset)
        if source is not None:
            folder = check_pipeline_folder(Path(source), preset)
            source_, revision = folder.as_posix(), None
        elif pre.tiny:
            folder = build_preset_pipeline(preset, tiny_folder[0], seed=seed)
            source_, revision = folder.as_posix(), None
        else:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(pre.repo_id, revision=pre.revision, allow_patterns=HUB_PATTERNS))
            source_, revision = pre.repo_id, pre.revision
        write_json(path, {
            "preset": preset, "seed": seed if pre.tiny and source is None else None, "source": source_,
            "revision": revision,
            # the identity an EditArtifact records and is checked against (same as flows.generate)
            "base_model_id": preset, "base_revision": revision,
            "text_layer_template": pre.text_layer_template, "text_block_template": pre.text_block_template,
            "edit_layers": list(pre.edit_layers), "value_layer": pre.value_layer,
            "dtype": dtype,
            "files": _hashes(folder),
        })

    tiny_folder = [out.parent / f"{preset}-seed{seed}"] if get_preset(preset).tiny and source is None else []
    return run_once(out, fingerprint, produce, also=tiny_folder)  # the stamp covers the tiny weights too


PIPELINE_COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
# (component, config file, key, architecture entry) checked against t2iedit.models.preset_architecture
_ARCH_CHECKS = (("text_encoder", "config.json", "hidden_size", "text_hidden"),
                ("text_encoder", "config.json", "num_hidden_layers", "text_layers"),
                ("unet", "config.json", "cross_attention_dim", "cross_attention_dim"),
                ("vae", "config.json", "latent_channels", "latent_channels"))
_CONFIG_FILES = {"text_encoder": "config.json", "unet": "config.json", "vae": "config.json",
                 "scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}


def check_pipeline_folder(folder: Path, preset: str) -> Path:
    """``folder`` if it is a Stable Diffusion pipeline saved with ``save_pretrained`` holding every
    component (text encoder, tokenizer, UNet, VAE, scheduler: listed in model_index.json, each with
    its config and, for the networks, weights) with the preset's architecture
    (:func:`t2iedit.models.preset_architecture`: text width and depth, UNet cross-attention width, VAE
    latent channels); else a ValueError naming ``model.source``, the file, the field and the mismatch."""
    pre = get_preset(preset)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"model.source: {folder} has no model_index.json (expected a folder saved with "
                         "StableDiffusionPipeline.save_pretrained)")
    try:
        listed = read_json(index)
    except ValueError as exc:
        raise ValueError(f"model.source: {index} is not valid JSON ({exc})") from None
    missing = [c for c in PIPELINE_COMPONENTS if not isinstance(listed, dict) or c not in listed]
    if missing:
        raise ValueError(f"model.source: {index} does not list the components {missing} "
                         f"(a Stable Diffusion pipeline has {list(PIPELINE_COMPONENTS)})")
    configs: dict[str, dict] = {}
    for comp, name in _CONFIG_FILES.items():
        cfg = folder / comp / name
        if not cfg.is_file():
            raise ValueError(f"model.source: {cfg} is missing (the pipeline's {comp})")
        if comp in ("text_encoder", "unet", "vae"):
            if not any((folder / comp).glob("*.safetensors")) and not any((folder / comp).glob("*.bin")):
                raise ValueError(f"model.source: {folder / comp} holds no weights (*.safetensors or *.bin)")
            configs[comp] = read_json(cfg)
    arch = preset_architecture(preset)
    for comp, name, key, entry in _ARCH_CHECKS:
        got = configs[comp].get(key)
        if got != arch[entry]:
            raise ValueError(f"model.source: {folder / comp / name} field {key!r} is {got!r} but preset "
                             f"{preset!r} has {arch[entry]} ({entry}): choose the preset of this "
                             "architecture (model.preset) or a folder of this preset's architecture")
    n_layers = int(configs["text_encoder"]["num_hidden_layers"])
    needed = max(*pre.edit_layers, pre.value_layer)
    if n_layers <= needed:  # unreachable while the depth matches; kept for presets with fewer layers
        raise ValueError(f"model.source: {folder / 'text_encoder/config.json'} has {n_layers} text-encoder "
                         f"layers but preset {preset!r} edits layers {list(pre.edit_layers)}")
    return folder.resolve()


def read_lock(models_dir: Path) -> dict[str, Any]:
    return read_json(Path(models_dir) / LOCK_FILE)


def lock_identity(lock: dict[str, Any]) -> str:
    """Content identity of the locked weights (the sha256 of every file; equal locks, equal models):
    what generated images are keyed by, whatever folder or hub cache the files live in."""
    return stable_hash({"preset": lock["preset"], "revision": lock["revision"], "files": lock["files"]})


@dataclass(frozen=True)
class LockedModel:
    """The model prepare_model locked, as the stages that load it need it."""

    preset: str
    source: str
    revision: str | None
    identity: str  # lock_identity: the content hash of the locked files
    dtype: str = "float32"  # model.dtype asked for (on CUDA); t2iedit.models.resolve_dtype gives the effective one


def locked_model(models_dir: Path) -> LockedModel:
    lock = read_lock(models_dir)
    return LockedModel(lock["preset"], lock["source"], lock["revision"], lock_identity(lock),
                       lock.get("dtype", "float32"))


def image_size(model: LockedModel, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(height, width) of generated images: ``generate.height``/``width`` (``flows.stage.generate_hw``),
    each ``None`` → the locked model's own (``t2iedit.models.native_size``: unet.config.sample_size ×
    vae_scale_factor; SD 1.x 512, tiny 32)."""
    if height is not None and width is not None:
        return height, width
    h, w = native_size(model.source, model.revision)
    return height or h, width or w


def load_locked_encoder(models_dir: Path) -> tuple[dict[str, Any], Any, TextEncoderAdapter]:
    """(lock, tokenizer, adapter) of the locked model's text encoder, in eval mode on the CPU."""
    lock = read_lock(models_dir)
    tokenizer, model = load_text_encoder(lock["source"], lock["revision"])
    return lock, tokenizer, TextEncoderAdapter(model, lock["text_layer_template"], lock["text_block_template"])
