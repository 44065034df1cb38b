"""Stage projector: the null-space projector P of every edited layer (METHOD.md §3).

``python -m flows.projector`` (DVC stage ``projector``) reads params.yaml ``projector``,
data/statistics/moments and the held-out moments data/statistics/heldout; writes
data/projector/layers/layer_XX.safetensors (P, eigenvalues; null rank, mode, threshold and the protected
energies in the sidecar), the DVC metrics data/projector/metrics.json (per layer: null rank,
``protected_energy`` = 1 − tr(P C0)/tr(C0), ``heldout_energy`` the same on the held-out keys), the DVC
plot data data/projector/spectrum/layer_XX.csv and data/projector/spectrum.png (spectrum + cut).
``projector.mode``/``value`` null (the default): the locked model preset's calibrated rule
(``t2iedit.projector.CALIBRATED``, from data/models/lock.json), recorded under ``rule`` in the metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow

from flows.reporting import logger, table_artifact
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from t2iedit.projector import calibrated_rule
from t2iedit.storage import load_meta, read_json, write_json
from tasks.model import read_lock
from tasks.fingerprints import fingerprint, item_fingerprint
from tasks.stamps import prune
from tasks.projector import build_projector, projector_file, write_projector_metrics, write_spectrum

MODELS_DIR = Path("data/models")
MOMENTS = Path("data/statistics/moments")
HELDOUT = Path("data/statistics/heldout")
OUT = Path("data/projector")
LAYERS_DIR, METRICS = OUT / "layers", OUT / "metrics.json"
SPECTRUM, SPECTRUM_PNG = OUT / "spectrum", OUT / "spectrum.png"
CODE = ["t2iedit.projector", "t2iedit.keys", "t2iedit.storage", "tasks.projector"]


class ProjectorParams(StageParams):
    # both null: the model preset's calibrated rule (t2iedit.projector.CALIBRATED, METHOD.md §3)
    mode: Literal["absolute", "relative", "rank", "energy"] | None = None
    # threshold (absolute), fraction of the largest eigenvalue (relative), rank, or the share of tr(C0)
    # allowed in the null space (energy)
    value: float | None = None


def resolve_rule(p: ProjectorParams, preset: str) -> tuple[str, float, str]:
    """``(mode, value, where from)``: the params' rule, or both null: the preset's calibrated one."""
    if (p.mode is None) != (p.value is None):
        raise ValueError("params.yaml projector: set both mode and value, or neither (null: the model "
                         f"preset's calibrated rule); got mode={p.mode!r}, value={p.value!r}")
    if p.mode is None:
        mode, value = calibrated_rule(preset)
        return mode, value, f"calibrated for preset {preset}"
    return p.mode, p.value, "params.yaml"


@flow(name="projector")
def projector(params_file: str = PARAMS_FILE) -> dict[int, Path]:
    p = load_params("projector", ProjectorParams, params_file)
    preset = read_lock(MODELS_DIR)["preset"]
    mode, value, source = resolve_rule(p, preset)
    fp = fingerprint("projector", p, inputs=[MOMENTS, HELDOUT], code=CODE, extra={"rule": [mode, value]})
    moments = {int(load_meta(f)["layer"]): f for f in MOMENTS.glob("layer_*.safetensors")}
    if not moments:
        raise FileNotFoundError(f"no second moments in {MOMENTS}: run the statistics stage first")
    heldout = {int(load_meta(f)["layer"]): f for f in HELDOUT.glob("layer_*.safetensors")}
    layers = sorted(moments)
    if set(heldout) != set(layers):
        raise FileNotFoundError(f"{HELDOUT} has held-out moments of layers {sorted(heldout)}, the projector "
                                f"needs {layers}: rerun the statistics stage")
    outs = [projector_file(LAYERS_DIR, layer) for layer in layers]
    futures = build_projector.map(outs, [item_fingerprint(fp, layer) for layer in layers],
                                  [moments[layer] for layer in layers], mode, value,
                                  [heldout[layer] for layer in layers])
    done = dict(zip(layers, (f.result() for f in futures)))
    prune(LAYERS_DIR, keep=outs)
    write_projector_metrics(METRICS, done)
    write_json(METRICS, {"rule": {"mode": mode, "value": value, "source": source}, **read_json(METRICS)})
    prune(SPECTRUM, keep=write_spectrum(SPECTRUM, SPECTRUM_PNG, done)[:-1])
    rows = [{"layer": layer, "null_rank": (m := load_meta(path))["null_rank"],
             "protected_energy": round(m["protected_energy"], 4), "heldout_energy": round(m["heldout_energy"], 4)}
            for layer, path in done.items()]
    table_artifact("projector-null-rank", rows, description=f"null-space rank per layer ({mode} {value:g}, {source})")
    logger().info("projectors: %s", rows)
    return done


if __name__ == "__main__":
    run_stage(projector)
