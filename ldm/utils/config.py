"""OmegaConf resolvers used by the configs, registered on import."""

from __future__ import annotations

import functools
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def compose(overrides: list[str], config_name: str = "train"):
    """The framework's Hydra config (``configs/<config_name>.yaml``) with ``overrides``, unlocked, outside a
    Hydra run (``hydra`` is dropped: nothing here reads the run's output folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.hydra = None
    return cfg


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX) and PyTorch's CPU kernels use AVX-512
    (not held to AVX2 by ATEN_CPU_CAPABILITY=avx2), where bf16-mixed pays off."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(accelerator: str = "auto") -> str:
    """bf16-mixed where the hardware runs it natively, else 32-true (16-mixed on pre-Ampere GPUs)."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


def auto_compile(accelerator: str = "auto") -> bool:
    """torch.compile the networks on CUDA (fused kernels, far fewer launches); not on a CPU, where compiling
    compiling takes minutes for a step barely faster than eager (benchmarks/results/train_step.md), so a short
    run loses more than it gains."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def per_device(cpu_value: int, gpu_value: int, accelerator: str = "auto") -> int:
    """``gpu_value`` where training runs on CUDA, else ``cpu_value``: per-device batch sizes for the demo models,
    which on a GPU are bound by kernel-launch time at CPU-sized batches (the step costs about the same at 4-8x
    the images), while a CPU is bound by arithmetic at any size."""
    return gpu_value if auto_compile(accelerator) else cpu_value


def device_count(devices: Any, accelerator: str = "auto") -> int:
    """How many devices ``trainer.devices`` names on this machine: an int, a list of indices, or ``auto`` / -1
    (every visible GPU where training runs on CUDA, else 1, as Lightning counts them)."""
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, list | tuple) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit() and int(devices) > 0:
        return int(devices)
    if str(devices) in ("auto", "-1"):
        return torch.cuda.device_count() if auto_compile(accelerator) else 1
    raise ValueError(f"trainer.devices={devices!r}: expected a positive count, a list of device indices or auto")


def batch_per_device(global_batch: int, devices: Any, num_nodes: int, accumulate: int,
                     accelerator: str = "auto") -> int:
    """The per-device batch that makes ``global_batch`` = it x devices x nodes x accumulate_grad_batches (the paper
    recipes state the paper's global batch and let the machine decide the split); an error naming the keys when
    the global batch does not split evenly."""
    n = device_count(devices, accelerator)
    split = n * int(num_nodes) * int(accumulate)
    if int(global_batch) % split:
        raise ValueError(
            f"global_batch={global_batch} does not split over trainer.devices={devices} ({n} here) x "
            f"trainer.num_nodes={num_nodes} x trainer.accumulate_grad_batches={accumulate} = {split}; change "
            "trainer.accumulate_grad_batches or the device count, or set data.batch_size (per device) yourself")
    return int(global_batch) // split


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under a scheduler's allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_num_workers(accelerator: str = "auto") -> int:
    """DataLoader worker processes per device.

    Training on the CPU: the cores that torch's compute threads leave free (none on a 2-core machine with
    2 threads). A worker sharing a core with the compute threads stalls their thread pool each time it
    runs (benchmarks/results/throughput*.md: records/s per worker count).
    On GPUs: the cores per GPU less one for the main process, between 1 and 8.
    """
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return min(8, max(1, usable_cpus() // max(1, torch.cuda.device_count()) - 1))
    return max(0, usable_cpus() - torch.get_num_threads())


def call(path: str) -> Any:
    """The value of the function named by its dotted path, called without arguments (configs name functions as
    they name classes in ``_target_``): ``${ldm.call:ldm.data.fashion_mnist.class_prompts}``."""
    from hydra.utils import get_method

    return get_method(path)()


def module_classes(*paths: str) -> set[type]:
    """Classes by dotted path, as a set (FSDP's auto-wrap policy takes a set of module classes)."""
    from hydra.utils import get_class

    return {get_class(p) for p in paths}


def ddp_find_unused_parameters(model_target: str | None) -> bool:
    """Whether DDP must look for parameters without a gradient after each forward, as the stage class says.

    ``model_target`` is the model config's ``_target_``; a stage class states it in its
    ``ddp_find_unused_parameters`` attribute (default False: every trainable parameter gets a gradient in
    every backward, and DDP skips the per-step traversal of the autograd graph that the search costs).
    """
    if not model_target:
        return False
    from hydra.utils import get_class

    return bool(getattr(get_class(model_target), "ddp_find_unused_parameters", False))


@functools.cache
def run_token() -> str:
    """Six hex digits drawn once per process: run folders of runs started in the same second stay apart."""
    return secrets.token_hex(3)


@functools.cache
def run_dir(runs: str) -> str:
    """The run folder under ``runs``: the launcher's shared name when there is one (every rank and every restart of
    the job agree on it), else ``<time>_<token>``. A rank > 0 without a shared name cannot know rank 0's folder:
    its log goes to a folder of its own in the temporary directory, nothing of it into ``runs``."""
    from ldm.utils.launch import global_rank, shared_run_name

    name = shared_run_name()
    if name is not None:
        return f"{runs}/{name}"
    if global_rank() > 0:
        return f"{tempfile.gettempdir()}/ldm-rank{global_rank()}-{run_token()}"
    return f"{runs}/{time.strftime('%Y-%m-%d_%H-%M-%S')}_{run_token()}"


def subfolder(folder: str | None, name: str) -> str | None:
    """``folder/name``, or None when ``folder`` is (``${ldm.subfolder:${oc.select:a.b,null},val}``)."""
    return None if folder is None else f"{folder}/{name}"


def rank_zero_only(value: Any) -> Any:
    """``value`` on global rank 0 (as the launcher set it), None on the others."""
    from ldm.utils.launch import global_rank

    return value if global_rank() == 0 else None


def job_name(name: str) -> str:
    """Hydra's job name (its log file's name): ``name``, with ``_rank<N>`` on ranks > 0."""
    from ldm.utils.launch import global_rank

    return name if global_rank() == 0 else f"{name}_rank{global_rank()}"


def class_names_beside(shards: Any) -> list[str] | None:
    """The class names (index -> name) that ``scripts/folder_to_shards.py --labels folders`` wrote beside the
    shards (``classes.json`` in the shards' folder), or None when there is none (or several shard sources)."""
    if not isinstance(shards, str) or not shards:
        return None
    path = Path(shards.split("{")[0])
    folder = path if path.is_dir() else path.parent
    index = folder / "classes.json"
    if not index.is_file():
        return None
    try:
        names = json.loads(index.read_text())["names"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a class index ({err}); expected {{\"names\": [...]}} as "
                         "scripts/folder_to_shards.py --labels folders writes it") from err
    return [str(n) for n in names]


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("ldm.precision", auto_precision, replace=True)
    OmegaConf.register_new_resolver("ldm.num_workers", auto_num_workers, replace=True)
    OmegaConf.register_new_resolver("ldm.compile", auto_compile, replace=True)
    OmegaConf.register_new_resolver("ldm.per_device", per_device, replace=True)
    OmegaConf.register_new_resolver("ldm.batch_per_device", batch_per_device, replace=True)
    OmegaConf.register_new_resolver("ldm.cwd", lambda: os.getcwd(), replace=True)
    # Cached in the config (and so in the job configs a sweep launcher pickles): every job of a sweep resolves the
    # launching process's token and folder, not one of its own.
    OmegaConf.register_new_resolver("ldm.run_token", run_token, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ldm.run_dir", run_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ldm.rank_zero_only", rank_zero_only, replace=True)
    OmegaConf.register_new_resolver("ldm.subfolder", subfolder, replace=True)
    OmegaConf.register_new_resolver("ldm.job_name", job_name, replace=True)
    OmegaConf.register_new_resolver("ldm.basename", lambda path: Path(str(path)).name, replace=True)
    OmegaConf.register_new_resolver("ldm.class_names", class_names_beside, replace=True)
    OmegaConf.register_new_resolver("ldm.call", call, replace=True)
    OmegaConf.register_new_resolver("ldm.ddp_find_unused", ddp_find_unused_parameters, replace=True)


register_resolvers()
