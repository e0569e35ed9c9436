"""Reports the bad samples the data pipeline skipped, and fails clearly when nothing valid is left."""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class DataHealth(L.Callback):
    """Logs ``data/{train,val}_skipped`` each epoch; raises if a validation pass found no valid sample."""

    def _counts(self, trainer: L.Trainer) -> dict[str, int] | None:
        dm = trainer.datamodule
        return dm.skipped() if dm is not None and hasattr(dm, "skipped") else None

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        counts = self._counts(trainer)
        if counts is None:
            return
        pl_module.log(f"data/{split}_skipped", float(counts[f"{split}_skipped"]), reduce_fx="sum",
                      sync_dist=True)
        if counts[f"{split}_valid"] == 0 and counts[f"{split}_skipped"] > 0:
            raise RuntimeError(f"{split} data: all {counts[f'{split}_skipped']} samples/shards read were bad; "
                               "nothing valid remains (see the warnings above for shard and key)")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = self._counts(trainer)
        if counts is not None and trainer.is_global_zero:
            log.info("data: train %d valid / %d skipped; val %d valid / %d skipped (this process)",
                     counts["train_valid"], counts["train_skipped"], counts["val_valid"], counts["val_skipped"])
