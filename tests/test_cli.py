"""train.py and sample.py end a user's mistake with one line naming the key and the fix, exit code 2, no
traceback, and leave no empty run folder behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.script_runner import run_script


def _run(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"LDM_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return run_script(ROOT / script, *args, env=env, cwd=tmp_path)


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


def test_resuming_into_another_architecture_is_one_line_naming_tensors_settings_and_init_from(make_cfg, tmp_path,
                                                                                               data_dir):
    from ldm.training import train
    from tests.conftest import tiny_overrides

    train(make_cfg("ae_f8", "trainer.max_steps=2", "callbacks.export_first_stage=null"))
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(tmp_path, data_dir) if not o.startswith("paths.output_dir")]
    res = _run("train.py", tmp_path, "experiment=ae_f8", *overrides, "callbacks.export_first_stage=null",
               "trainer.max_steps=4", f"ckpt_path={run}", "model.autoencoder.ch=16")
    line = _one_line_error(res, "does not fit this model", "autoencoder.encoder.conv_in.weight [8, 3, 3, 3] there, "
                           "[16, 3, 3, 3] here", "model.autoencoder.ch=8 there, 16 here",
                           f"model.init_from={run}/checkpoints/last.ckpt")
    lines = res.stderr.strip().splitlines()
    assert len(lines) - lines.index(line) <= 4, lines  # the error and what follows it: at most 4 lines


def test_an_export_whose_config_is_not_yaml_is_one_line_naming_file_and_line(export_dir, tmp_path):
    import shutil

    export = tmp_path / "broken_export"
    shutil.copytree(export_dir / "ae_f8", export)
    config = export / "config.yaml"
    lines = config.read_text().splitlines()
    lines.insert(2, "model: [unclosed")
    config.write_text("\n".join(lines) + "\n")
    res = _run("sample.py", tmp_path, f"model_path={export}", "steps=1")
    line = _one_line_error(res, f"{config}, line ", "not valid YAML", "export the model again")
    assert re.search(r", line [34] column \d+:", line), line  # the broken line, or where YAML noticed it
    lines = res.stderr.strip().splitlines()
    assert len(lines) - lines.index(line) <= 4, lines
