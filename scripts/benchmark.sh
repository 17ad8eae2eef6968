#!/usr/bin/env bash
# Sets up, then runs the benchmark suite (ddpm-jax next to diffusers + PyTorch
# and the machine's measured limit): prints a Markdown table and writes
# benchmarks/results.json. benchmarks/run.py installs its peers (CPU PyTorch,
# diffusers) itself when they are missing. Arguments go to run.py, e.g.
#   scripts/benchmark.sh --quick          # a seconds-long smoke of every row
#   scripts/benchmark.sh --rows pair,peak # only rows 1-3
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python benchmarks/run.py "$@"
