"""Editing methods behind one interface (docs/BASELINES.md): name → :class:`Method`.

``compute_edit(name, requests, stats, components, params)`` builds the method's config from a params
mapping (unknown keys fail; an ablation's defining setting cannot be overridden) and returns the
``EditArtifact``. Methods: ``ours`` (default), ``unedited`` (the paper's Oracle row: no edit, test
prompts), ``oracle`` (no edit, oracle prompts), ``time``, ``refact``, ``emcid`` and the
ablations ``ours-no-projector`` (P = I), ``ours-no-eata`` (α = 0), ``ours-no-visual`` (λ = 0).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

from t2iedit.edit import EditArtifact
from t2iedit.methods.base import Components, Method, SharedStats, build_config
from t2iedit.methods.emcid import EMCID_VALUES, EmcidConfig, compute_emcid
from t2iedit.methods.oracle import OracleConfig, compute_oracle
from t2iedit.methods.per_dataset import dataset_defaults
from t2iedit.methods.ours import OursConfig, compute_ours
from t2iedit.methods.refact import RefactConfig, refact_method
from t2iedit.methods.time_crossattn import TimeConfig, time_method
from t2iedit.prompts import EditRequest

__all__ = ["METHODS", "Components", "Method", "SharedStats", "build_config", "compute_edit",
           "dataset_defaults", "get_method"]


def _ours(name: str, description: str, fixed: Mapping[str, Any] | None = None) -> Method:
    fixed = dict(fixed or {})
    return Method(name, partial(compute_ours, method=name), OursConfig, description, fixed=fixed,
                  needs_projectors=fixed.get("use_projector", True))


METHODS: dict[str, Method] = {m.name: m for m in (
    _ours("ours", "values with text + EATA + visual loss; null-space constrained solve (eq. 7)"),
    # the paper's Oracle row: the unedited model on the test prompts (METHOD.md §7)
    Method("unedited", partial(compute_oracle, method="unedited"), OracleConfig,
           "Oracle (unedited): the unedited model on the test prompts (the paper's first row)"),
    Method("oracle", partial(compute_oracle, method="oracle"), OracleConfig,
           "unedited model on the dataset's oracle prompts (what the edit should look like)",
           oracle_prompts=True),
    Method("time", partial(time_method, method="time"), TimeConfig,
           "TIME: closed-form edit of UNet cross-attention to_k/to_v, edits in sequence"),
    Method("refact", partial(refact_method, method="refact"), RefactConfig,
           "ReFACT: rank-one ROME edit of one text-encoder fc2, edits in sequence",
           needs_moments=True),
    Method("emcid", partial(compute_emcid, method="emcid"), EmcidConfig,
           "EMCID: values with noise loss 1 + text 0.01, MEMIT solve with λC0", needs_moments=True,
           defaults={"values": {"alpha": EMCID_VALUES.alpha, "text_weight": EMCID_VALUES.text_weight,
                                "lambda_visual": EMCID_VALUES.lambda_visual,
                                "weight_decay": EMCID_VALUES.weight_decay}}),
    _ours("ours-no-projector", "ablation: P = I", {"use_projector": False}),
    _ours("ours-no-eata", "ablation: α = 0 (no entity-aware term)", {"values": {"alpha": 0.0}}),
    _ours("ours-no-visual", "ablation: λ = 0 (no visual loss)", {"values": {"lambda_visual": 0.0}}),
    _ours("ours-entity-keys", "beyond the paper: each entity's standalone-prompt keys preserved by the solve",
          {"entity_keys": "preserve"}),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def compute_edit(name: str, requests: Sequence[EditRequest], stats: SharedStats,
                 components: Components, params: Mapping[str, Any] | None = None) -> EditArtifact:
    """Run method ``name`` on all ``requests`` (large-scale mode) and return its artifact."""
    method = get_method(name)
    if not requests:
        raise ValueError("no edit requests")
    return method.fn(requests, stats, components, build_config(method, params))
