"""Skip markers shared by the test modules, so each condition and its reason live in one place.

Without the real Fashion-MNIST, ``tests/conftest.py`` writes a small stand-in set into a
fresh ``FEDAPP_DATA_DIR`` before collection (``tests/support/standin.py``): ``needs_fmnist``
tests then run on it, and only ``needs_real_fmnist`` tests skip.
"""

from __future__ import annotations

import pytest

from fedapp.data.sources import DEBIAN_FASHION_MNIST_DIR
from tests.support.standin import have_fashion_mnist

REAL_FMNIST_REASON = "needs the real Fashion-MNIST: apt-get install dataset-fashion-mnist"
HAVE_REAL_FMNIST = (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
HAVE_FMNIST = have_fashion_mnist()  # the real set or the stand-in, where fedapp looks
needs_real_fmnist = pytest.mark.skipif(not HAVE_REAL_FMNIST, reason=REAL_FMNIST_REASON)
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="needs Fashion-MNIST or its stand-in (tests/conftest.py)")
