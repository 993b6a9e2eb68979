#!/usr/bin/env bash
# The digits preset on the CPU (scikit-learn's bundled 8x8 digits, no download): L=2, K=12,
# width 64, 60 epochs. On 2 otherwise idle cores it took 3 min 31 s (see README.md).
# Extra flags are passed on, e.g. `runs/digits_cpu.sh --epochs 10` or `--out runs/my-digits`.
set -euo pipefail
# One intra-op thread per free core: more threads than idle cores collapse the speed on a busy
# machine, so lower this when other jobs share the CPU.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m torchglow train --preset digits --device cpu "$@"
