"""How train.py and sample.py end on a user's mistake: one line naming what is wrong, exit code 2.

A bad setting, path or file raises ``ValueError`` or ``OSError`` (``FileNotFoundError``...) with a message that
names the key, the value, what was expected and the command that fixes it. The entry points print that
message alone, without a traceback (``HYDRA_FULL_ERROR=1`` shows the full one), and remove the run folder
Hydra created for the run when nothing but Hydra's own files is in it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

USER_ERRORS = (ValueError, OSError)
HYDRA_OWN = {".hydra", "train.log", "sample.log", "main.log"}


def full_traceback() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def remove_if_empty(run_dir: str | Path | None, empty_parents: int = 0) -> bool:
    """Delete ``run_dir`` when it holds only what Hydra writes at start (its config copy and log file), and up to
    ``empty_parents`` of its parents (train.py: ``logs/<task>/runs``) that this leaves empty."""
    if run_dir is None or not Path(run_dir).is_dir():
        return False
    run_dir = Path(run_dir)
    if any(p.name not in HYDRA_OWN for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in list(run_dir.parents)[:empty_parents]:
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
    return True


def run_or_report(job: Callable[[], Any], run_dir: str | Path | None = None, empty_parents: int = 0) -> Any:
    """``job()``; a user error is printed as ``error: <message>`` on stderr and exits with code 2."""
    try:
        return job()
    except USER_ERRORS as err:
        if full_traceback():
            raise
        logging.getLogger("ldm").debug("stopped", exc_info=True)  # the trace stays in the run's log file
        removed = remove_if_empty(run_dir, empty_parents)
        sys.stderr.write(f"error: {err}\n")
        if not removed and run_dir is not None:
            sys.stderr.write(f"(the run folder {run_dir} keeps what was written; HYDRA_FULL_ERROR=1 shows the "
                             "traceback)\n")
        sys.exit(2)


def hydra_run_dir() -> str | None:
    """The output folder Hydra made for this run (None outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except ValueError:
        return None
