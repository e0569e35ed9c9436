"""Every benchmark script runs (tiny, under --smoke), so none can rot unnoticed; committed results stay untouched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.script_runner import run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "common.py")


def test_every_benchmark_script_is_smoke_tested():
    assert set(SCRIPTS) == {"allocator.py", "autoencoder_f.py", "fsdp_check.py", "gpu_report.py", "mfu.py",
                            "op_count.py", "recipes.py", "sampler_convergence.py", "sampling.py", "throughput.py",
                            "train_step.py"}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_under_smoke(script, tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    env = {**os.environ, "LDM_BENCH_SMOKE_DIR": str(tmp_path)}
    res = run_script(ROOT / "benchmarks" / script, "--smoke", cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    written = list((tmp_path / "results").glob("*.md"))
    assert written and all("|" in p.read_text() for p in written)  # a table was written, under the smoke folder
    if script == "gpu_report.py":  # the part's own table, gathered from its child process
        assert "ldm_f8 loop" in (tmp_path / "results" / "gpu_report.md").read_text().split("## gpu_ldm_f8_loop")[1]
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*")} == before
