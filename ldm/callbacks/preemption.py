"""A signal from a scheduler is a checkpoint: SIGTERM, SIGINT, SIGUSR1/2 end training with a complete checkpoint and a
non-zero exit (and, for SLURM's time-limit signal, a requeued job that resumes by itself).

The handler only notes the signal. At the end of the next training batch every rank learns whether any rank got one
(a max all-reduce over a gloo group, started one batch and read the next, so no step waits on it), and then all ranks
together: finish that batch, write ``last.ckpt`` (atomically; rank 0 writes, all wait for it), requeue the SLURM job
if the signal asks for it (rank 0 runs ``scontrol requeue <job id>``), and raise :class:`Preempted`, which train.py
turns into one line and exit status 128 + the signal's number. A watchdog ends the process with the same status
``timeout_s`` after the signal whatever happens (a rank stuck in a long validation, a dead peer): the time from
signal to exit is bounded, and the checkpoint written before is never a half-written one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from ldm.utils.launch import launched_by_slurm, slurm_job_id

log = logging.getLogger(__name__)

STOP, REQUEUE = 1, 2  # what a rank asks for; the max over ranks wins


class Preempted(Exception):
    """Training was stopped by ``signum`` after writing ``checkpoint`` (``requeued``: the SLURM job was requeued).

    ``disarm()`` stops the watchdog, for a caller that goes on in this process after catching it."""

    def __init__(self, signum: int, checkpoint: Path, step: int, requeued: bool, rank: int,
                 disarm: Callable[[], None] = lambda: None):
        self.signum, self.checkpoint, self.step, self.requeued, self.rank = signum, checkpoint, step, requeued, rank
        self.disarm = disarm
        super().__init__(self.line())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self, command: str = "python train.py <the same overrides>") -> str:
        name = signal.Signals(self.signum).name
        then = (f"the requeued job {slurm_job_id()} resumes from it by itself" if self.requeued
                else f"resume with: {command} ckpt_path={self.checkpoint}")
        return f"stopped by {name} at step {self.step}: checkpoint {self.checkpoint}; {then}"


class Preemption(Checkpoint):
    """Turns ``signals`` into a checkpoint and a non-zero exit; ``requeue_signals`` also requeue a SLURM job.

    A :class:`~lightning.pytorch.callbacks.Checkpoint`, so Lightning runs its batch-end hook after every other
    callback's (the EMA has taken the batch in when the checkpoint is written), as it does ModelCheckpoint's.

    Args:
        timeout_s: at most this long from the signal to the process's exit (then the watchdog ends it).
        signals: the signal names handled (a second SIGINT exits at once, for an impatient Ctrl-C).
        requeue_signals: those that mean "time is up, come back" (sbatch ``--signal=USR1@90``; submitit uses USR2):
            inside a SLURM job, rank 0 runs ``scontrol requeue`` after the checkpoint.
    """

    def __init__(self, timeout_s: float = 60.0, signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"),
                 requeue_signals: tuple[str, ...] = ("SIGUSR1", "SIGUSR2")):
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
            raise ValueError(f"callbacks.preemption.timeout_s={timeout_s!r}: expected seconds > 0")
        unknown = [s for s in (*signals, *requeue_signals) if not isinstance(s, str) or not hasattr(signal.Signals, s)]
        if unknown:
            raise ValueError(f"callbacks.preemption: unknown signal names {unknown}; expected e.g. SIGTERM, SIGUSR1")
        self.timeout_s = float(timeout_s)
        self.signals = [signal.Signals[s] for s in signals]
        self.requeue_signals = {signal.Signals[s] for s in requeue_signals}
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        self._sent: torch.Tensor | None = None
        self._work: Any = None
        self._checkpoint_written = False
        self._disarmed = threading.Event()

    # -- signals ---------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's own handlers (registered just before the loop starts), which these replace for the fit.
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._note)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # A host-side group of its own for the flag: reading it back never waits for a GPU stream, and it never
            # queues behind the gradients' reductions.
            self._group = dist.new_group(backend="gloo")

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                os._exit(128 + signum)
            return
        self.received = signum
        log.warning("received %s: finishing this step, then writing a checkpoint (exit within %.0f s)",
                    signal.Signals(signum).name, self.timeout_s)
        threading.Thread(target=self._watchdog, args=(signum,), daemon=True, name="preemption-watchdog").start()

    def _watchdog(self, signum: int) -> None:
        if self._disarmed.wait(self.timeout_s):
            return
        if self._checkpoint_written:
            sys.stderr.write(f"{signal.Signals(signum).name}: checkpoint written; exiting\n")
        else:
            sys.stderr.write(f"error: {signal.Signals(signum).name}: no checkpoint within callbacks.preemption."
                             f"timeout_s={self.timeout_s:.0f} s; exiting (the newest periodic checkpoint is kept)\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    # -- agreement and stop -----------------------------------------------------------------------------------------
    def _request(self) -> int:
        if self.received is None:
            return 0
        return REQUEUE if self.received in self.requeue_signals and launched_by_slurm() else STOP

    def _agreed(self, trainer: L.Trainer) -> int:
        """What all ranks ask for, as of the previous batch (single process: now)."""
        if trainer.world_size == 1 or not dist.is_initialized():
            return self._request()
        agreed = 0
        if self._work is not None:
            self._work.wait()
            agreed = int(self._sent.item())
        self._sent = torch.tensor([self._request()], dtype=torch.int32)
        self._work = dist.all_reduce(self._sent, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        action = self._agreed(trainer)
        if not action:
            return
        if self._work is not None:  # the in-flight reduction must not outlive the run
            self._work.wait()
        # A rank that got no signal itself (the launcher signalled another) stops with the first rank's reason.
        signum = self.received or (signal.SIGUSR1 if action == REQUEUE else signal.SIGTERM)
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self._checkpoint_written = True
        requeued = action == REQUEUE and self._requeue(trainer)
        log.warning("%s: checkpoint %s written at step %d", signal.Signals(signum).name, path, trainer.global_step)
        raise Preempted(signum, path, trainer.global_step, requeued, trainer.global_rank, self._disarmed.set)

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        """``last.ckpt`` of the run's checkpoint folder (what ``ckpt_path=last`` and a requeued job pick up)."""
        folder = next((c.dirpath for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath),
                      None)
        return Path(folder or Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"

    @staticmethod
    def _requeue(trainer: L.Trainer) -> bool:
        """Rank 0 asks SLURM to requeue this job (same job id); every rank learns whether it worked."""
        ok = False
        if trainer.is_global_zero:
            job = slurm_job_id()
            try:
                done = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True, timeout=30)
                ok = done.returncode == 0
                if done.returncode:
                    log.error("scontrol requeue %s failed (%d): %s", job, done.returncode, done.stderr.strip())
            except (OSError, subprocess.TimeoutExpired) as err:
                log.error("scontrol requeue %s failed: %s", job, err)
            else:
                if ok:
                    log.warning("requeued SLURM job %s", job)
        return bool(trainer.strategy.broadcast(ok, src=0))
