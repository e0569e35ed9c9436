"""Beyond one machine: every launch command of docs/scaling.md and scripts/slurm/train.sbatch, run as written
(2 "nodes" on localhost over gloo, tiny settings appended), signals that end in a checkpoint, SLURM requeue with a
fake ``scontrol``, elastic resume, and the data split over ranks checked by sample keys."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from ldm.data.loaders import ShardData
from tests.conftest import ROOT, TINY_LIMIT, assert_same_training_state, ldm_overrides, tiny_overrides

SCALING = ROOT / "docs" / "scaling.md"
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
KEYS = "+callbacks.keys._target_=tests.test_scale_out.KeyRecorder"


class KeyRecorder(L.Callback):
    """Test instrument: writes, per rank, the keys of every training batch with Lightning's epoch, the cluster
    environment Lightning chose and the world size, to ``<out>/keys_rank<N>_<pid>.json`` when training stops."""

    def __init__(self, out: str):
        self.out, self.batches = Path(out), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # At its start: a batch that begins is trained (a signal stops training after the batch's step).
        self.batches.append([trainer.current_epoch, list(batch["key"])])

    def _write(self, trainer):
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"batches": self.batches, "world": trainer.world_size, "rank": trainer.global_rank,
                  "environment": type(trainer.strategy.cluster_environment).__name__}
        (self.out / f"keys_rank{trainer.global_rank}_{os.getpid()}.json").write_text(json.dumps(record))

    def on_train_end(self, trainer, pl_module):
        self._write(trainer)

    def on_exception(self, trainer, pl_module, exception):
        self._write(trainer)


def doc_command(marker: str) -> str:
    """The command of the fenced block after ``<!-- test: marker -->`` in docs/scaling.md (continuations joined)."""
    text = SCALING.read_text()
    block = re.search(rf"<!-- test: {marker} -->\s*```bash\n(.*?)```", text, re.S)
    assert block, f"docs/scaling.md has no block marked test: {marker}"
    lines = [ln for ln in block.group(1).replace("\\\n", " ").splitlines() if ln.strip() and
             not ln.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    return lines[0]


def srun_line() -> str:
    """The sbatch script's ``srun`` command, without ``srun`` (each test process is one of its tasks)."""
    joined = SBATCH.read_text().replace("\\\n", " ")
    line = next(ln for ln in joined.splitlines() if ln.startswith("srun "))
    return line.removeprefix("srun ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "RANK", "LOCAL_RANK",
                                                                    "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_SILENT="true",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def shell(command: str, args: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
    """``command`` as bash runs it, with ``args`` as "$@" (the sbatch line) or appended (the doc commands)."""
    script = command if '"$@"' in command else command + ' "$@"'
    return subprocess.Popen(["bash", "-c", script, "bash", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def finish(procs: list[subprocess.Popen], timeout: float = 420) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, err))
    return out


def cpu_overrides(overrides: list[str]) -> list[str]:
    """Tiny overrides for a CLI run whose output folder Hydra names (no paths.output_dir)."""
    return [o for o in overrides if not o.startswith(("paths.output_dir", "experiment="))] + [
        "trainer.accelerator=cpu", "trainer.precision=32-true"]


def ldm_cli(tmp_path: Path, data_dir: Path, export_dir: Path, *extra: str, images: bool = False) -> list[str]:
    """A tiny stage-2 run (its export in ``tmp_path``: the shared first stages' folder stays as it is)."""
    return cpu_overrides(ldm_overrides(tmp_path, data_dir, export_dir)) + [
        f"data.samples_per_epoch={TINY_LIMIT}", *([] if images else ["callbacks.image_logger=null"]),
        f"callbacks.export_pipeline.dirpath={tmp_path}/exports/ldm_f8", *extra]


def ae_cli(tmp_path: Path, data_dir: Path, *extra: str) -> list[str]:
    return cpu_overrides(tiny_overrides(tmp_path, data_dir)) + [
        "callbacks.export_first_stage=null", "callbacks.image_logger=null", f"data.samples_per_epoch={TINY_LIMIT}",
        *extra]


def read_keys(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("keys_rank*.json"))]


def epoch_keys(record: dict, epoch: int) -> list[str]:
    return [k for e, keys in record["batches"] if e == epoch for k in keys]


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            errs = [p.communicate()[1][-3000:] for p in procs]
            raise AssertionError(f"{path} never appeared: {errs}")
        time.sleep(0.1)


