"""Train a stage: ``python train.py experiment=ae_f8`` (see configs/ and the README)."""

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import ldm.utils.config  # noqa: F401  (resolvers must exist before Hydra composes)
from ldm.callbacks.preemption import Preempted
from ldm.training import train
from ldm.utils.entry import hydra_run_dir, run_or_report

EXPERIMENTS = Path(__file__).resolve().parent / "configs" / "experiment"


def check_experiment(cfg: DictConfig) -> None:
    """A run names what it trains: an experiment, or a task_name of its own (then the settings are the user's)."""
    if cfg.task_name == "train":
        names = ", ".join(sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")))
        raise ValueError(f"no experiment chosen: run python train.py experiment=<name> with one of {names} "
                         "(configs/experiment/), e.g. python train.py experiment=ae_f8; or give your own setup a "
                         "task_name=... and a budget (trainer.max_time=... or trainer.max_steps=...)")


def stop_on_signal(job: Callable[[], Any]) -> Any:
    """``job()``; a run stopped by a signal (ldm.callbacks.preemption) ends with one line on rank 0 naming its
    checkpoint and how it resumes, and exit status 128 + the signal's number on every rank."""
    try:
        return job()
    except Preempted as stop:
        if stop.rank == 0:
            overrides = " ".join(o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path="))
            sys.stderr.write(stop.line(f"python train.py {overrides}".strip()) + "\n")
        sys.exit(stop.exit_code)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # On a mistake, the empty run folder goes, and logs/<task>/runs with it when nothing else is there.
    metrics = stop_on_signal(lambda: run_or_report(lambda: (check_experiment(cfg), train(cfg))[1], hydra_run_dir(),
                                                   empty_parents=2))
    monitor = cfg.get("optimized_metric")
    return metrics.get(monitor) if monitor else None


if __name__ == "__main__":
    main()
