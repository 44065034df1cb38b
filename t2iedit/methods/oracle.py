"""The unedited model as a method: its artifact changes no weight.

Two rows of the comparison use it (registry in ``t2iedit.methods``):

- ``unedited`` — the paper's **Oracle** row (its first row; METHOD.md §7): the unedited model on the
  *test* prompts, hence CAKE Efficacy 0, RoAD 3.56, TIMED 25;
- ``oracle`` — the unedited model on the dataset's oracle prompts (prompts that already describe the
  target, e.g. RoAD's "Beyonce as Canada's Prime Minister"): what a perfect edit would look like.

Neither changes a weight, so their images are the unedited model's: compare reuses the main run's
(``tasks.evaluate.images_key`` without an edit) instead of generating them again.
"""

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
