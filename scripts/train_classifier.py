#!/usr/bin/env python3
"""Train (or, with --check, re-verify) the Fashion-MNIST feature CNN behind the
offline Fréchet distance; the logic lives in fedapp.eval.classifier_training so tests can import it.

    python scripts/train_classifier.py            # writes fedapp/assets/fashion-mnist-cnn.pt
    python scripts/train_classifier.py --check    # re-measures the committed weights
"""

from fedapp.eval.classifier_training import main

if __name__ == "__main__":
    raise SystemExit(main())
