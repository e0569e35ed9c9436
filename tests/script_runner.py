"""Run a script of this repository (``train.py``, ``sample.py``, ``scripts/*.py``, ``benchmarks/*.py``) as a user
would, ``python SCRIPT ARGS...``, without paying the interpreter's start each time.

Most of a tiny CLI run's seconds go to importing torch, Lightning, torchvision and open_clip. Here the script runs
as ``__main__`` in a child process forked from a server process (``multiprocessing``'s forkserver, started once
per test worker) that has imported those third-party packages and nothing of ``ldm``: the child gets its own
environment, working directory, argv and stdout/stderr files, imports the framework itself (so a missing import
in a script still fails), and its exit status is the script's (``sys.exit``, ``2`` for a user error, ``1`` with a
traceback on stderr for an uncaught exception). Processes the script starts itself (DDP ranks, benchmark parts)
are ordinary fresh interpreters. Tests about signals, launchers or the documented shell commands start real
processes instead; ``LDM_TEST_FRESH_PROCESSES=1`` makes this module do so too.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ["torch", "torchvision", "lightning", "hydra", "omegaconf", "open_clip", "webdataset", "safetensors"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(script: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """In the forked child: become ``python script *args`` and exit with its status."""
    import runpy
    import traceback

    for fd, path in ((1, out), (2, err)):  # the files stand in for the pipes, C-level writes and children included
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    multiprocessing.set_start_method(None, force=True)  # the platform's default again (forkserver set its own)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)  # as the interpreter sets it for a script
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if stop.code is not None and not isinstance(stop.code, int):
            sys.stderr.write(f"{stop.code}\n")
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def run_script(script: str | Path, *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, script, *args], capture_output=True, text=True, ...)``, faster."""
    script, cwd = str(script), str(cwd or os.getcwd())
    env = dict(os.environ if env is None else env)
    if os.environ.get("LDM_TEST_FRESH_PROCESSES") == "1":
        return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=cwd)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        proc = _forkserver().Process(target=_child, args=(script, list(args), env, cwd, str(out), str(err)))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([script, *args], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess([sys.executable, script, *args], proc.exitcode,
                                           out.read_text(errors="replace"), err.read_text(errors="replace"))
