#!/usr/bin/env bash
# Set up normbench on a fresh machine: a virtualenv in .venv with the project installed.
#   bash scripts/install.sh         # to train
#   bash scripts/install.sh --dev   # + test dependencies (pytest, hadolint, Chromium, PostgreSQL, SLURM,
#                                   #   Debian's Fashion-MNIST files, Docker engine, debootstrap)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  # System packages the tests use: headless Chromium (report page), PostgreSQL 15 (shared Optuna
  # study), SLURM + munge (a real one-node cluster, scripts/slurm_one_node.sh), Fashion-MNIST's original
  # files in /usr/share/datasets/fashion-mnist (the real-data runs), and Docker's engine + debootstrap (the
  # image built and run on a local Debian base, tests/test_docker_engine.py). Installed with apt when
  # missing and we are root; the tests that need them skip otherwise.
  missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  [ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
  command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 || missing+=(slurm-wlm)
  command -v munged >/dev/null 2>&1 || missing+=(munge)
  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
else
  .venv/bin/python -m pip install --quiet -e .
fi
echo "normbench installed in $(pwd)/.venv"
