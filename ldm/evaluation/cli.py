"""Command-line options shared by the evaluation scripts (guidance sweep, ablation report)."""

from __future__ import annotations

import argparse

from ldm.checkpoints import load_classifier
from ldm.data.loaders import ShardData
from ldm.evaluation.clip_score import CLIPScore
from ldm.evaluation.features import build_extractor
from ldm.evaluation.samples import SampleJudge


def add_judge_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", default="data/fashion_mnist_64/val",
                        help="image shards of the reference set (default: the built-in test split)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=1000, help="samples per model/scale = reference images")
    parser.add_argument("--extractor", default="classifier", choices=["classifier", "inception", "none"],
                        help="FID feature space (classifier: offline; inception: the standard FID)")
    parser.add_argument("--extractor-weights", default=None,
                        help="classifier export folder or Inception weights file (defaults: "
                             "exports/fashion_classifier, torch-fidelity's cache)")
    parser.add_argument("--classifier", default="exports/fashion_classifier",
                        help="classifier for class accuracy ('none' to skip)")
    parser.add_argument("--clip-arch", default=None, help="open_clip model for CLIP score (off if unset)")
    parser.add_argument("--clip-pretrained", default="laion2b_s34b_b79k", help="open_clip tag or local weights file")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)


def reference_batches(args: argparse.Namespace, limit: int | None = None):
    data = ShardData(train_shards=args.reference, val_shards=args.reference, resolution=args.resolution,
                     val_batch_size=100, num_workers=2, val_limit=limit)
    return data.val_dataloader()


def judge_from_args(args: argparse.Namespace) -> SampleJudge:
    extractor = None if args.extractor == "none" else build_extractor(args.extractor, args.extractor_weights)
    clip = CLIPScore(args.clip_arch, args.clip_pretrained) if args.clip_arch else None
    classifier = None if args.classifier == "none" else load_classifier(args.classifier)
    return SampleJudge(reference_batches(args, args.num_samples), args.num_samples, extractor=extractor, clip=clip,
                       classifier=classifier)


def sampling_from_args(args: argparse.Namespace) -> dict:
    return {"sampler": args.sampler, "steps": args.steps, "seed": args.seed}
