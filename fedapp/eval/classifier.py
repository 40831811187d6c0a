"""A small Fashion-MNIST classifier whose features drive an offline Fréchet distance.

FID needs Inception-v3 weights from the internet and is tuned to ImageNet photos, so
it can neither run in offline CI nor say much about 28x28 grey clothes. Instead we
train a small CNN on Fashion-MNIST once, commit its weights (under 2 MB), and take
its 128-d penultimate activations as the feature space for the Fréchet distance.

The training is seeded and, for a fixed thread count, bit-for-bit reproducible on
CPU; the weights file records how it was made (command, seed, thread count, test
accuracy), and ``python scripts/train_classifier.py --check`` re-measures it
(``fedapp.eval.classifier_training``).
"""

from __future__ import annotations

import json
import shlex
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedapp.files import atomic_torch_save

__all__ = [
    "CLASSIFIER_PATH",
    "DEFAULT_EPOCHS",
    "FEATURE_DIM",
    "META_KEYS",
    "MIN_TEST_ACCURACY",
    "FeatureCNN",
    "find_classifier",
    "load_classifier",
    "save_classifier",
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
