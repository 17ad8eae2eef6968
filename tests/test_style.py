"""One code style: the tree is as `ruff format` leaves it and passes `ruff check` (pyproject.toml)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*args):
  return subprocess.run(
    [sys.executable, '-m', 'ruff', *args, '--no-cache', '.'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


def test_the_tree_is_formatted():
  result = _ruff('format', '--check')
  assert result.returncode == 0, 'run `.venv/bin/ruff format .`:\n' + result.stdout[-3000:]


def test_the_tree_passes_the_linter():
  result = _ruff('check')
  assert result.returncode == 0, 'run `.venv/bin/ruff check --fix .`:\n' + result.stdout[-3000:]
