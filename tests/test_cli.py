"""train.py and sample.py end a user's mistake with one line naming the key and the fix, exit code 2, no
traceback, and leave no empty run folder behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _run(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"LDM_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("args,needles", [
    ((), ("no experiment chosen", "experiment=<name>", "ae_f8", "ldm_f8_zsnr")),
    (("experiment=ldm_f8",), ("no exported first_stage at", "Make it with: python train.py experiment=ae_f8")),
    (("experiment=ae_f8", "data.batch_size=abc"), ("data.batch_size='abc': expected an integer >= 1",)),
    (("experiment=ae_f8", "trainer.gradient_clip_val=1.0"), ("model.grad_clip=1.0",)),
])
def test_train_py_mistakes_are_one_line_and_leave_no_run_folder(tmp_path, args, needles):
    _one_line_error(_run("train.py", tmp_path, *args), *needles)
    logs = tmp_path / "logs"
    assert not logs.exists() or not any(p.is_file() for p in logs.rglob("*")), list(logs.rglob("*"))


def test_sample_py_checks_arguments_before_loading_and_says_how_to_make_a_model(tmp_path):
    _one_line_error(_run("sample.py", tmp_path, "steps=0", "model_path=does/not/exist"), "steps=0")
    _one_line_error(_run("sample.py", tmp_path, "cfg_scale=-3", "model_path=does/not/exist"), "cfg_scale=-3")
    _one_line_error(_run("sample.py", tmp_path, "eta=0.5"), "sampler 'dpmpp_2m' does not use ['eta']")
    (tmp_path / "notes.txt").write_text("not an image")
    _one_line_error(_run("sample.py", tmp_path, "init_image=notes.txt"), "init_image=notes.txt: not an image")
    _one_line_error(_run("sample.py", tmp_path, "model_path=does/not/exist"), "no model at does/not/exist",
                    "python train.py experiment=ldm_f8")
    _one_line_error(_run("sample.py", tmp_path, "experiment=ldm_f4"), "no model at", "exports/ldm_f4")
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").rglob("*.log"))


def test_sample_py_help_describes_its_keys():
    res = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0
    for key in ("experiment=ldm_f8", "class_labels=", "sampler=dpmpp_2m", "cfg_scale=", "mask=PATH", "Examples:"):
        assert key in res.stdout, key
    assert "Configuration groups" not in res.stdout
