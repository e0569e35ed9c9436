"""Long work reports progress: a bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging

from ldm.utils.progress import Progress, track


def test_log_lines_when_not_a_terminal(caplog, monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr("ldm.utils.progress.time.monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="ldm.progress"):
        with Progress(100, "latent cache train", "img", every_s=25, terminal=False) as progress:
            for _ in range(10):
                progress.update(10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 3 and lines[-1].startswith("latent cache train: 100/100 img (100%)")
    assert "left" in lines[0] and "img/s" in lines[0]


def test_track_yields_everything_and_is_silent_when_disabled(caplog):
    with caplog.at_level(logging.INFO, logger="ldm.progress"):
        assert list(track(range(5), 5, "x", enabled=False)) == [0, 1, 2, 3, 4]
    assert not caplog.records


def test_training_logs_progress_lines_without_a_terminal(make_cfg, caplog, monkeypatch):
    from ldm.callbacks.progress import ProgressBar
    from ldm.training import train

    monkeypatch.setattr(ProgressBar, "__init__", _every_batch(ProgressBar.__init__))
    with caplog.at_level(logging.INFO, logger="ldm.progress"):
        train(make_cfg("ae_f8", "trainer.max_steps=6", "callbacks.export_first_stage=null"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training step")]
    assert lines and lines[-1].startswith("training step 6/6"), lines


def _every_batch(init):
    def patched(self, **kwargs):
        init(self, log_every_s=0.0, **kwargs)
        self._terminal = False

    return patched
