"""Skip markers shared by the test modules, so each condition and its reason live in one place."""

from __future__ import annotations

import pytest

from fedapp.data.sources import DEBIAN_FASHION_MNIST_DIR

HAVE_FMNIST = (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason="needs the real Fashion-MNIST: apt-get install dataset-fashion-mnist")
