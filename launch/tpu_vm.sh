#!/usr/bin/env bash
# Creates a TPU VM (or pod slice), installs distil_jax on every host and starts one experiment.
#
#   REPO=GIT_URL launch/tpu_vm.sh NAME ZONE ACCELERATOR EXPERIMENT WORKDIR [--config.K=V ...]
#   e.g. REPO=https://github.com/you/distil_jax.git \
#        launch/tpu_vm.sh distil us-central2-b v4-32 experiments/bert_base.py distilbert_run
#
# On a pod slice every host runs the same command with --distributed: JAX's own multi-host
# runtime (jax.distributed) builds one device mesh over all hosts, and each host reads its own
# shard of the data. Re-running the same command after a preemption resumes from WORKDIR.
set -euo pipefail
name=$1 zone=$2 accelerator=$3 experiment=$4 workdir=$5
shift 5
repo=${REPO:?set REPO to the git URL of your distil_jax repository}

if ! gcloud compute tpus tpu-vm describe "$name" --zone="$zone" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator" \
    --version=tpu-ubuntu2204-base
fi

gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e
  test -d distil_jax || git clone $repo distil_jax
  cd distil_jax && git pull --ff-only
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'
  .venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
  nohup .venv/bin/python -m distil_jax.main --distributed --config=$experiment \
    --workdir=$workdir $* > distil.log 2>&1 &
"
echo "started; follow with: gcloud compute tpus tpu-vm ssh $name --zone=$zone --worker=0 --command='tail -f distil_jax/distil.log'"
