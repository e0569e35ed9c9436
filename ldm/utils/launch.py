"""What the launcher (SLURM's srun, torchrun, Lightning's own DDP launcher) tells a process about its job.

Read from the environment, before ``torch.distributed`` exists: Hydra needs the run folder, and every rank of a
job must name the same one, so that rank 0 alone writes into it and a restarted job (SLURM requeue, a torchrun
restart) finds its own checkpoints there and resumes by itself.
"""

from __future__ import annotations

import os

from lightning.fabric.plugins.environments import SLURMEnvironment

# Global rank as each launcher sets it (torchrun and Lightning's launcher: RANK; srun: SLURM_PROCID).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK")


def launched_by_slurm() -> bool:
    """An ``srun`` task of a batch job (Lightning's own test: not an interactive ``salloc``/``srun --pty bash``)."""
    return "SLURM_JOB_ID" in os.environ and SLURMEnvironment.detect()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def global_rank() -> int:
    """This process's rank as its launcher set it (0 when nothing launched it)."""
    if launched_by_slurm():
        return int(os.environ.get("SLURM_PROCID", 0))
    for name in RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return 0


def slurm_job_id() -> str | None:
    """The job id ``scontrol requeue`` takes (``<array job>_<task>`` for an array task), or None outside a job."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def shared_run_name() -> str | None:
    """A run-folder name every rank of this job computes alike and a restart of the job computes again:
    ``slurm-<job id>`` under srun, ``torchrun-<rdzv id>`` under torchrun given ``--rdzv-id`` (or ``--standalone``);
    None otherwise (a plain ``python train.py``, Lightning's own launcher, torchrun without an id)."""
    if launched_by_slurm():
        return f"slurm-{slurm_job_id()}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if launched_by_torchrun() and run_id not in ("", "none"):
        return f"torchrun-{run_id}"
    return None


def restart_count() -> int:
    """How often the scheduler has started this job before (SLURM requeues, torchrun restarts)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
