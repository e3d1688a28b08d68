"""bench/bench_head.py end to end on a small head: a row per round for every width and
dtype, both forms timed, and the median of the rounds' ratios."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # the bench as a process


def test_bench_head_times_both_forms_per_round_and_prints_the_median():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_head.py"), "--rows", "24", "--widths",
           "16,8", "--vocab", "50", "--dtypes", "fp32,bf16", "--repeats", "2", "--rounds", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "avx512_bf16" in out.stdout and "24 targets, vocab 50" in out.stdout
    rounds = re.findall(r"^\s*(\d+) (fp32|bf16)\s+(\d) +[\d.]+ +[\d.]+ +([\d.]+)x$",
                        out.stdout, re.M)
    assert [(w, d, r) for w, d, r, *_ in rounds] == [
        (w, d, r) for w in ("16", "8") for d in ("fp32", "bf16") for r in "123"]
    assert all(float(r) > 0 for *_, r in rounds)
    medians = re.findall(r"^\s*(\d+) (fp32|bf16)\s+median plain / fused ([\d.]+)x$",
                         out.stdout, re.M)
    assert [(w, d) for w, d, _ in medians] == [(w, d) for w in ("16", "8")
                                                for d in ("fp32", "bf16")]
