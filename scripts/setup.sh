#!/usr/bin/env bash
# Set up everything vieval-runner needs on a fresh machine: .venv holding exactly the tested
# set in requirements.lock (torch included), the package itself (editable), and Debian's
# chromium for the viewer's browser tests when apt is available. Idempotent: a .venv already
# matching the lock is left alone; one that differs (CI reusing a venv) is synced to it:
# packages at other versions are reinstalled at the locked ones, packages the lock does not
# name are removed. Re-lock with scripts/lock.sh (docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
LOCK=requirements.lock

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
here_editable() {  # the package is importable from this checkout
  .venv/bin/python -c "import sys, vieval_runner as v; sys.exit(not v.__file__.startswith('$PWD/'))" \
    2>/dev/null
}
if .venv/bin/python scripts/lockfile.py diff "$LOCK" >/dev/null 2>&1 && here_editable; then
  echo "setup: .venv matches $LOCK"
else
  echo "setup: installing $LOCK ($(grep -c '==' "$LOCK") pinned packages, torch included) into .venv"
  .venv/bin/python -m pip install -q -r "$LOCK"
  .venv/bin/python -m pip install -q --no-deps -e .
  mapfile -t extra < <(.venv/bin/python scripts/lockfile.py extraneous "$LOCK" | grep .)
  if ((${#extra[@]})); then
    echo "setup: removing what $LOCK does not name: ${extra[*]}"
    .venv/bin/python -m pip uninstall -q -y "${extra[@]}"
  fi
  .venv/bin/python scripts/lockfile.py diff "$LOCK"  # fails loudly if pip could not match it
fi

if [[ ! -x /usr/bin/chromium ]]; then
  if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    echo "setup: installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: chromium could not be installed; browser tests will be skipped"
  else
    echo "setup: no /usr/bin/chromium and no root apt-get; browser tests will be skipped"
  fi
fi
echo "setup: done (.venv ready)"
