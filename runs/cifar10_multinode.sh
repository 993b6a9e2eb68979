#!/usr/bin/env bash
# The cifar10 preset on several machines of 8 GPUs each. Run this same script on every node, e.g.
#   NNODES=4 MASTER_ADDR=node0.cluster runs/cifar10_multinode.sh
# torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT (any node that all can reach; node 0
# here) gathers the NNODES nodes under one RUN_ID and gives every process its rank.
# data/ and runs/ must be on a file system every node sees: rank 0 writes the run folder and
# every rank reads last.pt on --resume (the same torchrun line with `train --resume runs/cifar10-multinode`).
set -euo pipefail
: "${NNODES:?set NNODES, the number of machines}" "${MASTER_ADDR:?set MASTER_ADDR, the host name of node 0}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
# Download once (on one node, before the others start) into the shared data/ folder:
#   python -c 'from torchglow.data import load_dataset; load_dataset("cifar10", data_dir="data/cifar10", download=True)'
# --batch-size is global: 64 images per GPU, as the official run.
torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${RUN_ID:-glow-cifar10}" \
    -m torchglow train --preset cifar10 --data-dir data/cifar10 \
    --batch-size $((64 * GPUS_PER_NODE * NNODES)) --out runs/cifar10-multinode "$@"
