#!/usr/bin/env bash
# Re-lock: resolve the package with every extra (dev, trackers, ...) afresh in a throwaway venv,
# the newest releases pyproject.toml's ranges allow with torch pinned, and write every
# direct and transitive dependency, exact, to requirements.lock (what scripts/setup.sh installs).
#
#     bash scripts/lock.sh                       # then: bash scripts/setup.sh && .venv/bin/python -m pytest -q
#     TORCH_PINS="torch==2.15.0 torchvision==0.30.0" bash scripts/lock.sh   # move torch on purpose
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH_PINS=${TORCH_PINS:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${LOCK_EXTRAS:-$("$PYTHON" scripts/lockfile.py extras)}

venv=$(mktemp -d "${TMPDIR:-/tmp}/vieval-lock.XXXXXX")
trap 'rm -rf "$venv"' EXIT
echo "lock: resolving vieval-runner[$EXTRAS] with $TORCH_PINS in a fresh venv ($venv)"
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086  # TORCH_PINS is a list of requirements
"$venv/bin/python" -m pip install -q $TORCH_PINS -e ".[$EXTRAS]"
"$venv/bin/python" scripts/lockfile.py write requirements.lock
git diff --stat -- requirements.lock 2>/dev/null || true
echo "lock: done; run the suite on it: bash scripts/setup.sh && .venv/bin/python -m pytest -q"
