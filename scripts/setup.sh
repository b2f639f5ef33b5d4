#!/usr/bin/env bash
# Set up everything vieval-runner needs on a fresh machine (idempotent, reuses .venv).
# Torch comes from the pinned release (on this kind of machine pip takes it from local disk);
# Debian's chromium is installed for the viewer's browser tests when apt is available.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing torch==2.14.1 torchvision==0.29.1"
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "setup: installing vieval-runner and its dev tools"
.venv/bin/python -m pip install -q -e ".[dev]"

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