def ckpt_step(path: Path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


# ---------------------------------------------------------------------------------------------------------------
# The data split over ranks: fast, in-process.

def _epoch_of(data: ShardData, world: int, rank: int, epoch: int = 0, start: int = 0) -> list[list[str]]:
    loader = data.train_dataloader(world, rank)
    data.set_position(epoch, start)
    return [batch["key"] for batch in loader]


def test_ranks_read_disjoint_samples_and_each_sample_once_per_epoch(data_dir):
    shards = data_dir / "fashion_mnist_32" / "train"
    data = ShardData(train_shards=str(shards), resolution=32, batch_size=4, num_workers=0, shuffle_buffer=10,
                     samples_per_epoch=TINY_LIMIT)
    ranks = [_epoch_of(data, 2, r) for r in (0, 1)]
    assert [len(r) for r in ranks] == [12, 12]  # 96 samples / (4 x 2)
    keys = [k for r in ranks for batch in r for k in batch]
    assert len(keys) == TINY_LIMIT == len(set(keys))  # every sample once, on one rank only
    again = [k for batch in _epoch_of(data, 2, 0, epoch=1) for k in batch]
    assert again != [k for batch in ranks[0] for k in batch]  # another order in the next epoch
    # A DataLoader with workers splits the rank's batches over them and keeps the same batches.
    workers = ShardData(train_shards=str(shards), resolution=32, batch_size=4, num_workers=2, shuffle_buffer=10,
                        samples_per_epoch=TINY_LIMIT)
    assert _epoch_of(workers, 2, 1) == ranks[1]


@pytest.mark.parametrize("new_world", [1, 4])
def test_elastic_position_repeats_less_than_one_global_batch_and_skips_nothing(data_dir, new_world):
    data = ShardData(train_shards=str(data_dir / "fashion_mnist_32" / "train"), resolution=32, batch_size=4,
                     num_workers=0, shuffle_buffer=10, samples_per_epoch=TINY_LIMIT)
    done = 5  # batches per rank at world 2
    first = [k for r in (0, 1) for batch in _epoch_of(data, 2, r)[:done] for k in batch]
    consumed = done * 4 * 2
    start = consumed // (4 * new_world)
    rest = [k for r in range(new_world) for batch in _epoch_of(data, new_world, r, start=start) for k in batch]
    both = first + rest
    assert set(both) == set(_all_keys(data))  # nothing skipped
    repeated = len(both) - len(set(both))
    assert repeated == consumed - start * 4 * new_world < 4 * new_world


def test_bad_scale_out_settings_are_clear_errors(data_dir):
    from ldm.callbacks.preemption import Preemption

    with pytest.raises(ValueError, match=r"data.partition='yes': expected true"):
        ShardData(train_shards=str(data_dir / "fashion_mnist_32" / "train"), partition="yes")
    with pytest.raises(ValueError, match=r"callbacks.preemption.timeout_s='soon': expected seconds > 0"):
        Preemption(timeout_s="soon")
    with pytest.raises(ValueError, match=r"unknown signal names \['SIGNOPE'\]"):
        Preemption(signals=("SIGTERM", "SIGNOPE"))


def _all_keys(data: ShardData) -> list[str]:
    return [k for batch in _epoch_of(data, 1, 0) for k in batch]


# ---------------------------------------------------------------------------------------------------------------
# The documented commands, as written.

def test_every_documented_recipe_is_run_by_a_test():
    markers = re.findall(r"<!-- test: (\w+) -->", SCALING.read_text())
    assert sorted(markers) == sorted(["one_machine", "torchrun", "sbatch", "submitit_local", "spot"])
    assert "trainer.num_nodes" in doc_command("torchrun") and "--rdzv-id" in doc_command("torchrun")
    sbatch = SBATCH.read_text()
    assert "#SBATCH --signal=USR1@90" in sbatch and "#SBATCH --requeue" in sbatch
    assert doc_command("sbatch").startswith("sbatch scripts/slurm/train.sbatch")


@pytest.mark.slow
def test_torchrun_across_two_nodes_as_documented(tmp_path, data_dir, export_dir):
    """Stage 2 on 2 torchrun "nodes" x 1 process, with FID every 3 steps, a validation image grid and the export at
    the end: one run folder that rank 0 alone fills, disjoint data, metrics logged once, no rank left waiting."""
    from ldm.checkpoints import export_folder
    from ldm.networks.classifier import FashionClassifier

    classifier = tmp_path / "classifier"
    export_folder(classifier, FashionClassifier().eval(), "classifier",
                  {"_target_": "ldm.networks.classifier.FashionClassifier"}, {})
    port = free_port()
    args = ldm_cli(tmp_path, data_dir, export_dir, "trainer.max_steps=6", "data.samples_per_epoch=48",
                   "callbacks=latent_diffusion_eval", "callbacks.clip_score=null",
                   f"callbacks.fid.weights={classifier}", "callbacks.sample_eval.num_samples=6",
                   "callbacks.sample_eval.every_n_steps=3",
                   "callbacks.sample_eval.steps=2", f"callbacks.export_pipeline.dirpath={tmp_path}/exports/ldm_f8",
                   KEYS, f"+callbacks.keys.out={tmp_path}/keys", images=True)
    procs = [shell(doc_command("torchrun"), args, base_env(GPUS="1", NODE_RANK=str(n), MASTER_ADDR="127.0.0.1",
                                                           MASTER_PORT=str(port), RUN_ID="t1"))
             for n in (0, 1)]
    for rc, err in finish(procs):
        assert rc == 0, err[-3000:]
    runs = tmp_path / "logs" / "ldm_f8" / "runs"
    assert [p.name for p in runs.iterdir()] == ["torchrun-t1"]
    run = runs / "torchrun-t1"
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "checkpoints", "csv", "images", "posthoc_ema",
                                                     "train.log", "train_rank1.log"]
    assert list((run / "posthoc_ema").glob("snapshot-*.safetensors"))  # rank 0's; no partial or duplicate files
    assert not list((run / "posthoc_ema").glob("*.tmp"))
    assert list((run / "images").glob("val_samples_step*.png"))
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 6
    records = read_keys(tmp_path / "keys")
    assert sorted(r["rank"] for r in records) == [0, 1] and {r["world"] for r in records} == {2}
    assert {r["environment"] for r in records} == {"TorchElasticEnvironment"}
    k0, k1 = (epoch_keys(r, 0) for r in sorted(records, key=lambda r: r["rank"]))
    assert len(k0) == len(k1) == 6 * 4 and not set(k0) & set(k1) and len(set(k0 + k1)) == 48
    rows = (run / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")

    def steps_of(key: str) -> list[str]:
        return [r.split(",")[header.index("step")] for r in rows[1:] if r.split(",")[header.index(key)]]

    loss_steps = steps_of("train/loss")
    assert loss_steps and len(loss_steps) == len(set(loss_steps))  # once per step, not once per rank
    assert steps_of("eval/fid_classifier") == ["3", "6"]
    meta = (tmp_path / "exports" / "ldm_f8" / "config.yaml").read_text()
    assert "world_size: 2" in meta


@pytest.mark.slow
def test_one_machine_recipe_sigterm_to_one_rank_stops_both_with_a_checkpoint_then_resumes_elastically(
        tmp_path, data_dir, export_dir):
    """Lightning's own launcher (2 CPU processes). SIGTERM reaches rank 0 only: both ranks stop at the same step,
    last.ckpt is written, status 143. The run then resumes on 3 processes: the log names the change and the epoch's
    samples are all seen, repeating less than one global batch (fewer processes, and scale_lr=false: the unit tests
    of the elastic position and of tests/test_lr_schedule.py)."""
    every = ["callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.export_pipeline=null",
             "callbacks.lr_schedule.warmup_steps=0"]
    first = ldm_cli(tmp_path, data_dir, export_dir, "trainer.max_steps=100000", *every, KEYS,
                    f"+callbacks.keys.out={tmp_path}/keys0", "+callbacks.slow._target_=tests.test_scale_out.Slow")
    proc = shell(doc_command("one_machine"), first, base_env(GPUS="2"))
    runs = tmp_path / "logs" / "ldm_f8" / "runs"
    wait_for_glob(runs, "*/checkpoints/step*.ckpt", [proc])
    sent = time.time()
    os.kill(_python_child(proc.pid), signal.SIGTERM)  # rank 0 (the launcher's process), not rank 1
    (rc, err), = finish([proc])
    took = time.time() - sent
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert took < 60
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(r"stopped by SIGTERM at step \d+: checkpoint .*last\.ckpt; resume with: python train\.py .*"
                        r"ckpt_path=.*last\.ckpt", line), line
    last = Path(re.search(r"checkpoint (\S+last\.ckpt);", line).group(1))
    stopped = ckpt_step(last)
    assert f"at step {stopped}:" in line
    records = read_keys(tmp_path / "keys0")
    assert len(records) == 2 and {len(r["batches"]) for r in records} == {stopped}  # both ranks, same step
    k0, k1 = (epoch_keys(r, 0) for r in records)
    assert not set(k0) & set(k1)
    seen = k0 + k1
    assert stopped < 12  # still inside epoch 0 (96 samples / global batch 8)

    world = 3
    per_rank = TINY_LIMIT // (4 * world)
    start = stopped * 8 // (4 * world)
    more = ldm_cli(tmp_path, data_dir, export_dir, f"trainer.max_steps={stopped + per_rank - start}", *every,
                   KEYS, f"+callbacks.keys.out={tmp_path}/keys{world}", f"ckpt_path={last}", "scale_lr=true")
    (rc, err), = finish([shell(doc_command("one_machine"), more, base_env(GPUS=str(world)))])
    assert rc == 0, err[-3000:]
    logs = "".join(p.read_text() for p in runs.glob("*/train.log"))
    assert f"world size 2 -> {world}: global batch 8 -> {4 * world}" in logs
    # the learning rate follows the global batch, as scale_lr says
    assert f"global batch 8 -> {4 * world}: optimiser 0 base lr 0.0003 -> {3e-4 * world / 2:.3g} (scale_lr" in logs
    rest = [k for r in read_keys(tmp_path / f"keys{world}") for k in epoch_keys(r, 0)]
    assert set(seen + rest) == set(_all_cache_keys(data_dir))  # nothing skipped
    assert len(seen + rest) - len(set(seen + rest)) < 4 * world  # less than one global batch read again


def _all_cache_keys(root: Path) -> list[str]:
    data = ShardData(train_shards=str(root / "latents" / "ae_f8" / "train"), batch_size=4, num_workers=0,
                     samples_per_epoch=TINY_LIMIT, kind="latent", required_keys=())
    return _all_keys(data)


def wait_for_glob(folder: Path, pattern: str, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not any(folder.glob(pattern)):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            errs = [p.communicate()[1][-3000:] if p.poll() is not None else "running" for p in procs]
            for p in procs:
                p.kill()
            raise AssertionError(f"{folder}/{pattern} never appeared: {errs}")
        time.sleep(0.1)


def _python_child(pid: int) -> int:
    """The process of the command bash started: bash -c execs a single command (then it is ``pid`` itself)."""
    if not Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"bash"):
        return pid
    return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])


