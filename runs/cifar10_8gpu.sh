#!/usr/bin/env bash
# The cifar10 preset on the 8 GPUs of one machine: torchrun starts one process per GPU (each
# picks its GPU from LOCAL_RANK) and the gradients are averaged with NCCL.
# --batch-size is the global batch, split across the processes: 512 is 64 per GPU, as the
# official 8-GPU run (64 images per MPI process). Scale --lr with care: the official run kept 1e-3.
set -euo pipefail
# Download once before starting the processes (rank 0 alone would download, the others would not wait).
python -c 'from torchglow.data import load_dataset; load_dataset("cifar10", "train", data_dir="data/cifar10", download=True)'
# --out is explicit: the default name holds the start time, which could differ between processes.
# Resume with the same launcher: torchrun --standalone --nproc_per_node=8 -m torchglow train --resume runs/cifar10-8gpu
torchrun --standalone --nproc_per_node=8 -m torchglow train --preset cifar10 --data-dir data/cifar10 \
    --batch-size 512 --out runs/cifar10-8gpu "$@"
