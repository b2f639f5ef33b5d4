"""Smoke test of scripts/bench_scoring.py at its --quick sizes on the CPU, so it cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAST_LINE = re.compile(r"^grounding step 600 specimens: per-specimen loop / batched = \d+\.\d$")


@pytest.mark.slow
def test_quick_run_prints_every_figure_and_the_ratio_last():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_scoring.py"), "--quick"],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    ).stdout  # fmt: skip
    lines = out.strip().splitlines()
    assert lines[1].startswith("ANLS step, 600 answers")
    assert lines[2].startswith("rescore, 2 stored steps x 100 specimens")
    assert "store reads" in lines[2] and "metric code" in lines[2]
    assert lines[3].startswith("rescore, 76% of outputs as at the step before, 2 stored steps")
    assert lines[4].startswith("grounding step, 600 specimens")
    assert lines[5].startswith("scored grounding step, 600 specimens")
    assert lines[6].startswith("its 95% intervals")
    assert "equal AP" in lines[7]  # pycocotools (dev extra) is the baseline
    assert LAST_LINE.match(lines[-1]), lines[-1]
