#!/usr/bin/env bash
# Metric vs number of edits: one DVC experiment per N (datasets.max_edits), then the plot.
#
#   scripts/scale_sweep.sh run N [N ...]   for each N: dvc exp run --temp -n scale-N -S datasets.max_edits=N
#                                          (then `collect`). --temp: the workspace stays as it is; the
#                                          experiment sees committed files plus uncommitted changes to
#                                          tracked files, not untracked ones (git add them first).
#                                          An existing experiment scale-N is replaced.
#   scripts/scale_sweep.sh collect         dvc exp show --json -> $SWEEP_OUT/metric_vs_edits.{csv,_<test>.png}
#
# Environment: SWEEP_OUT (default data/reports/scale), SWEEP_METRIC (default Score; or Efficacy, ...).
# Extra `dvc exp run` options (e.g. other -S overrides) go in SWEEP_EXP_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${SWEEP_OUT:-data/reports/scale}"
metric="${SWEEP_METRIC:-Score}"
metrics_file="data/eval/metrics/summary/metrics.json"

# DVC experiments are git commits: a git-ignored metrics file is not in them, and `dvc exp show` then
# has no metrics to collect (same for `dvc metrics diff` between commits).
if git check-ignore -q "$metrics_file"; then
    cat >&2 <<MSG
scale_sweep: $metrics_file is git-ignored ($(git check-ignore -v "$metrics_file" | cut -f1)),
so DVC experiments would not record it. Let git see it, e.g. replace '/data/eval/' in .gitignore by:
  /data/eval/*
  !/data/eval/metrics/
  /data/eval/metrics/*
  !/data/eval/metrics/summary/
  /data/eval/metrics/summary/*
  !/data/eval/metrics/summary/metrics.json
MSG
    exit 3
fi

collect() {
    local json
    json="$(mktemp -t exp-show.XXXXXX)"
    dvc exp show --json >"$json"
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python scripts/scale_sweep.py --input "$json" --out "$out" --metric "$metric"
    rm -f "$json"
}

case "${1:-}" in
    run)
        shift
        [ "$#" -gt 0 ] || { echo "usage: $0 run N [N ...]" >&2; exit 2; }
        for n in "$@"; do
            [[ "$n" =~ ^[0-9]+$ ]] || { echo "N must be a positive integer, got '$n'" >&2; exit 2; }
        done
        for n in "$@"; do
            dvc exp remove "scale-$n" >/dev/null 2>&1 || true  # a rerun replaces the old result
            # shellcheck disable=SC2086
            dvc exp run --temp -n "scale-$n" -S "datasets.max_edits=$n" ${SWEEP_EXP_ARGS:-}
        done
        collect
        ;;
    collect)
        collect
        ;;
    *)
        echo "usage: $0 run N [N ...] | collect" >&2
        exit 2
        ;;
esac
