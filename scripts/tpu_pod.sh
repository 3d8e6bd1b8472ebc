#!/bin/bash
# A TPU VM pod slice: the same command on every worker; jax.distributed finds the others by
# itself (TPU_WORKER_HOSTNAMES). Worker 0 serves HTTP.
#   TPU=my-v5e-16 ZONE=us-west4-a scripts/tpu_pod.sh
set -euo pipefail
: "${TPU:?name of the TPU VM}" "${ZONE:?its zone}"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "pip install -q shardinfer && shardinfer serve --mesh data=-1,model=4 --port 8000"
