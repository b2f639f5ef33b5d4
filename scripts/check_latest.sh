#!/usr/bin/env bash
# Drift check: build .venv-latest from the newest releases pyproject.toml's ranges allow (not the
# lock; torch as new as pip here serves), print which versions differ from requirements.lock,
# run the whole suite there and print what failed. Exit status: the suite's.
#
#     bash scripts/check_latest.sh            # reuses .venv-latest, upgrading everything in it
#     bash scripts/check_latest.sh --fresh    # rebuilds .venv-latest from nothing
#     bash scripts/check_latest.sh -k lora    # extra arguments go to pytest
# Green: re-lock (bash scripts/lock.sh) to move the tested set forward. Red: the table says
# what moved, the failures say what broke (docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv-latest
if [[ ${1:-} == --fresh ]]; then
  shift
  rm -rf "$VENV"
fi
EXTRAS=${LOCK_EXTRAS:-$("$PYTHON" scripts/lockfile.py extras)}

if [[ ! -x $VENV/bin/python ]]; then
  echo "check_latest: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
echo "check_latest: installing the newest vieval-runner[$EXTRAS] dependencies the ranges allow"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[$EXTRAS]"

echo "check_latest: versions that differ from requirements.lock ($(date -u +%F))"
"$VENV/bin/python" scripts/lockfile.py diff requirements.lock || true

log=$VENV/pytest.log
echo "check_latest: running the suite in $VENV (log: $log)"
status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1 || status=$?
failed=$(grep -E '^(FAILED|ERROR) ' "$log" || true)
echo "check_latest: $(tail -n 1 "$log")"
if [[ -n $failed ]]; then
  echo "check_latest: failures on the newest versions:"
  echo "$failed"
fi
exit "$status"
