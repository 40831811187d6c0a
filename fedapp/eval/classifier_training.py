"""Training the FD-CNN feature classifier, and re-measuring the committed weights (``scripts/train_classifier.py``).

Seeded and, for a fixed thread count, bit-for-bit reproducible on CPU; the weights file
records the command, seed, thread count and test accuracy it was made with.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedapp.data.pixels import to_model_range
from fedapp.eval.classifier import (
    ACCURACY_TOLERANCE,
    CLASSIFIER_PATH,
    DEFAULT_EPOCHS,
    DEFAULT_SEED,
    DEFAULT_THREADS,
    FEATURE_DIM,
    MIN_TEST_ACCURACY,
    FeatureCNN,
    load_classifier,
    save_classifier,
)


def _check_data(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"images must be uint8 (N, 1, 28, 28), got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be int64 (N,) matching the images, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise ValueError("no images to train or test on")


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    hflip: bool = True,
    progress: bool = False,
) -> FeatureCNN:
    """Adam with a per-step cosine decay from ``lr`` to 0, plus seeded random
    horizontal flips (clothes are left-right symmetric; it buys ~0.5% accuracy).

    Init, shuffling, flips and dropout all come from ``seed`` (the caller's global
    RNG state is left untouched), so on CPU with a fixed thread count two calls give
    identical weights.
    """
    _check_data(images, labels)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    n = int(images.shape[0])
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # init and dropout
        model = FeatureCNN()
        model.train()
        gen = torch.Generator().manual_seed(seed)  # shuffling and flips
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps)))
        bar = tqdm(total=total_steps, desc="train classifier", unit="step", disable=not progress)
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                x = to_model_range(images[index])
                if hflip:
                    flip = torch.rand(len(index), generator=gen) < 0.5
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                loss = F.cross_entropy(model(x), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    model.eval()
    return model


@torch.no_grad()
def test_accuracy(model: FeatureCNN, images: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 256) -> float:
    """Fraction classified correctly, in eval mode (the model's mode is restored)."""
    _check_data(images, labels)
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, len(images), batch_size):
            logits = model(to_model_range(images[start : start + batch_size]))
            correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(images)


# Mark it as a library function, not a pytest test, when imported into a test module.
test_accuracy.__test__ = False  # type: ignore[attr-defined]


def check_classifier(path: Path, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """``(measured, recorded)`` test accuracy, so CI can prove the committed weights
    are the ones their meta describes."""
    model, meta = load_classifier(path)
    return test_accuracy(model, images, labels), float(meta["test_accuracy"])


# ------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_classifier.py",
        description="Train the Fashion-MNIST feature CNN for the offline Fréchet distance, "
                    "or (--check) re-measure the committed weights.")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"training epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate (default 1e-3)")
    parser.add_argument("--max-train-examples", type=int, default=0,
                        help="train on the first N training images only (default 0: all 60,000)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"torch CPU threads; results are reproducible for a fixed count "
                             f"(default {DEFAULT_THREADS})")
    parser.add_argument("--out", type=Path, default=CLASSIFIER_PATH,
                        help="weights file to write, or to check (default: the committed one)")
    parser.add_argument("--check", action="store_true",
                        help="re-measure the test accuracy of --out instead of training; exit 1 if "
                             f"it differs from the recorded one or is below {MIN_TEST_ACCURACY}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/train_classifier.py``; returns the exit status."""
    from fedapp.config import DataConfig
    from fedapp.data.sources import load_split

    args = _parser().parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    cfg = DataConfig(name="fashion-mnist")
    test = load_split(cfg, "test")

    if args.check:
        measured, recorded = check_classifier(args.out, test.images, test.labels)
        print(f"test accuracy {measured:.4f} (recorded {recorded:.4f}) for {args.out}")
        if abs(measured - recorded) > ACCURACY_TOLERANCE:
            print(f"FAIL: measured accuracy differs from the recorded one by {measured - recorded:+.6f}",
                  file=sys.stderr)
            return 1
        if measured < MIN_TEST_ACCURACY:
            print(f"FAIL: test accuracy below {MIN_TEST_ACCURACY}", file=sys.stderr)
            return 1
        return 0

    train = load_split(cfg, "train")
    images, labels = train.images, train.labels
    if args.max_train_examples > 0:
        images, labels = images[: args.max_train_examples], labels[: args.max_train_examples]
    started = time.perf_counter()
    model = train_classifier(images, labels, epochs=args.epochs, seed=args.seed,
                             batch_size=args.batch_size, lr=args.lr, progress=not args.no_progress)
    train_seconds = time.perf_counter() - started
    accuracy = test_accuracy(model, test.images, test.labels)
    command = argv if argv is not None else sys.argv[1:]
    meta: dict[str, Any] = {
        "dataset": "fashion-mnist",
        "feature_dim": FEATURE_DIM,
        "test_accuracy": accuracy,
        "test_examples": len(test),
        "epochs": args.epochs,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "lr_schedule": "cosine to 0, per step",
        "augmentation": "random horizontal flip (p=0.5)",
        "train_examples": int(images.shape[0]),
        "threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "torch_version": str(torch.__version__),  # a str subclass weights_only refuses
        "command": shlex.join(["python", "scripts/train_classifier.py", *command]),
    }
    save_classifier(model, args.out, meta)
    print(f"test accuracy {accuracy:.4f}")
    print(f"trained in {train_seconds:.0f} s; wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0