class Slow(L.Callback):
    """Test instrument: a training step of at least ``seconds`` (so that a signal lands inside the first epoch)."""

    def __init__(self, seconds: float = 0.3):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


@pytest.mark.slow
def test_sbatch_srun_line_as_a_two_node_job_requeues_on_sigusr1_and_resumes_by_itself(tmp_path, data_dir):
    """The script's srun line as 2 tasks with a 2-node job's environment: Lightning's SLURM path, the job's run
    folder; SIGUSR1 (the time-limit signal) -> last.ckpt, one ``scontrol requeue <job id>`` (a fake that records
    its arguments), status 138; the requeued job (same id) resumes from that folder by itself, same W&B run."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (fake / "scontrol").chmod(0o755)
    port = str(free_port())

    def job(restart: int, *extra: str) -> list[subprocess.Popen]:
        args = ["experiment=ae_f8", *ae_cli(tmp_path, data_dir, "callbacks.model_checkpoint.every_n_train_steps=4",
                                            "logger=many", "logger.wandb.offline=true", *extra)]
        procs = []
        for rank in (0, 1):
            env = base_env(SLURM_JOB_ID="4242", SLURM_JOB_NAME="ldm", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
                           SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_PROCID=str(rank),
                           SLURM_LOCALID="0", SLURM_NODEID=str(rank), SLURM_NODELIST="127.0.0.1",
                           SLURM_JOB_NODELIST="127.0.0.1", SLURM_SUBMIT_DIR=str(ROOT), SLURM_RESTART_COUNT=str(restart),
                           MASTER_PORT=port)
            env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
            procs.append(shell(srun_line(), args, env))
        return procs

    run = tmp_path / "logs" / "ae_f8" / "runs" / "slurm-4242"
    procs = job(0, "trainer.max_steps=100000", KEYS, f"+callbacks.keys.out={tmp_path}/keys")
    wait_for(run / "checkpoints" / "last.ckpt", procs)
    for p in procs:  # SLURM signals every task of the job step
        os.kill(_python_child(p.pid), signal.SIGUSR1)
    results = finish(procs)
    for rc, err in results:
        assert rc == 128 + signal.SIGUSR1, err[-3000:]
    assert calls.read_text().splitlines() == ["requeue 4242"]  # rank 0 alone asked
    assert "the requeued job 4242 resumes from it by itself" in results[0][1]
    records = read_keys(tmp_path / "keys")
    assert {r["environment"] for r in records} == {"SLURMEnvironment"} and {r["world"] for r in records} == {2}
    k0, k1 = (epoch_keys(r, 0) for r in records)
    assert k0 and not set(k0) & set(k1)
    stopped = ckpt_step(run / "checkpoints" / "last.ckpt")
    wandb_id = (run / "wandb_id.txt").read_text()

    for rc, err in finish(job(1, f"trainer.max_steps={stopped + 4}")):  # no ckpt_path: it finds its own
        assert rc == 0, err[-3000:]
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == stopped + 4
    assert "this job's run folder" in (run / "train.log").read_text()
    assert (run / "wandb_id.txt").read_text() == wandb_id
    offline = sorted((tmp_path / "logs" / "ae_f8" / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(offline) == 2  # one folder per start, one W&B run
    assert (run / "csv" / "metrics_1.csv").is_file() and (run / "csv" / "metrics.csv").is_file()
    assert [p.name for p in run.parent.iterdir()] == ["slurm-4242"]


@pytest.mark.slow
def test_hydra_sweep_through_submitit_local_executor_as_documented(tmp_path, data_dir):
    """Two real jobs through submitit's local executor, the config tree the SLURM launcher uses."""
    args = ae_cli(tmp_path, data_dir, "trainer.max_steps=4")
    (rc, err), = finish([shell(doc_command("submitit_local"), args, base_env())])
    assert rc == 0, err[-3000:]
    jobs = sorted((tmp_path / "logs" / "multiruns").glob("*/ae_f8_*"))
    assert [j.name for j in jobs] == ["ae_f8_0", "ae_f8_1"]
    for j in jobs:
        assert ckpt_step(j / "checkpoints" / "last.ckpt") == 4
    assert len(list((tmp_path / "logs" / "multiruns").glob("*/.submitit/*/*_result.pkl"))) == 2


