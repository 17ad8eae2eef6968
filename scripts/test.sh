#!/usr/bin/env bash
# Sets up (with the test peers), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --peers
# loadscope: a module's tests share one worker, so its module fixtures (trained runs) are built once;
# modules go out in tests/conftest.py's order (longest first), not xdist's (most tests first).
exec .venv/bin/python -m pytest -n 2 --dist loadscope --no-loadscope-reorder "$@"
