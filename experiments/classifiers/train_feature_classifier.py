"""Train the small feature classifier of the Frechet distance on an image dataset and write its weights.

    python experiments/classifiers/train_feature_classifier.py --dataset digits --out PATH

The training is :func:`flowmatch.training.classifier.train_feature_classifier`; this script parses
arguments, trains, writes the file (:func:`~flowmatch.training.classifier.save_feature_classifier`) and
prints the accuracies. Pass the file to ``ImageFeatureMetrics(..., path=PATH)`` or ``eval.classifier``.
See README.md next to this script for the commands that made the shipped weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import torch

from flowmatch.errors import FlowmatchError
from flowmatch.training.classifier import save_feature_classifier, train_feature_classifier


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="image dataset with labels: digits, mnist5k, mnist, "
                                                    "fashion_mnist, cifar10, folder")
    p.add_argument("--out", required=True, help="weights file to write (written atomically)")
    p.add_argument("--root", default=None, help="data root of the datasets kept in files (mnist, cifar10, folder)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=24)
    p.add_argument("--feature-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true", help="no random pixel shifts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a CPU shared with other jobs)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        model, info = train_feature_classifier(
            args.dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr, width=args.width,
            feature_dim=args.feature_dim, seed=args.seed, device=args.device, augment=not args.no_augment,
            root=args.root)
        save_feature_classifier(model, info, args.out)
    except FlowmatchError as e:
        print(f"train_feature_classifier: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"{info['dataset']} {info['shape']}: train accuracy {info['train_accuracy']:.4f}, "
          f"test accuracy {info['test_accuracy']:.4f} ({info['steps']} steps, {seconds:.1f} s)")
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
