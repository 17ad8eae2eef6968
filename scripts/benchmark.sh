#!/usr/bin/env bash
# Sets up (with the pinned peers of requirements-peers.txt: CPU PyTorch,
# diffusers), then runs the benchmark suite: ddpm-jax next to diffusers +
# PyTorch and the machine's measured limit, every number in
# benchmarks/results.json. Arguments go to benchmarks/run.py, e.g.
#   scripts/benchmark.sh --quick          # every row with tiny sizes (smoke)
#   scripts/benchmark.sh --rows pair,peak # only rows 1-3
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --peers
exec .venv/bin/python benchmarks/run.py "$@"
