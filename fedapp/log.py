"""fedapp's one logger: the library, the apps, the strategies and the CLI all log through it.

It is the standard library's ``fedapp`` logger with one stderr handler, so its lines reach
``flwr run --stream`` (Flower mirrors the app processes' stderr) and the terminal alike,
without the library importing Flower.

``FLWR_LOG_LEVEL=DEBUG``, Flower's own switch, turns it to DEBUG as well and stamps each line with the
time as Flower's DEBUG lines are: then every process of a deployment (SuperLink, SuperNode, ServerApp,
ClientApp) logs on one clock, and ``bench/deployment_cost.py`` dates each phase of a message from them.
"""

from __future__ import annotations

import logging
import os
import sys

DEBUG_ON = os.environ.get("FLWR_LOG_LEVEL", "").upper() == "DEBUG"
LOGGER = logging.getLogger("fedapp")
if not LOGGER.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _stamp = " %(asctime)s" if DEBUG_ON else ""
    _handler.setFormatter(logging.Formatter(f"%(levelname)-7s{_stamp} fedapp: %(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.setLevel(logging.DEBUG if DEBUG_ON else logging.INFO)


def log(level: int, msg: str, *args: object) -> None:
    """``logging.log`` on fedapp's logger; the same call shape as Flower's ``log``."""
    LOGGER.log(level, msg, *args)


def phase(message_type: str, name: str) -> None:
    """A ClientApp's milestone within one message (DEBUG only): ``train message: data ready``."""
    LOGGER.debug("%s message: %s", message_type, name)
