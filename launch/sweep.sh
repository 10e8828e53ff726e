#!/usr/bin/env bash
# Runs one experiment per (temperature, alpha_ce, alpha_mlm, alpha_cos) point, each in its own
# workdir under ROOT, one after the other on this machine (resumable: finished runs skip).
#
#   launch/sweep.sh experiments/tiny.py workdirs/sweep "1 2 4" "5,2,1 5,2,0 0,2,1"
set -euo pipefail
experiment=$1 root=$2 temperatures=$3 alphas=$4
shift 4
for t in $temperatures; do
  for a in $alphas; do
    IFS=, read -r ce mlm cos <<<"$a"
    workdir="$root/T${t}_ce${ce}_mlm${mlm}_cos${cos}"
    if [ -f "$workdir/export/config.json" ]; then echo "done: $workdir"; continue; fi
    python -m distil_jax.main --config="$experiment" --workdir="$workdir" \
      --config.distill.temperature="$t" --config.distill.alpha_ce="$ce" \
      --config.distill.alpha_mlm="$mlm" --config.distill.alpha_cos="$cos" "$@"
  done
done
