"""The baselines' per-dataset settings, as their authors ran them (docs/BASELINES.md).

``dataset_defaults(dataset, preset)`` returns ``{method: params}`` — a params mapping per method in the
form ``compute_edit``/``build_config`` take. The comparison applies it first and its own
``compare.method_params`` over it (an explicit setting always wins):
``build_config(method, deep_merge(dataset_defaults(ds, preset).get(name, {}), method_params.get(name, {})))``.

Sources (file:line):

- EMCID λ (``mom2_weight``): TIMED 4000 — SilentView/EMCID sh_scripts/timed_test.sh:8 (``MOM2``);
  RoAD 6000 — sh_scripts/road_test.sh:7.
- EMCID value lr (``v_lr``): TIMED 0.2 — timed_test.sh:5 runs
  hparams/dest_s-200_c-1.5_ly-11_lr-0.2_ewc-1e7_txt-align-0.01.json, whose line 9 is ``"v_lr": 0.2``;
  RoAD 0.1 — road_test.sh:5 runs hparams/dest_s-200_c-1.5_ly-11_lr-0.1_ewc-1e7_txt-align-0.01.json:9.
- ReFACT's edited layer (``--edit_layer``): RoAD 7 — technion-cs-nlp/ReFACT README.MD:24 ("Best
  configuration on RoAD"); TIMED 9 — README.MD:29 ("Best configuration on TIME dataset").

Those are layers of SD 1.x's 12-layer CLIP text encoder. For a preset with another depth (the tiny
ones: 6 layers) the layer is scaled, ``⌊l · n / 12⌋`` (9 → 4, 7 → 3 on 6 layers): no peer value
exists there, the scaling keeps the two datasets' layers apart and in the same relative place.
CAKE and user files have no published per-dataset setting: they get TIMED's (the methods' defaults,
TIMED being the benchmark both peers tuned on first), with the layer scaled the same way.
"""

from __future__ import annotations

from typing import Any

from t2iedit.models import ModelPreset, get_preset

#: SD 1.x's text encoder (CLIP ViT-L/14) depth, the layers the peers' settings refer to.
CLIP_LAYERS = 12

_EMCID = {"timed": {"lam": 4000.0, "lr": 0.2}, "road": {"lam": 6000.0, "lr": 0.1}}
_REFACT_LAYER = {"timed": 9, "road": 7}
DATASETS = ("timed", "road", "cake", "user")


def text_layers(preset: ModelPreset) -> int:
    """Number of text-encoder layers of a preset (SD 1.x: 12; embedded presets: their config)."""
    return int(preset.tiny_config["text_layers"]) if preset.tiny else CLIP_LAYERS


def scaled_layer(layer: int, preset: ModelPreset) -> int:
    """A layer index of SD 1.x's 12-layer encoder mapped to ``preset``'s depth, ``⌊l · n / 12⌋``."""
    return layer * text_layers(preset) // CLIP_LAYERS


def dataset_defaults(dataset: str, preset: str | ModelPreset = "sd-v1-4") -> dict[str, dict[str, Any]]:
    """``{method: params}`` of the baselines' per-dataset settings (see the module docstring)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, not {dataset!r}")
    p = get_preset(preset) if isinstance(preset, str) else preset
    ds = dataset if dataset in _EMCID else "timed"
    e = _EMCID[ds]
    return {"emcid": {"lam": e["lam"], "values": {"lr": e["lr"]}},
            "refact": {"layer": scaled_layer(_REFACT_LAYER[ds], p)}}


def method_params(method: str, dataset: str, preset: str | ModelPreset,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The params mapping of ``method`` on ``dataset``: :func:`dataset_defaults`, then ``overrides``
    (e.g. ``compare.method_params[method]``) merged over it key by key."""
    from t2iedit.methods.base import _deep_merge

    return _deep_merge(dataset_defaults(dataset, preset).get(method, {}), overrides or {})


def edits_dataset(datasets: list[str]) -> str:
    """The dataset of an edits table from its ``dataset`` column: the one name, else ``user``."""
    names = sorted(set(datasets))
    return names[0] if len(names) == 1 else "user"
