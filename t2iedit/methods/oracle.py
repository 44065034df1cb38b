"""Oracle: the unedited model. Its artifact changes no weight; evaluation additionally runs the
dataset's oracle prompts (prompts that already describe the target, e.g. RoAD's "Beyonce as Canada's
Prime Minister"), the upper reference row of the paper's tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from t2iedit.edit import EditArtifact
from t2iedit.methods.base import Components, SharedStats, make_manifest
from t2iedit.prompts import EditRequest


@dataclass(frozen=True)
class OracleConfig:
    pass


def compute_oracle(requests: Sequence[EditRequest], stats: SharedStats, components: Components,
                   config: OracleConfig, *, method: str = "oracle") -> EditArtifact:
    return EditArtifact({}, make_manifest(method, components, config, (), len(requests),
                                          {"edit_ids": [r.edit_id for r in requests]}))
