"""A small Fashion-MNIST classifier whose features drive an offline Fréchet distance.

FID needs Inception-v3 weights from the internet and is tuned to ImageNet photos, so
it can neither run in offline CI nor say much about 28x28 grey clothes. Instead we
train a small CNN on Fashion-MNIST once, commit its weights (under 2 MB), and take
its 128-d penultimate activations as the feature space for the Fréchet distance.

The training is seeded and, for a fixed thread count, bit-for-bit reproducible on
CPU; the weights file records how it was made (command, seed, thread count, test
accuracy), and ``python scripts/train_classifier.py --check`` re-measures it.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedapp.data.pixels import to_model_range
from fedapp.files import atomic_torch_save

__all__ = [
    "CLASSIFIER_PATH",
    "DEFAULT_EPOCHS",
    "FEATURE_DIM",
    "META_KEYS",
    "MIN_TEST_ACCURACY",
    "FeatureCNN",
    "check_classifier",
    "find_classifier",
    "load_classifier",
    "main",
    "save_classifier",
    "test_accuracy",
    "train_classifier",
]

#: Width of the feature vector the Fréchet distance is computed on.
FEATURE_DIM = 128
NUM_CLASSES = 10

#: The committed weights; ``python scripts/train_classifier.py`` rewrites them.
CLASSIFIER_PATH = Path(__file__).parents[1] / "assets" / "fashion-mnist-cnn.pt"

#: Epochs of the committed weights (test accuracy 0.9213; 4 epochs gave 0.8934).
DEFAULT_EPOCHS = 10
DEFAULT_SEED = 0
DEFAULT_THREADS = 2

#: Below this the features are too poor to trust as a quality metric.
MIN_TEST_ACCURACY = 0.90
#: Accuracy is a count over 10,000 images, so any real change moves it by >= 1e-4.
ACCURACY_TOLERANCE = 1e-6

META_KEYS = (
    "dataset", "feature_dim", "test_accuracy", "epochs", "seed", "batch_size", "lr",
    "train_examples", "torch_version", "command",
)

_TRAIN_HINT = "python scripts/train_classifier.py"


class FeatureCNN(nn.Module):
    """Four 3x3 convs and two linears (~470k parameters, ~1.9 MB as float32).

    No BatchNorm: features then depend on nothing but the weights and the input, so
    eval needs no running statistics and batch size never changes a feature.
    """

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 14 -> 7
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(64 * 7 * 7, FEATURE_DIM)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Post-ReLU penultimate activations, taken before dropout so that train and
        eval mode give the same features."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"expected images of shape (B, 1, 28, 28), got {tuple(x.shape)}")
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits; input floats in [-1, 1] like the diffusion model's samples."""
        return self.head(self.dropout(self.features(x)))


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


def _check_plain(value: Any, where: str = "meta") -> None:
    """``torch.load(weights_only=True)`` refuses anything but plain types, so refuse
    them on save instead of writing a file nobody can load."""
    # exact types: subclasses such as torch.__version__ (TorchVersion) are refused on load
    if value is None or type(value) in (str, int, float, bool):
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"{where} keys must be str, got {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} must hold only str, int, float, bool, lists and dicts; "
                    f"got {type(value).__name__}")


def save_classifier(model: FeatureCNN, path: Path, meta: dict[str, Any]) -> None:
    """Write ``{"state_dict", "meta"}`` via a temp file and ``os.replace`` so an
    interrupted run never leaves a truncated weights file behind."""
    _check_plain(meta)
    path = Path(path)
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save({'state_dict': state, 'meta': dict(meta)}, path)


def _how_to_make(path: Path) -> str:
    out = "" if Path(path).resolve() == CLASSIFIER_PATH.resolve() else f" --out {shlex.quote(str(path))}"
    return f"make it with: {_TRAIN_HINT}{out}"


def load_classifier(path: Path = CLASSIFIER_PATH) -> tuple[FeatureCNN, dict[str, Any]]:
    """The model in eval mode and its meta; a missing or foreign file raises with
    one line that names the path and how to make it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found at {path}; {_how_to_make(path)}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all mean "not ours"
        raise ValueError(f"{path} is not a classifier weights file ({type(exc).__name__}); "
                         f"{_how_to_make(path)}") from None
    if (not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict)
            or not isinstance(payload.get("meta"), dict)):
        raise ValueError(f"{path} is not a classifier weights file (no state_dict/meta); "
                         f"{_how_to_make(path)}")
    meta = payload["meta"]
    if meta.get("feature_dim") != FEATURE_DIM:
        raise ValueError(f"{path} has feature_dim {meta.get('feature_dim')!r}, expected {FEATURE_DIM}; "
                         f"{_how_to_make(path)}")
    model = FeatureCNN()
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError:
        raise ValueError(f"{path} holds weights for a different network; {_how_to_make(path)}") from None
    model.eval()
    return model, meta


def installed_copy(relative: str, dist_name: str = "fedapp") -> Path | None:
    """Where the fedapp installed in this environment keeps ``relative`` (a package-data file).

    Flower's app bundle (FAB) carries only code and text (.py, .toml, .md, .json, ...), so a
    ServerApp or ClientApp running from one has no weights beside its modules; the installed
    distribution has them (as package data, or in the source tree of an editable install).
    """
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return None
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        direct = {}
    url = str(direct.get("url", ""))
    if direct.get("dir_info", {}).get("editable") and url.startswith("file://"):
        return Path(unquote(urlparse(url).path)) / relative
    return Path(str(dist.locate_file(relative)))


def find_classifier(configured: str = "") -> Path:
    """The weights file: ``configured`` if given, else beside this module, else in the installed fedapp."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"eval.fd-cnn-weights = {configured!r}: no such file")
        return path
    tried = [CLASSIFIER_PATH, installed_copy(f"fedapp/assets/{CLASSIFIER_PATH.name}")]
    for path in tried:
        if path is not None and path.is_file():
            return path
    places = ", ".join(str(p) for p in tried if p is not None)
    raise FileNotFoundError(f"classifier weights not found (tried {places}); install fedapp in this "
                            f"environment (pip install -e .) or set eval.fd-cnn-weights")


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
