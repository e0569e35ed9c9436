"""Train the small Fashion-MNIST classifier used as an offline evaluator, and export it.

    python scripts/train_classifier.py            # -> exports/fashion_classifier (about 2 minutes on 2 cores)

It sees the images as the shards hold them (28x28 upsampled to --resolution, RGB in [-1, 1]),
with small shifts and blur so that it also judges reconstructions and samples fairly.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F

from ldm.checkpoints import CLASSIFIER, export_folder
from ldm.data.fashion_mnist import FILES, find_source, read_idx
from ldm.networks.classifier import FashionClassifier

log = logging.getLogger("train_classifier")


def load_split(split: str, resolution: int, source_dir: str | None,
               limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images of a split (all: None) at ``resolution``, in [-1, 1], with their labels."""
    source = find_source(source_dir)
    images, labels = (read_idx(source / name)[:limit] for name in FILES[split])
    x = torch.from_numpy(images.copy()).float().div(127.5).sub(1).unsqueeze(1)
    x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False).clamp(-1, 1)
    return x, torch.from_numpy(labels.astype("int64"))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1/14 of the side, and a random mild blur on half the batch."""
    b, _, h, w = x.shape
    pad = max(1, h // 14)
    x = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    x = x[:, :, dy:dy + h, dx:dx + w]
    blur = torch.rand(b, generator=gen) < 0.5
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k)
    return x


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="exports/fashion_classifier")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only (tests)")
    parser.add_argument("--test-limit", type=int, default=None, help="judge on the first N test images only (tests)")
    parser.add_argument("--source-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs={args.epochs}: expected an integer >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_train, y_train = load_split("train", args.resolution, args.source_dir, args.limit or None)
    x_test, y_test = load_split("val", args.resolution, args.source_dir, args.test_limit or None)
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    batches = max(1, len(x_train) // args.batch_size)  # a last partial batch is dropped, unless it is the only one
    steps = args.epochs * batches
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(1, steps))
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(batches):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, x_test, y_test)
        log.info("epoch %d: loss %.3f, test accuracy %.4f (%.0f s)", epoch, loss.item(), acc, time.time() - start)
    model_config = {"_target_": "ldm.networks.classifier.FashionClassifier", "num_classes": 10, "width": 32,
                    "input_size": 28}
    export_folder(args.out, model, CLASSIFIER, model_config,
                  {"test_accuracy": acc, "resolution": args.resolution, "epochs": args.epochs})
    log.info("test accuracy %.4f; exported to %s", acc, args.out)


if __name__ == "__main__":
    main()
