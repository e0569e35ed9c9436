"""Power-function EMA profiles for post-hoc EMA (Karras et al. 2024, Sec. 3), stored as periodic snapshots.

Each profile k (relative width ``sigma_rels[k]``, exponent gamma_k) is updated after every optimiser step t:
theta_hat <- theta_hat + (1 - beta_t) (theta - theta_hat), beta_t = (1 - 1/t)^(gamma_k + 1), one ``_foreach_lerp_``
per profile, the factor computed on the host (nothing read back from the device). Every ``every_n_steps`` steps and
when training ends, global rank 0 writes a snapshot of all profiles (``ldm.posthoc_ema.write_snapshot``);
``scripts/posthoc_ema.py`` reconstructs an EMA of any width from them and exports it.

Cost: memory, one fp32 copy of the trainable weights per profile on every rank (the profiles are also in the
checkpoint, so a resumed run continues them exactly); disk, one copy per profile per snapshot (``dtype``: float32,
or bfloat16 for half). Under DDP every rank updates its copy (the weights are the same on all ranks); only rank 0
writes snapshots.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from ldm.posthoc_ema import beta, gamma_of, write_snapshot

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PostHocEMA(L.Callback):
    def __init__(self, dirpath: str | Path, sigma_rels: tuple[float, ...] = (0.05, 0.10), every_n_steps: int = 500,
                 dtype: str = "float32", prefixes: tuple[str, ...] = ("unet.", "conditioner.")):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"callbacks.posthoc_ema.every_n_steps={every_n_steps!r}: expected an integer >= 1")
        if dtype not in DTYPES:
            raise ValueError(f"callbacks.posthoc_ema.dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        self.dirpath = Path(dirpath)
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_of(s) for s in self.sigma_rels]
        self.every_n_steps, self.dtype, self.prefixes = every_n_steps, DTYPES[dtype], tuple(prefixes)
        self.step = 0
        self.profiles: list[dict[str, torch.Tensor]] = []
        self._restored: dict | None = None

    @property
    def state_key(self) -> str:
        return f"PostHocEMA{self.sigma_rels}"

    def _tracked(self, pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad and n.startswith(self.prefixes)}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "FSDP" in type(trainer.strategy).__name__:  # sharded parameters: rank 0 would hold a shard only
            raise ValueError("callbacks.posthoc_ema tracks whole parameters on every rank and cannot run under "
                             "trainer=fsdp; set callbacks.posthoc_ema=null")
        params = self._tracked(pl_module)
        if self._restored is not None:  # a resumed run: its profiles, on this run's devices
            self.step = int(self._restored["step"])
            self.profiles = [{n: self._restored["profiles"][k][n].to(p.device, torch.float32) for n, p in
                              params.items()} for k in range(len(self.sigma_rels))]
            self._restored = None
        else:
            self.profiles = [{n: p.detach().float().clone() for n, p in params.items()} for _ in self.sigma_rels]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step <= self.step:  # no optimiser step in this batch (gradient accumulation)
            return
        self.step = trainer.global_step
        current = [p.detach() for p in self._tracked(pl_module).values()]
        for gamma, profile in zip(self.gammas, self.profiles, strict=True):
            averaged = list(profile.values())
            torch._foreach_lerp_(averaged, [c.float() if c.dtype != torch.float32 else c for c in current],
                                 1.0 - beta(self.step, gamma))
        if self.step % self.every_n_steps == 0:
            self._write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)

    def flush(self, trainer: L.Trainer) -> None:
        """Write the snapshot of the current step unless it is written already (the run's last one)."""
        if self.step and not (self.dirpath / f"snapshot-{self.step:09d}.safetensors").is_file():
            self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            write_snapshot(self.dirpath, self.step, self.sigma_rels, self.gammas, self.profiles, self.dtype)

    def state_dict(self) -> dict:
        return {"step": self.step, "sigma_rels": self.sigma_rels,
                "profiles": [{n: t.cpu() for n, t in p.items()} for p in self.profiles]}

    def load_state_dict(self, state_dict: dict) -> None:
        if [float(s) for s in state_dict["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"callbacks.posthoc_ema.sigma_rels={self.sigma_rels}, but the checkpoint's profiles are "
                             f"{state_dict['sigma_rels']}: resume with the same widths")
        self._restored = state_dict
