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
