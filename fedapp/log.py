"""fedapp's one logger: the library, the apps, the strategies and the CLI all log through it.

It is the standard library's ``fedapp`` logger with one stderr handler, so its lines reach
``flwr run --stream`` (Flower mirrors the app processes' stderr) and the terminal alike,
without the library importing Flower.
"""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("fedapp")
if not LOGGER.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(levelname)-7s fedapp: %(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.setLevel(logging.INFO)


def log(level: int, msg: str, *args: object) -> None:
    """``logging.log`` on fedapp's logger; the same call shape as Flower's ``log``."""
    LOGGER.log(level, msg, *args)
