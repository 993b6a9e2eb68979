#!/usr/bin/env bash
# The official CIFAR-10 run (L=3, K=32, width 512, affine coupling, LU 1x1 convolutions, 8-bit,
# Adamax with lr 1e-3 after a 500,000-image warm-up, batch 64, 2000 epochs) on one GPU.
# The data set is downloaded into data/cifar10 on the first run.
# Stopped (Ctrl-C, preemption)? `python -m torchglow train --resume runs/cifar10` continues exactly.
# Faster and smaller: add `--precision bf16` (autocast of the coupling networks; log-dets and
# priors stay float32) and/or `--memory invertible` (activation memory independent of K).
set -euo pipefail
python -m torchglow train --preset cifar10 --data-dir data/cifar10 --download --device cuda \
    --out runs/cifar10 "$@"
