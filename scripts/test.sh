#!/usr/bin/env bash
# Sets up (with the test peers), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --peers
exec .venv/bin/python -m pytest -n 2 "$@"
