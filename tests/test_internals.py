"""The framework's few uses of Lightning's and open_clip's internals (ldm/utils/lightning_internals.py,
ldm/conditioning/open_clip_internals.py), each pinned here: an upgrade that changes one fails here, by name,
instead of somewhere deep in a training run."""

from __future__ import annotations

import lightning as L
import open_clip
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader

from ldm.conditioning.open_clip_internals import build_text_tower, embed_tokens
from ldm.utils.lightning_internals import batches_that_stepped, uncount_optimizer_steps, wandb_run_started


class _Tiny(L.LightningModule):
    def __init__(self, manual: bool):
        super().__init__()
        self.automatic_optimization = not manual
        self.net = torch.nn.Linear(2, 1)
        self.seen: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batches_that_stepped(self.trainer), self.global_step))
        loss = self.net(batch).pow(2).mean()
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx == 1:
            uncount_optimizer_steps(self.trainer, 1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("manual", [False, True])
def test_lightning_step_counters(manual, tmp_path):
    module = _Tiny(manual)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(torch.randn(4, 2), batch_size=1))
    assert [b for b, _ in module.seen] == [0, 1, 2, 3]  # batches whose step ran, as each batch starts
    assert [s for _, s in module.seen] == [0, 1, 1, 2]  # the step taken back after batch 1 is gone
    assert trainer.global_step == 3


def test_wandb_logger_run_state(tmp_path):
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    assert wandb_run_started(logger) is False  # no run made by asking


def test_the_progress_bar_hook_we_override_exists():
    from ldm.callbacks.progress import ProgressBar

    assert callable(getattr(RichProgressBar, "_get_train_description", None))
    assert ProgressBar._get_train_description is not RichProgressBar._get_train_description


def test_open_clip_token_embedding_step():
    tower = open_clip.transformer.TextTransformer(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
    x, mask = embed_tokens(tower, torch.randint(0, 64, (3, 8)))
    assert x.shape == (3, 8, 16)
    expected = tower.token_embedding(torch.zeros(1, 8, dtype=torch.long)) + tower.positional_embedding
    torch.testing.assert_close(embed_tokens(tower, torch.zeros(1, 8, dtype=torch.long))[0], expected)
    assert mask is None or mask.shape[-1] == 8


def test_open_clip_text_tower_of_a_named_architecture_alone():
    tower = build_text_tower("RN50")
    assert isinstance(tower, open_clip.transformer.TextTransformer)
    full = open_clip.create_model("RN50").transformer
    assert tower.width == full.width and tower.context_length == 77
    assert {k for k in tower.state_dict()} >= {"token_embedding.weight", "positional_embedding", "text_projection"}
    with pytest.raises(ValueError, match="unknown open_clip architecture 'no-such-net'"):
        build_text_tower("no-such-net")
