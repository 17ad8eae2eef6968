#!/usr/bin/env bash
# Sets up, then trains the embedded default (Fashion-MNIST) in runs/fashion_mnist.
# Re-running resumes from the newest checkpoint. Extra flags go to main.py,
# e.g. --config.training.num_train_steps=500.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python main.py --config=configs/fashion_mnist.py \
  --workdir="${WORKDIR:-runs/fashion_mnist}" "$@"
