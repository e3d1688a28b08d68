"""bench/bench_serve.py end to end on the tiny model: its servers start, its clients stream,
a --variant runs beside this checkout, and the table has every row."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow  # two serve.py processes


def test_bench_serve_runs_a_variant_beside_this_checkout(tiny_model_dir, tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "bench_serve.py"), "--model_path",
           str(tiny_model_dir), "--work", str(tmp_path), "--clients", "1", "3", "--requests",
           "1", "--lengths", "3", "6", "--time_limit", "60", "--threads", "1",
           "--prompt_chars", "30", "--variant", "b4=--max_step_tokens 4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "messages of 30 characters" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| this |", "| b4 |"))]
    assert len(rows) == 4, out.stdout[-3000:]
    assert not any("not finished" in r for r in rows)
