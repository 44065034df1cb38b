"""Stage projector: the null-space projector P of every edited layer (METHOD.md §3).

``python -m flows.projector`` (DVC stage ``projector``) reads params.yaml ``projector`` and
data/statistics/moments; writes data/projector/layers/layer_XX.safetensors (P, eigenvalues; null rank,
mode and threshold in the sidecar) and the DVC metrics data/projector/metrics.json (null rank per layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow

from flows.reporting import logger, table_artifact
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from t2iedit.storage import load_meta
from tasks.fingerprints import fingerprint, item_fingerprint
from tasks.stamps import prune
from tasks.projector import build_projector, projector_file, write_projector_metrics

MOMENTS = Path("data/statistics/moments")
OUT = Path("data/projector")
LAYERS_DIR, METRICS = OUT / "layers", OUT / "metrics.json"
CODE = ["t2iedit.projector", "t2iedit.keys", "t2iedit.storage", "tasks.projector"]


class ProjectorParams(StageParams):
    mode: Literal["absolute", "relative", "rank"] = "relative"
    value: float = 1.0e-2  # threshold (absolute), fraction of the largest eigenvalue (relative) or rank


@flow(name="projector")
def projector(params_file: str = PARAMS_FILE) -> dict[int, Path]:
    p = load_params("projector", ProjectorParams, params_file)
    fp = fingerprint("projector", p, inputs=[MOMENTS], code=CODE)
    moments = {int(load_meta(f)["layer"]): f for f in MOMENTS.glob("layer_*.safetensors")}
    if not moments:
        raise FileNotFoundError(f"no second moments in {MOMENTS}: run the statistics stage first")
    layers = sorted(moments)
    outs = [projector_file(LAYERS_DIR, layer) for layer in layers]
    futures = build_projector.map(outs, [item_fingerprint(fp, layer) for layer in layers],
                                  [moments[layer] for layer in layers], p.mode, p.value)
    done = dict(zip(layers, (f.result() for f in futures)))
    prune(LAYERS_DIR, keep=outs)
    write_projector_metrics(METRICS, done)
    rows = [{"layer": layer, "null_rank": load_meta(path)["null_rank"]} for layer, path in done.items()]
    table_artifact("projector-null-rank", rows, description=f"null-space rank per layer ({p.mode} {p.value})")
    logger().info("projectors: %s", rows)
    return done


if __name__ == "__main__":
    run_stage(projector)
