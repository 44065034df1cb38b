#!/usr/bin/env bash
# One command per table of the paper: every setting of that table, through the main pipeline, the
# method comparison and FID-5K (docs/PAPER.md).
#
#   scripts/paper.sh TABLE [--dry-run]     TABLE: timed | road (Table 2) | cake (Table 3)
#
#   --dry-run   print the parameters, the per-dataset baseline settings and the images and UNet
#               evaluations per stage and method (t2iedit.protocol), then exit 0 — no model is loaded.
#   otherwise   dvc exp run -n paper-TABLE with those parameters over params.yaml, on the targets
#               dvc.yaml (main pipeline), pipelines/compare/dvc.yaml:compare and pipelines/fid/dvc.yaml:fid.
#
# Environment: COCO_IMAGES (folder of COCO val2014 JPEGs) and INCEPTION_WEIGHTS (pytorch-fid's
# pt_inception-2015-12-05-6726825d.pth) for FID-5K; PAPER_EXP_ARGS: extra `dvc exp run` options.
# The models (CompVis/stable-diffusion-v1-4, dslim/bert-large-NER, the ViT-bigG judge) come from the
# Hugging Face cache or the Hub. Needs a GPU for any reasonable run time (see the dry run's counts).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: scripts/paper.sh timed|road|cake [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
table="$1"
case "$table" in timed|road|cake) ;; *) usage ;; esac
dry=0
if [ $# -eq 2 ]; then
    [ "$2" = "--dry-run" ] || usage
    dry=1
fi
python="${PYTHON:-python}"

if [ "$dry" = 1 ]; then
    exec "$python" scripts/paper.py "$table" --dry-run
fi

if [ -z "${COCO_IMAGES:-}" ] || [ -z "${INCEPTION_WEIGHTS:-}" ]; then
    echo "paper.sh: FID-5K needs COCO_IMAGES (COCO val2014 folder) and INCEPTION_WEIGHTS" \
         "(pt_inception-2015-12-05-6726825d.pth); set both (scripts/paper.sh $table --dry-run shows the plan)" >&2
    exit 2
fi
args=()
while IFS= read -r kv; do args+=(-S "$kv"); done < <("$python" scripts/paper.py "$table" --dvc-args)
# shellcheck disable=SC2086
dvc exp run -n "paper-$table" ${PAPER_EXP_ARGS:-} "${args[@]}" \
    dvc.yaml pipelines/compare/dvc.yaml:compare pipelines/fid/dvc.yaml:fid