def test_slurm_sweep_launcher_asks_for_a_signal_and_requeue(tmp_path):
    """The sbatch script submitit writes for hydra/launcher=slurm (rendered, not submitted)."""
    import submitit.slurm.slurm
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "experiment=ae_f8"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    # What the submitit plugin hands to submitit's SLURM executor, rendered by submitit's own sbatch writer.
    text = submitit.slurm.slurm._make_sbatch_string(
        "python -u train.py", tmp_path, time=launcher["timeout_min"], nodes=launcher["nodes"],
        ntasks_per_node=launcher["gpus_per_node"], gpus_per_node=launcher["gpus_per_node"],
        cpus_per_task=launcher["cpus_per_task"], signal_delay_s=launcher["signal_delay_s"],
        additional_parameters=launcher["additional_parameters"])
    assert "#SBATCH --signal=USR2@90" in text and "#SBATCH --requeue" in text and "--open-mode=append" in text
    assert launcher["max_num_timeout"] > 0


@pytest.mark.slow
def test_spot_recipe_sigterm_keeps_the_work_and_the_same_command_resumes(tmp_path, data_dir, export_dir):
    """``ckpt_path=auto`` on a pre-emptible machine: SIGTERM -> a checkpoint at the step it names, status 143,
    within the time bound; the same command again resumes from it and finishes."""
    every = ["callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.export_pipeline=null"]
    proc = shell(doc_command("spot"), ldm_cli(tmp_path, data_dir, export_dir, "trainer.max_steps=100000", *every),
                 base_env())
    runs = tmp_path / "logs" / "ldm_f8" / "runs"
    wait_for_glob(runs, "*/checkpoints/last.ckpt", [proc])
    sent = time.time()
    os.kill(_python_child(proc.pid), signal.SIGTERM)
    (rc, err), = finish([proc])
    assert rc == 143 and time.time() - sent < 60, err[-3000:]
    last = Path(re.search(r"checkpoint (\S+last\.ckpt);", err).group(1))
    stopped = ckpt_step(last)
    assert f"stopped by SIGTERM at step {stopped}:" in err
    final = (stopped // 3 + 1) * 3  # a periodic save at the end
    (rc, err), = finish([shell(doc_command("spot"), ldm_cli(tmp_path, data_dir, export_dir,
                                                          f"trainer.max_steps={final}", *every), base_env())])
    assert rc == 0, err[-3000:]
    newest = max(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    assert newest != last and ckpt_step(newest) == final
    rows = (newest.parent.parent / "csv" / "metrics.csv").read_text().splitlines()
    steps = {int(r.split(",")[rows[0].split(",").index("step")]) for r in rows[1:]}
    assert min(steps) == stopped  # continued from the signal's checkpoint, not from an earlier one


@pytest.mark.slow
@pytest.mark.parametrize("signals,status,least,most", [(["SIGTERM"], 143, 3, 30), (["SIGINT", "SIGINT"], 130, 0, 3)])
def test_the_watchdog_bounds_a_stuck_stop_and_a_second_ctrl_c_exits_at_once(tmp_path, data_dir, signals, status,
                                                                            least, most):
    """A checkpoint write that never ends after the signal: out within timeout_s (3 s here) with the signal's
    status, saying no checkpoint was written. A second Ctrl-C does not wait for it."""
    args = ["experiment=ae_f8", *ae_cli(tmp_path, data_dir, "trainer.max_steps=100000",
                                        "callbacks.model_checkpoint.every_n_train_steps=4",
                                        "callbacks.preemption.timeout_s=3",
                                        "+callbacks.stall._target_=tests.test_scale_out.StallOnSignal")]
    proc = shell("python train.py", args, base_env())
    wait_for_glob(tmp_path / "logs" / "ae_f8" / "runs", "*/checkpoints/last.ckpt", [proc])
    pid = _python_child(proc.pid)
    sent = time.time()
    for name in signals:
        os.kill(pid, signal.Signals[name])
        time.sleep(0.5)
    (rc, err), = finish([proc])
    assert rc == status and least <= time.time() - sent < most, err[-3000:]
    if status == 143:
        assert "no checkpoint within callbacks.preemption.timeout_s=3 s" in err


class StallOnSignal(L.Callback):
    """Test instrument: once a signal is noted, writing a checkpoint hangs (a stuck file system, a dead peer)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        from ldm.callbacks.preemption import Preemption

        stop = next(c for c in trainer.callbacks if isinstance(c, Preemption))
        while stop.received is not None:
            time.sleep(0.1)


class SignalAt(L.Callback):
    """Test instrument: sends ``signal`` to this very process as training batch ``batch`` starts."""

    def __init__(self, batch: int, signal: str = "SIGTERM"):
        self.batch, self.signal = batch, signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.batch:
            os.kill(os.getpid(), signal.Signals[self.signal])


@pytest.mark.slow
def test_a_run_stopped_by_a_signal_resumes_as_the_unbroken_run(make_ldm_cfg, tmp_path):
    """A real SIGTERM to the training process at batch 5: the checkpoint it leaves, resumed to step 10, equals the
    unbroken run at step 10 (raw and EMA weights, EMA count, optimiser state, learning rate)."""
    from ldm.callbacks.preemption import Preempted, Preemption
    from ldm.training import train

    common = ["trainer.max_steps=10", "data.samples_per_epoch=16", "data.shuffle_buffer=48",
              "callbacks.export_pipeline=null", "callbacks.image_logger=null", "data.val_limit=8",
              "model.conditioner.embedders.0.ucg_rate=0.3", "callbacks.model_checkpoint.every_n_train_steps=10"]

    def last(name: str) -> dict:
        return torch.load(f"{tmp_path}/{name}/checkpoints/last.ckpt", weights_only=True)

    train(make_ldm_cfg("ldm_f8", f"paths.output_dir={tmp_path}/unbroken", *common))
    with pytest.raises(Preempted) as stop:
        train(make_ldm_cfg("ldm_f8", f"paths.output_dir={tmp_path}/signalled", *common,
                           "+callbacks.kill._target_=tests.test_scale_out.SignalAt", "+callbacks.kill.batch=4"))
    stop.value.disarm()
    assert stop.value.step == 5 and stop.value.exit_code == 143 and last("signalled")["global_step"] == 5
    # The run's handler is gone with the run: a later SIGTERM is this process's business again.
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), Preemption)
    train(make_ldm_cfg("ldm_f8", f"paths.output_dir={tmp_path}/resumed", *common,
                       f"ckpt_path={tmp_path}/signalled/checkpoints/last.ckpt"))
    unbroken, resumed = last("unbroken"), last("resumed")
    assert unbroken["global_step"] == 10
    assert_same_training_state(resumed, unbroken, "resumed after SIGTERM")
